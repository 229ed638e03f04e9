"""A trained backbone as a self-describing inference model, checked against PyTorch before it is
kept. The command line (``facetrain-export checkpoint=RUN_OR_CKPT [format=onnx|torchscript]
[opset=18] [output=FILE]``) is ``facetrain.cli.export``.

ONNX (default): the ``torch.export``-based exporter (``dynamo=True``), input ``images`` (N, 3, H,
W) with a dynamic batch axis, output ``embeddings`` (N, D), the checkpoint's input size and
normalisation in ``metadata_props``. TorchScript: ``torch.jit.trace``, the same metadata as
``facetrain.json`` in the archive's extra files (TorchScript is deprecated in PyTorch 2.9+;
prefer ONNX).

The exported model is run on real face images at batch 1 and at a larger batch (which proves the
batch axis is dynamic) and compared with PyTorch; the file is written under a temporary name
and renamed into place only when the largest absolute difference and the smallest cosine
similarity are within tolerance.
"""

import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn

from facetrain import __version__
from facetrain.checkpoint import CheckpointError, load_backbone
from facetrain.data.image_list import ImageListDataset, list_images
from facetrain.data.images import DatasetError
from facetrain.data.synthetic import draw_face, sample_traits
from facetrain.embed import preprocessing

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
METADATA_FILE = "facetrain.json"  # TorchScript extra file holding the metadata
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}


class ExportError(RuntimeError):
    """The backbone could not be exported, or the exported model disagrees with PyTorch."""


@dataclass(frozen=True)
class Parity:
    """Exported model vs PyTorch on the same preprocessed images, over ``batch_sizes``."""

    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    min_cosine: float
    max_abs_embedding: float  # the scale that ``max_abs_diff`` is to be read against

    def __str__(self) -> str:
        sizes = " and ".join(map(str, self.batch_sizes))
        return (
            f"batch {sizes}: max |diff| {self.max_abs_diff:.3g} (embedding values up to "
            f"{self.max_abs_embedding:.3g}), min cosine {self.min_cosine:.7f}"
        )


def model_metadata(info: Mapping) -> dict[str, str]:
    """What a user of the exported file needs to feed it, from ``load_backbone``'s description.

    Values are strings (ONNX ``metadata_props`` hold strings); lists and configs are JSON.
    """
    return {
        "facetrain_version": __version__,
        "source_checkpoint": str(Path(info["path"]).resolve()),
        "backbone": json.dumps(info["backbone"]),
        "input_size": json.dumps([int(v) for v in info["image_size"]]),  # [H, W]
        "input_layout": "NCHW",
        "channel_order": "RGB",
        "mean": json.dumps([float(v) for v in info["mean"]]),
        "std": json.dumps([float(v) for v in info["std"]]),
        "normalization": "(pixel / 255 - mean) / std, per channel",
        "embedding_size": str(int(info["embedding_size"])),
        "embeddings_normalized": "false",  # raw embeddings: L2-normalise before cosine scores
    }


def parity_images(info: Mapping, source: str | Path | None = None, count: int = 16) -> torch.Tensor:
    """Up to ``count`` real face images, preprocessed as in evaluation: the first readable ones
    of ``source`` (a folder or list, as for ``facetrain-embed``), or, without a source, faces
    drawn by the built-in synthetic generator (fixed seed)."""
    if source is None:
        rng = np.random.default_rng(0)
        faces = [draw_face(sample_traits(rng), rng) for _ in range(count)]
    else:
        dataset = ImageListDataset(*list_images(source))
        faces = []
        for index in range(len(dataset)):
            _, image, why = dataset[index]
            if why is None:
                faces.append(image)
            if len(faces) == count:
                break
    if len(faces) < 2:
        raise DatasetError(
            f"the parity check needs at least 2 readable images (batch 1 and a larger batch); "
            f"{str(source)!r} gave {len(faces)}"
        )
    transform = preprocessing(info)
    return torch.stack([transform(image=face)["image"] for face in faces])


