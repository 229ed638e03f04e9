"""``facetrain-pack`` = ``python -m facetrain.cli.pack``: write insightface-format data without
mxnet (``facetrain.data.writers``)."""

import argparse
import logging

from facetrain.cli import silence_library_noise, user_errors
from facetrain.data.writers import pack_identity_folder, write_bin_from_set, write_index


def main(argv: list[str] | None = None) -> None:
    """Pack an identity folder, rebuild an index, or write a .bin verification set."""
    parser = argparse.ArgumentParser(
        prog="facetrain-pack",
        description="Write insightface-format data without mxnet: a RecordIO training pack from "
        "an identity folder (ROOT OUT_DIR), a rebuilt .idx (--reindex REC), or a verification "
        ".bin from a pair list / LFW pairs.txt (--bin SET OUT.bin).",
    )
    parser.add_argument("paths", nargs="*", help="ROOT OUT_DIR | SET OUT.bin (with --bin)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for non-JPEG images")
    parser.add_argument("--reindex", metavar="REC", help="rebuild REC's .idx from its records")
    parser.add_argument("--bin", action="store_true", help="write a verification .bin")
    args = parser.parse_args(argv)
    if args.reindex and args.paths:
        parser.error("--reindex takes only the .rec path")
    if not args.reindex and len(args.paths) != 2:
        parser.error("expected two paths: ROOT OUT_DIR (or SET OUT.bin with --bin)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    silence_library_noise()
    with user_errors("facetrain-pack"):
        if args.reindex:
            print(f"wrote {write_index(args.reindex)}")
        elif args.bin:
            print(f"wrote {write_bin_from_set(args.paths[0], args.paths[1])}")
        else:
            rec = pack_identity_folder(args.paths[0], args.paths[1], args.quality)
            print(f"wrote {rec}, {rec.with_suffix('.idx')} and {rec.parent / 'property'}")


if __name__ == "__main__":
    main()
