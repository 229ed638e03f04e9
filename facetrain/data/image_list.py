"""Unlabelled images to embed or to check an export on: a folder (searched recursively) or a text
file listing one image path per line."""

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from facetrain.data.images import DECODE_ERRORS, DatasetError, is_image_file, read_rgb


def list_images(source: str | Path) -> tuple[Path, list[str]]:
    """The images named by ``source`` as (root, paths relative to root), in a fixed order.

    A folder gives every file under it with an image extension, sorted by relative path. A text
    file gives its non-blank lines in order (``#`` starts a comment line); relative lines are
    taken from the list file's folder. Files are not opened here: a missing or unreadable one is
    reported when it is loaded (``ImageListDataset``).
    """
    source = Path(source).expanduser()
    if source.is_dir():
        paths = sorted(
            p.relative_to(source).as_posix()
            for p in source.rglob("*")
            if p.is_file() and is_image_file(p)
        )
        root = source
    elif source.is_file():
        try:
            lines = source.read_text().splitlines()
        except (UnicodeDecodeError, OSError) as error:
            raise DatasetError(
                f"{str(source)!r} is neither a folder nor a readable text list of image paths "
                f"({error}); give a folder of images or a file with one image path per line"
            ) from None
        paths = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        root = source.parent
    else:
        raise DatasetError(
            f"{str(source)!r} does not exist; give a folder of images or a text file with one "
            f"image path per line"
        )
    if not paths:
        raise DatasetError(
            f"no images in {str(source)!r}: expected image files "
            f"(.jpg/.jpeg/.png/.bmp/.pgm) or a list naming them"
        )
    return root, paths


class ImageListDataset(Dataset):
    """Images of ``list_images``, yielded as (index, image, None) or, when the file cannot be
    read, (index, None, why): the caller decides what a skip means, nothing is dropped silently.
    """

    def __init__(self, root: str | Path, paths: list[str], transform: Callable | None = None):
        self.root = Path(root)
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.root / self.paths[index]
        try:
            image = read_rgb(path)
        except FileNotFoundError:
            return index, None, "missing"
        except DECODE_ERRORS as error:
            return index, None, f"{type(error).__name__}: {error}"
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return index, image, None


def collate_readable(items):
    """Batch the readable items of ``ImageListDataset``: (indices, images or None, failures)
    with failures a list of (index, why)."""
    readable = [(index, image) for index, image, why in items if why is None]
    failed = [(index, why) for index, _, why in items if why is not None]
    indices = torch.tensor([index for index, _ in readable], dtype=torch.long)
    images = torch.stack([image for _, image in readable]) if readable else None
    return indices, images, failed