def _default_opset(model: onnx.ModelProto) -> int:
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _onnx_model(backbone: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """The ``torch.export``-based exporter's graph; where it cannot reach ``opset`` (it writes
    opset 18 and converts down, which fails below 17), the older TorchScript-based exporter,
    which writes opsets 7-20 natively."""
    name = type(backbone).__name__
    try:
        program = torch.onnx.export(
            backbone, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=opset, dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )
    except Exception as error:  # the exporter raises many kinds; all mean the same to the user
        summary = str(error).strip().splitlines()[0]
        raise ExportError(f"torch.onnx.export failed for {name} at opset {opset}: {summary}") \
            from error
    model = program.model_proto
    if _default_opset(model) == opset:
        return model
    log.warning(
        "the torch.export-based ONNX exporter cannot write %s at opset %d; using the "
        "TorchScript-based exporter (deprecated since PyTorch 2.9)", name, opset,
    )
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                backbone, (example,), buffer, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], opset_version=opset, dynamo=False,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    except Exception as error:
        summary = str(error).strip().splitlines()[0]
        raise ExportError(
            f"neither ONNX exporter could write {name} at opset {opset} ({summary}); choose "
            f"opset>=17"
        ) from error
    return onnx.load_model_from_string(buffer.getvalue())


def write_onnx(
    backbone: nn.Module, example: torch.Tensor, path: Path, metadata: Mapping[str, str],
    opset: int = 18,
) -> None:
    """``backbone`` → ONNX at ``path`` with a dynamic batch axis and ``metadata`` as
    ``metadata_props``; one self-contained file (no external weight data)."""
    model = _onnx_model(backbone, example, opset)
    onnx.helper.set_model_props(model, dict(metadata))
    model.doc_string = f"facetrain face embedding model: {type(backbone).__name__}"
    onnx.checker.check_model(model)
    onnx.save_model(model, path)


def write_torchscript(
    backbone: nn.Module, example: torch.Tensor, path: Path, metadata: Mapping[str, str]
) -> None:
    """``backbone`` → a traced TorchScript archive with ``metadata`` as JSON in its extra file
    ``facetrain.json``."""
    with warnings.catch_warnings():
        # Deprecated since PyTorch 2.9 (the user chose it), and the tracer's shape warnings are
        # answered by the parity check at two batch sizes.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(backbone, example, check_trace=False)  # parity checks it
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})


def onnx_runner(path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]


