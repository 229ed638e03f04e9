"""Verification pair lists: a text file of ``path1 path2 same`` lines (1 = same identity).

Relative paths are resolved against the pair file's folder. The dataset yields each distinct
image once, with its index, so embeddings are computed once however many pairs use an image.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from facetrain.data.images import DatasetError, check_image_header, read_rgb


def read_pair_list(pairs_file: str | Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Parse a pair list into (distinct image paths, pair indices (P, 2), same flags (P,))."""
    pairs_file = Path(pairs_file)
    if not pairs_file.is_file():
        raise DatasetError(
            f"verification pair list {str(pairs_file)!r} does not exist; it must be a text file "
            f"of 'path1 path2 same' lines"
        )
    index: dict[Path, int] = {}
    pairs, same = [], []
    for number, line in enumerate(pairs_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 3 or fields[2] not in ("0", "1"):
            raise DatasetError(
                f"{pairs_file}:{number}: expected 'path1 path2 same' with same 0 or 1, got {line!r}"
            )
        paths = [(pairs_file.parent / field).resolve() for field in fields[:2]]
        pairs.append([index.setdefault(path, len(index)) for path in paths])
        same.append(fields[2] == "1")
    if not pairs:
        raise DatasetError(f"verification pair list {str(pairs_file)!r} holds no pairs")
    same = np.array(same)
    if same.all() or not same.any():
        raise DatasetError(
            f"verification pair list {str(pairs_file)!r} needs both same (1) and different (0) "
            f"pairs to choose a threshold"
        )
    return list(index), np.array(pairs), same


class PairListDataset(Dataset):
    """The distinct images of a pair list, yielded as (image, image index)."""

    def __init__(self, pairs_file: str | Path, name: str, transform: Callable | None = None):
        self.name = name
        self.paths, self.pairs, self.same = read_pair_list(pairs_file)
        problems = [(p, "missing") if not p.is_file() else (p, check_image_header(p))
                    for p in self.paths]
        problems = [(path, why) for path, why in problems if why]
        if problems:
            shown = "; ".join(f"{path} ({why})" for path, why in problems[:5])
            raise DatasetError(
                f"verification set {name!r} ({pairs_file}) names {len(problems)} unreadable "
                f"image(s): {shown}; fix or remove those pairs so results stay comparable"
            )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = read_rgb(self.paths[index])
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, index
