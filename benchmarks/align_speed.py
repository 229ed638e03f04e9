"""Speed of ``facetrain-align``: landmark-file path and MTCNN path, against copying the images.

    python -m benchmarks.align_speed                      # 200 photos of 256x256, all CPUs
    python -m benchmarks.align_speed --images 400 --size 640 --workers 2

Writes synthetic unaligned photos (``facetrain.data.synthetic.draw_photo``: a face 96-160 px
wide at a random roll, JPEG) and their true landmarks (CSV) to a temporary folder, then times,
over the same worker processes: the baseline, a bare ``cv2.imread`` + ``cv2.imwrite`` of every
image (what any tool that touches each photo pays); ``align_images`` with the landmark file;
``align_images`` with the detector. Prints images/s, each as a ratio to the baseline, and the
detector's landmark error against the drawn landmarks.
"""

import argparse
import csv
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.figures import Figure
from facetrain.align.pipeline import REPORT_NAME, AlignOptions, align_images
from facetrain.data.synthetic import draw_photo, sample_traits


def write_photos(root: Path, count: int, size: int) -> dict[str, np.ndarray]:
    truth = {}
    for k in range(count):
        rng = np.random.default_rng(k)
        photo, landmarks = draw_photo(sample_traits(rng), rng, size, (96 * size // 256,
                                                                      160 * size // 256))
        relative = f"{k % 20:03d}/{k:05d}.jpg"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / relative), photo[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        truth[relative] = landmarks
    return truth


def _copy(job: tuple[str, str]) -> None:
    source, target = job
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(target, cv2.imread(source), [cv2.IMWRITE_JPEG_QUALITY, 95])


def baseline(root: Path, target: Path, relatives: list[str], workers: int) -> float:
    """Seconds to read and write every image, over ``workers`` processes as the aligner."""
    jobs = [(str(root / r), str(target / r)) for r in relatives]
    start = time.perf_counter()
    if workers <= 1:
        for job in jobs:
            _copy(job)
    else:
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with context.Pool(workers) as pool:
            pool.map(_copy, jobs, chunksize=4)
    return time.perf_counter() - start


def landmark_errors(report: Path, truth: dict[str, np.ndarray]) -> tuple[list[float], int]:
    """Per detected photo, the mean distance (px) of its 5 landmarks from the drawn ones."""
    errors = []
    lines = report.read_text().splitlines()[1:]
    for row in csv.DictReader(lines, delimiter="\t"):
        if row["output"]:
            found = np.array(row["landmarks"].split(","), dtype=float).reshape(5, 2)
            errors.append(float(np.linalg.norm(found - truth[row["file"]], axis=1).mean()))
    return errors, len(truth) - len(errors)


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=256, help="photo side, pixels")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    figures = []
    with tempfile.TemporaryDirectory(prefix="facetrain-align-") as temporary:
        root = Path(temporary) / "photos"
        truth = write_photos(root, args.images, args.size)
        table = Path(temporary) / "landmarks.csv"
        with table.open("w", newline="") as out:
            csv.writer(out).writerows([r, *lm.reshape(-1).round(3)] for r, lm in truth.items())
        print(f"{args.images} photos of {args.size}x{args.size} (JPEG), {args.workers} worker "
              f"process(es), {os.cpu_count()} CPUs")
        base = baseline(root, Path(temporary) / "copy", list(truth), args.workers)
        rate = args.images / base
        print(f"{'cv2.imread + imwrite (baseline)':<36}{rate:>9.1f} images/s   1.00x")
        for name, landmarks in (("align, landmark file", table), ("align, MTCNN detector", None)):
            dst = Path(temporary) / name.replace(" ", "_").replace(",", "")
            result = align_images(root, dst, AlignOptions(), landmarks=landmarks,
                                  workers=args.workers, progress=False)
            speed = args.images / result.seconds
            print(f"{name:<36}{speed:>9.1f} images/s   {speed / rate:.2f}x")
            figures.append(Figure(
                "align_speed", f"facetrain-align, {name.removeprefix('align, ')}, {args.images} "
                f"photos {args.size}x{args.size}: images/s", speed / rate,
                "cv2.imread + imwrite of each photo, images/s",
                f"{speed:.1f} vs {rate:.1f} images/s, {args.workers} worker process(es)",
            ))
        errors, missed = landmark_errors(dst / REPORT_NAME, truth)
        print(f"MTCNN landmark error (mean of 5 points per face, px): median "
              f"{np.median(errors):.2f}, mean {np.mean(errors):.2f}, 90th percentile "
              f"{np.percentile(errors, 90):.2f}, worst {max(errors):.2f}; "
              f"{missed} of {args.images} photos without a face found")
    return figures


def quick() -> list[Figure]:
    return main(["--images", "40"])


def full() -> list[Figure]:
    return main([])


if __name__ == "__main__":
    main()