def torchscript_runner(path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        module = torch.jit.load(str(path), map_location="cpu")
    return lambda images: module(images).detach().numpy()


@torch.no_grad()
def check_parity(
    backbone: nn.Module, run_exported: Callable[[torch.Tensor], np.ndarray], images: torch.Tensor
) -> Parity:
    """Compare ``run_exported`` with ``backbone`` (eval mode, CPU) on the first image alone and
    on all of ``images`` as one batch."""
    batch_sizes = (1, len(images)) if len(images) > 1 else (1,)
    diff, cosine, scale = 0.0, 1.0, 0.0
    for size in batch_sizes:
        reference = backbone(images[:size]).float()
        exported = torch.from_numpy(np.asarray(run_exported(images[:size]), dtype=np.float32))
        if exported.shape != reference.shape:
            raise ExportError(
                f"the exported model returned shape {tuple(exported.shape)} for a batch of "
                f"{size}, PyTorch {tuple(reference.shape)}"
            )
        diff = max(diff, (exported - reference).abs().max().item())
        cosine = min(cosine, F.cosine_similarity(exported, reference, dim=1).min().item())
        scale = max(scale, reference.abs().max().item())
    return Parity(batch_sizes, diff, cosine, scale)


def export_backbone(
    backbone: nn.Module,
    output: str | Path,
    images: torch.Tensor,
    metadata: Mapping[str, str],
    *,
    format: str = "onnx",
    opset: int = 18,
    rtol: float = 1e-4,
    min_cosine: float = 0.9999,
) -> Parity:
    """Export ``backbone`` (in eval mode, on CPU) to ``output`` and check it on ``images``
    (preprocessed, N >= 2) against PyTorch.

    Raises ``ExportError`` when the largest absolute difference exceeds ``rtol`` times the largest
    PyTorch embedding value (relative, because un-normalised embeddings range from ~1 to ~1e3
    across backbones) or the smallest cosine similarity is below ``min_cosine``; ``output`` is then
    left as it was.
    """
    if format not in SUFFIXES:
        raise ExportError(f"format={format!r} is not one of: {', '.join(SUFFIXES)}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    backbone = backbone.cpu().eval().to(memory_format=torch.contiguous_format)
    images = images.cpu().float()
    temporary = output.with_name(output.name + ".tmp")
    try:
        if format == "onnx":
            write_onnx(backbone, images[:2], temporary, metadata, opset)
            try:
                run_exported = onnx_runner(temporary)
            except Exception as error:  # onnxruntime's errors share no base below Exception
                summary = str(error).strip().splitlines()[0]
                raise ExportError(  # e.g. opset 6: written, but below what onnxruntime runs
                    f"onnxruntime cannot run the exported {type(backbone).__name__} at opset "
                    f"{opset} ({summary}); choose opset>=17"
                ) from error
            parity = check_parity(backbone, run_exported, images)
        else:
            write_torchscript(backbone, images[:2], temporary, metadata)
            parity = check_parity(backbone, torchscript_runner(temporary), images)
        too_far = parity.max_abs_diff > rtol * parity.max_abs_embedding
        if too_far or parity.min_cosine < min_cosine:
            raise ExportError(
                f"the exported {format} model disagrees with PyTorch on {len(images)} images "
                f"({parity}); tolerance: rtol={rtol}, min_cosine={min_cosine}. Nothing was "
                f"written to {output}"
            )
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    return parity


def read_metadata(path: str | Path) -> dict[str, str]:
    """The facetrain metadata of an exported model (ONNX or TorchScript)."""
    path = Path(path)
    if path.suffix == SUFFIXES["torchscript"]:
        extra = {METADATA_FILE: ""}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        return json.loads(extra[METADATA_FILE])
    return {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}


def export_from_config(cfg: DictConfig) -> tuple[Path, Parity]:
    """Export the checkpoint a composed ``export`` config names; return the file and its parity."""
    if not cfg.checkpoint:
        raise CheckpointError(
            "no checkpoint given: facetrain-export checkpoint=outputs/train/<run> (a run folder "
            "or a .ckpt file)"
        )
    if cfg.format not in SUFFIXES:  # before the checkpoint is read
        raise ExportError(f"format={cfg.format!r} is not one of: {', '.join(SUFFIXES)}")
    backbone, info = load_backbone(cfg.checkpoint)
    images = parity_images(info, cfg.images, cfg.parity_images)
    default = Path(HydraConfig.get().runtime.output_dir) / f"backbone{SUFFIXES[cfg.format]}"
    output = Path(cfg.output) if cfg.output else default
    log.info(
        "exporting %s (%s, input %dx%d) to %s", info["path"],
        info["backbone"].get("_target_", "?"), *info["image_size"], cfg.format,
    )
    parity = export_backbone(
        backbone, output, images, model_metadata(info), format=cfg.format, opset=cfg.opset,
        rtol=cfg.rtol, min_cosine=cfg.min_cosine,
    )
    runtime = "onnxruntime" if cfg.format == "onnx" else "TorchScript"
    what = "synthetic faces" if cfg.images is None else f"images from {cfg.images}"
    log.info("%s vs PyTorch on %d %s, %s", runtime, len(images), what, parity)
    log.info("wrote %s", output)
    return output, parity
