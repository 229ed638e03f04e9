"""Reading face images from disk: one place that decides what counts as a readable image."""

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".pgm"})

# What PIL raises for a file that is not a decodable image (truncated, zero bytes, not an image,
# or more pixels than Image.MAX_IMAGE_PIXELS allows: a decompression bomb).
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, DecompressionBombError)


class DatasetError(RuntimeError):
    """A dataset cannot be used as configured; the message says which path and what to do."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def check_image_header(path: str | bytes | Path) -> str | None:
    """Why ``path`` is not a readable image (a short reason: empty file, not an image,
    unreadable header, more pixels than PIL's decompression-bomb limit), or None. Parses the
    header only (fast)."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - parsing the size is the check
    except DecompressionBombError:
        return f"more than {2 * Image.MAX_IMAGE_PIXELS} pixels"
    except UnidentifiedImageError:
        return "empty file" if os.path.getsize(path) == 0 else "not an image"
    except DECODE_ERRORS:
        return "unreadable header"
    return None


def read_rgb(path: str | bytes | Path | BinaryIO) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array.

    Grayscale, palette, RGBA and CMYK are converted by PIL. 16-bit grayscale (PNG, PGM; PIL modes
    ``I;16*`` and ``I``, values 0..65535) keeps its high byte: PIL's own conversion would clip
    every value above 255 to white.
    """
    with Image.open(path) as image:
        if image.mode == "I" or image.mode.startswith("I;16"):
            gray = (np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        return np.asarray(image.convert("RGB"))


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, ...; a RecordIO record or a .bin entry) to an
    (H, W, 3) uint8 RGB array, with the same conversions as image files (``read_rgb``)."""
    return read_rgb(io.BytesIO(data))
