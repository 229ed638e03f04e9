"""insightface verification ``.bin`` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...), read without
unrestricted pickle (``facetrain.data.writers`` writes them).

Layout (arcface_torch ``eval/verification.py: load_bin``): a pickle of ``(bins, issame_list)``;
``bins`` holds 2P encoded images (JPEG/PNG bytes, or uint8 arrays), pair i is images 2i and
2i+1, and ``issame_list`` holds the P same-identity flags. A pickle may call any importable
function, so the unpickler here resolves only the numpy names that rebuild arrays and scalars
(numpy 1 and 2 module paths) and ``_codecs.encode`` (protocol-2 bytes): a crafted file is refused
before anything in it runs.
"""

import importlib
import io
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from facetrain.data.images import DECODE_ERRORS, DatasetError, decode_rgb

# (module, name) pairs a verification .bin may reference, as numpy 1 and numpy 2 pickle them.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}
_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers, bytes, numbers and numpy arrays; refuses every other global."""

    def __init__(self, file, source: Path):
        super().__init__(file, encoding="bytes")  # insightface's py2-era bins hold str as bytes
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DatasetError(
                f"refused to load {self.source}: its pickle asks for {module}.{name}, which an "
                f"insightface verification .bin never holds (it may be crafted to run code); "
                f"get the file from a trusted source"
            )
        module = module.replace("numpy._core", _NUMPY_CORE).replace("numpy.core", _NUMPY_CORE)
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid):
        raise DatasetError(f"refused to load {self.source}: it holds persistent pickle ids")


def _image_problem(image) -> str | None:
    """Why one entry of ``bins`` is not an image, or None."""
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8 and image.ndim in (2, 3) and image.shape[2:] in ((), (3,)):
            return None
        return f"an array of dtype {image.dtype} and shape {image.shape}, not uint8 (H, W[, 3])"
    if not isinstance(image, bytes | bytearray):
        return f"a {type(image).__name__}, not image bytes"
    try:
        with Image.open(io.BytesIO(image)) as opened:
            opened.size  # noqa: B018 - parsing the size is the check
    except DECODE_ERRORS as error:
        return f"undecodable ({type(error).__name__}: {error})"
    return None


def read_bin(path: str | Path) -> tuple[list, np.ndarray]:
    """(2P images, P same flags) of an insightface ``.bin``, checked for the expected structure."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"verification .bin {str(path)!r} does not exist")
    try:
        with open(path, "rb") as file:
            content = RestrictedUnpickler(file, path).load()
    except DatasetError:
        raise
    except Exception as error:  # a damaged pickle fails in many ways; all mean the same here
        raise DatasetError(
            f"{path} is not a readable pickle ({type(error).__name__}: {error}); an insightface "
            f".bin is a pickle of (images, same flags)"
        ) from None
    expected = "an insightface .bin is a pickle of (list of 2P encoded images, list of P bools)"
    if not isinstance(content, tuple | list) or len(content) != 2:
        raise DatasetError(f"{path} holds a {type(content).__name__}, not a 2-tuple; {expected}")
    images, same = content
    if not isinstance(images, list | tuple) or not isinstance(same, list | tuple | np.ndarray):
        raise DatasetError(
            f"{path} holds ({type(images).__name__}, {type(same).__name__}); {expected}"
        )
    if not all(isinstance(flag, bool | np.bool_) for flag in same):
        raise DatasetError(f"{path}: the same flags are not all booleans; {expected}")
    if len(same) == 0 or len(images) != 2 * len(same):
        raise DatasetError(
            f"{path} holds {len(images)} images for {len(same)} pairs (needs 2 per pair); "
            f"{expected}"
        )
    problems = [(i, why) for i, image in enumerate(images) if (why := _image_problem(image))]
    if problems:
        shown = "; ".join(f"image {i}: {why}" for i, why in problems[:5])
        raise DatasetError(f"{path} holds {len(problems)} unusable image(s): {shown}")
    same = np.array([bool(flag) for flag in same])
    if same.all() or not same.any():
        raise DatasetError(
            f"{path} needs both same and different pairs to choose a threshold"
        )
    return list(images), same


class BinDataset(Dataset):
    """The images of an insightface ``.bin`` yielded as (image, image index); pair i is images
    2i and 2i+1. Identities are unknown (``identities`` is None)."""

    def __init__(self, path: str | Path, name: str, transform: Callable | None = None):
        self.name = name
        self.path = Path(path)
        self.images, self.same = read_bin(self.path)
        self.pairs = np.arange(len(self.images)).reshape(-1, 2)
        self.identities: list[str] | None = None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        if isinstance(image, np.ndarray):
            image = np.stack([image] * 3, axis=-1) if image.ndim == 2 else image
        else:
            try:  # no stand-in for an image of a pair: a failure stops, naming the image
                image = decode_rgb(image)
            except DECODE_ERRORS as error:
                raise DatasetError(
                    f"verification set {self.name!r}: image {index} of {self.path} has a "
                    f"readable header but does not decode ({type(error).__name__}: {error}); "
                    f"get an intact copy of the file"
                ) from None
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, index
