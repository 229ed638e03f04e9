"""Every command-line entry point, one thin main per module, and what they all share: quiet
third-party logging and one-line exits for errors the user can fix.

    python train.py ...            facetrain-train ...    python -m facetrain.cli.train ...
    facetrain-eval ...             python -m facetrain.cli.eval ...
    facetrain-embed ...            python -m facetrain.cli.embed ...
    facetrain-export ...           python -m facetrain.cli.export ...
    facetrain-pack ...             python -m facetrain.cli.pack ...        (argparse)
    facetrain-synthetic ...        python -m facetrain.cli.synthetic ...   (argparse)
    facetrain-align ...            python -m facetrain.cli.align ...
    facetrain-compare ...          python -m facetrain.cli.compare ...     (argparse)

A console script and ``python -m`` run the same ``main``. The work itself is library code
(``facetrain.train``, ``facetrain.eval``, ``facetrain.embed``, ``facetrain.export``,
``facetrain.data``) that never imports this package; the Hydra mains read their configs from
``facetrain.resources.config_dir()``.
"""

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import InstantiationException
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from facetrain.checkpoint import CheckpointError
from facetrain.data.images import DatasetError


def silence_library_noise() -> None:
    """Drop third-party messages that say nothing about the user's run: Lightning's cloud-logger
    advertisement, a deprecation inside Lightning itself, and the ONNX exporter's pass-by-pass
    INFO lines."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("💡")
    )
    warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated")
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Opset conversion attempts are logged there (with a traceback when they fail);
    # facetrain.export checks the opset it got and says what it does about it.
    logging.getLogger("onnxscript.version_converter").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx._internal.exporter._compat").setLevel(logging.ERROR)


@contextmanager
def user_errors(tool: str, **more: type[Exception]) -> Iterator[None]:
    """Turn an error the user can fix (bad data, a wrong checkpoint, and the tool's own ``more``
    kinds, e.g. ``export=ExportError``) into ``<tool>: <kind> error: <message>`` and a non-zero
    exit, without a traceback."""
    kinds = {"data": DatasetError, "checkpoint": CheckpointError, **more}
    try:
        try:
            yield
        # What a resolver (${facetrain.required:...}) or a constructor that hydra.utils.instantiate
        # called raised, as OmegaConf and Hydra wrap it.
        except (InterpolationResolutionError, InstantiationException) as wrapped:
            cause = wrapped.__cause__ or wrapped.__context__
            if isinstance(cause, (*kinds.values(), MissingMandatoryValue)):
                raise cause from None
            raise
    except MissingMandatoryValue as missing:  # a ??? of the configs (data.train_root of data=rec)
        raise SystemExit(f"{tool}: config error: {missing.full_key} must be given: add "
                         f"{missing.full_key}=...") from None
    except tuple(kinds.values()) as error:
        kind = next(name for name, cls in kinds.items() if isinstance(error, cls))
        logging.getLogger(tool).debug("%s failed", tool, exc_info=True)
        raise SystemExit(f"{tool}: {kind} error: {worker_message(error)}") from None


def worker_message(error: Exception) -> str:
    """The error's own message, also when a DataLoader worker raised it: PyTorch re-raises it
    in the main process as "Caught X in DataLoader worker process N. Original Traceback ..."
    with the worker's traceback inside the message; the user needs its last line only."""
    message = str(error)
    if "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    return last.removeprefix(prefix).removeprefix(f"{type(error).__qualname__}: ")
