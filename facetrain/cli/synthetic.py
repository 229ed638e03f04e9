"""``facetrain-synthetic ROOT [--option value ...]`` = ``python -m facetrain.cli.synthetic``:
write the built-in synthetic faces (``facetrain.data.SyntheticFaces``) by hand."""

import argparse
import time
from dataclasses import fields

from facetrain.cli import silence_library_noise, user_errors
from facetrain.data.synthetic import SyntheticFaces


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="facetrain-synthetic", description=SyntheticFaces.__doc__)
    parser.add_argument("root", help="output folder")
    for option in fields(SyntheticFaces):
        if option.name != "root":
            parser.add_argument(
                "--" + option.name.replace("_", "-"),
                default=option.default,
                type=int if option.default is None else type(option.default),
            )
    try:
        dataset = SyntheticFaces(**vars(parser.parse_args(argv)))
    except ValueError as error:  # settings that cannot make a dataset: a usage error
        parser.error(str(error))
    start = time.perf_counter()
    # A non-empty folder this generator did not make is refused, not overwritten.
    silence_library_noise()
    with user_errors("facetrain-synthetic", output=FileExistsError):
        dataset.generate()
    seconds = time.perf_counter() - start
    for folder in (dataset.train_root, dataset.verification_root):
        identities = [d for d in folder.iterdir() if d.is_dir()]
        images = sum(len(list(d.glob("*.jpg"))) for d in identities)
        print(f"{folder}: {len(identities)} identities, {images} images")
    pairs = len(dataset.pairs_file.read_text().splitlines())
    print(f"{dataset.pairs_file}: {pairs} pairs; took {seconds:.1f} s")


if __name__ == "__main__":
    main()
