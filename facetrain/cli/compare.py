"""``facetrain-compare RUN_OR_SWEEP_DIR... [output=DIR]`` = ``python -m facetrain.cli.compare``:
training runs side by side (``facetrain.compare``). Prints the table and writes compare.md,
compare.csv and compare.png to ``outputs/compare/<date_time>/``, or to ``output=DIR`` (the
``key=value`` form of facetrain-eval's ``output=``)."""

import argparse
import logging
import sys

from facetrain.cli import silence_library_noise, user_errors
from facetrain.compare import CompareError, compare, markdown, write_report

SETTINGS = ("output",)  # key=value arguments; every other argument is a path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="facetrain-compare",
        description="Compare training runs: final verification metrics (metrics.json), "
        "accuracy per epoch and ROC curves (TensorBoard), and the settings that differ. "
        "Writes compare.md, compare.csv and compare.png to outputs/compare/<date_time>/ or "
        "output=DIR.",
    )
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR",
                        help="a run folder (.hydra/config.yaml + metrics.json), or a folder "
                        "holding runs: a sweep (outputs/multirun/<time>), outputs/")
    args = parser.parse_args(argv)
    settings, paths = {}, []
    for arg in args.paths:
        key, is_setting, value = arg.partition("=")
        if is_setting and key in SETTINGS:
            settings[key] = value
        elif is_setting and key.isidentifier():
            parser.error(f"unknown setting {key}= (known: {', '.join(SETTINGS)}=)")
        else:
            paths.append(arg)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    silence_library_noise()
    with user_errors("facetrain-compare", compare=CompareError):
        comparison = compare(paths)
    for line in comparison.skipped:
        print(f"facetrain-compare: skipped {line}", file=sys.stderr)
    if comparison.skipped:
        print(f"facetrain-compare: skipped {len(comparison.skipped)} path(s); comparing "
              f"{len(comparison.runs)} run(s)", file=sys.stderr)
    folder = write_report(comparison, settings.get("output"))
    print(markdown(comparison, image=None), end="")
    print(f"\nwrote {folder / 'compare.md'}, {folder / 'compare.csv'} and "
          f"{folder / 'compare.png'}")


if __name__ == "__main__":
    main()
