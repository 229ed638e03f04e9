"""Identity-folder datasets: the CASIA-WebFace layout ``root/<identity>/<image>``."""

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from facetrain.data.images import DECODE_ERRORS, DatasetError, check_image_header, is_image_file
from facetrain.data.images import read_rgb

log = logging.getLogger(__name__)


def scan_identity_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Find every readable image under ``root/<identity>/``.

    Classes are the sorted names of identity folders holding at least one readable image. Files
    that are not images by extension are ignored; files that are but cannot be parsed (zero
    bytes, truncated header, text named .jpg) are skipped and counted in one warning, so a bad
    file is reported at start-up instead of crashing a run later.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"training data root {str(root)!r} does not exist or is not a folder; point "
            f"data.train_root at a folder laid out as <root>/<identity>/<image>"
        )
    classes: list[str] = []
    samples: list[tuple[Path, int]] = []
    unreadable: list[tuple[Path, str]] = []
    empty_identities: list[str] = []
    for identity_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        images = []
        for path in sorted(p for p in identity_dir.iterdir() if p.is_file() and is_image_file(p)):
            problem = check_image_header(path)
            if problem is None:
                images.append(path)
            else:
                unreadable.append((path, problem))
        if not images:
            empty_identities.append(identity_dir.name)
            continue
        samples.extend((path, len(classes)) for path in images)
        classes.append(identity_dir.name)
    if unreadable:
        shown = "; ".join(f"{path} ({why})" for path, why in unreadable[:5])
        log.warning(
            "skipped %d unreadable image file(s) under %s: %s%s",
            len(unreadable), root, shown, " ..." if len(unreadable) > 5 else "",
        )
    if empty_identities:
        log.warning(
            "skipped %d identity folder(s) without a readable image under %s: %s%s",
            len(empty_identities), root, ", ".join(empty_identities[:10]),
            " ..." if len(empty_identities) > 10 else "",
        )
    if not samples:
        raise DatasetError(
            f"no readable images found under {str(root)!r}; expected <root>/<identity>/<image> "
            f"with images of type .jpg/.jpeg/.png/.bmp/.pgm"
        )
    log.info("scanned %s: %d identities, %d images", root, len(classes), len(samples))
    return classes, samples


class IdentityFolderDataset(Dataset):
    """Images of ``root/<identity>/`` labelled by the index of the identity in sorted order.

    An image that passed the header check but fails to decode when loaded (e.g. a truncated
    JPEG body) is replaced by the next sample, with its own label, and counted in a warning.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None):
        self.root = Path(root)
        self.classes, self.samples = scan_identity_folder(self.root)
        self.transform = transform
        self.failed_loads: Counter[Path] = Counter()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.samples])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = read_rgb(path)
            except DECODE_ERRORS as error:
                self.failed_loads[path] += 1
                log.warning("could not decode %s (%s); using the next image instead", path, error)
                continue
            if self.transform is not None:
                image = self.transform(image=image)["image"]
            return image, label
        raise DatasetError(f"no image under {self.root} could be decoded")
