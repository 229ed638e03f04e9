"""What every command-line entry point shares: the config folder, quiet third-party logging,
and one-line exits for errors the user can fix."""

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from facetrain.checkpoint import CheckpointError
from facetrain.data.images import DatasetError
from facetrain.data.transforms import build_transform
from facetrain.resources import config_dir

CONFIG_DIR = config_dir()


def silence_library_noise() -> None:
    """Drop third-party messages that say nothing about the user's run: Lightning's cloud-logger
    advertisement and a deprecation inside Lightning itself."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("💡")
    )
    warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated")


def resolve_device(device: str) -> torch.device:
    """``auto`` = the GPU when there is one, else the CPU; any other value as torch names it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def preprocessing(info: dict):
    """The evaluation transform of a checkpoint (``load_backbone``'s description): resize to its
    input size, normalise with its mean and std, CHW float tensor."""
    return build_transform([], info["image_size"], info["mean"], info["std"])


@contextmanager
def user_errors(tool: str, **more: type[Exception]) -> Iterator[None]:
    """Turn an error the user can fix (bad data, a wrong checkpoint, and the tool's own ``more``
    kinds, e.g. ``export=ExportError``) into ``<tool>: <kind> error: <message>`` and a non-zero
    exit, without a traceback."""
    kinds = {"data": DatasetError, "checkpoint": CheckpointError, **more}
    try:
        yield
    except tuple(kinds.values()) as error:
        kind = next(name for name, cls in kinds.items() if isinstance(error, cls))
        logging.getLogger(tool).debug("%s failed", tool, exc_info=True)
        raise SystemExit(f"{tool}: {kind} error: {error}") from None
