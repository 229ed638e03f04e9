"""Start-up time of a large identity folder: first scan vs re-reading the cached index.

    python -m benchmarks.scan_speed                         # 5,000 identities x 20 images
    python -m benchmarks.scan_speed --identities 10000 --images 50 --workers 32

Writes the folder (small real JPEGs, one file per image) to a temporary directory, then times
``IdentityFolderDataset`` construction three times: a scan without cache on one thread (the
baseline), the first scan with the default thread pool (writes the index), and a start with the
index cached. The files were just written, so they sit in the page cache: the scans measure
header parsing, not disk or network latency, which the thread pool mostly hides.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.figures import Figure
from facetrain.data.folder import SCAN_WORKERS, IdentityFolderDataset


def write_folder(root: Path, identities: int, images: int) -> None:
    rng = np.random.default_rng(0)
    encoded = [  # a few distinct 112x112 JPEGs (~3 KB each), reused: writing is not what we time
        cv2.imencode(".jpg", cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), np.uint8),
                                              (0, 0), 3))[1].tobytes()
        for _ in range(8)
    ]
    for i in range(identities):
        folder = root / f"{i:07d}"
        folder.mkdir()
        for k in range(images):
            (folder / f"{k:03d}.jpg").write_bytes(encoded[(i + k) % len(encoded)])


def timed(**options) -> tuple[float, IdentityFolderDataset]:
    start = time.perf_counter()
    dataset = IdentityFolderDataset(**options)
    return time.perf_counter() - start, dataset


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=5000)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--workers", type=int, default=SCAN_WORKERS)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="facetrain-scan-") as temporary:
        root, index = Path(temporary) / "faces", Path(temporary) / "index.json"
        root.mkdir()
        start = time.perf_counter()
        write_folder(root, args.identities, args.images)
        print(f"wrote {args.identities:,} identities x {args.images} JPEGs in "
              f"{time.perf_counter() - start:.1f} s ({os.cpu_count()} CPUs)")
        serial, _ = timed(root=root, index_cache=None, scan_workers=1)
        first, dataset = timed(root=root, index_cache=index, scan_workers=args.workers)
        cached, again = timed(root=root, index_cache=index, scan_workers=args.workers)
        assert len(dataset) == len(again) == args.identities * args.images
        print(f"scan, 1 thread, no cache:   {serial:7.2f} s")
        print(f"first scan, {args.workers} threads:    {first:7.2f} s   "
              f"(index {index.stat().st_size / 1e6:.1f} MB)")
        print(f"start with cached index:    {cached:7.2f} s")
        print(f"first scan / cached start:  {first / cached:7.1f}x")
    files = f"{args.identities:,} identities x {args.images} JPEGs"
    return [
        Figure("scan_speed", f"start with the cached index, {files}: seconds", cached / first,
               f"first scan ({args.workers} threads, writes the index), seconds",
               f"{cached:.3f} s vs {first:.2f} s"),
        Figure("scan_speed", f"first scan, {args.workers} threads, {files}: seconds",
               first / serial, "scan on 1 thread without cache, seconds",
               f"{first:.2f} s vs {serial:.2f} s (files in the page cache)"),
    ]


def quick() -> list[Figure]:
    return main(["--identities", "1000", "--images", "10"])


def full() -> list[Figure]:
    return main([])


if __name__ == "__main__":
    main()
