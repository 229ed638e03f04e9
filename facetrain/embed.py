"""The embeddings of a folder (or a list) of face images, computed with a trained backbone, and
what every user of a trained backbone shares: the checkpoint's preprocessing and the device.
The command line (``facetrain-embed checkpoint=RUN_OR_CKPT images=FOLDER_OR_LIST
[output=DIR]``) is ``facetrain.cli.embed``.

Writes ``embeddings.npy`` (N x D float32, row i for line i of ``index.txt``), ``index.txt`` (one
image path per line, relative to the folder or as written in the list) and, when some images
could not be read, ``skipped.txt`` (path and reason). Images are preprocessed exactly as in
evaluation: resized to the checkpoint's input size and normalised with its mean and std.
"""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from facetrain.align.inputs import image_list
from facetrain.checkpoint import CheckpointError, load_backbone
from facetrain.data.image_list import ImageListDataset, collate_readable, list_images
from facetrain.data.images import DatasetError
from facetrain.data.transforms import build_transform
from facetrain.evaluation import embed
from facetrain.progress import image_progress

log = logging.getLogger(__name__)

EMBEDDINGS_FILE = "embeddings.npy"
INDEX_FILE = "index.txt"
SKIPPED_FILE = "skipped.txt"


def resolve_device(device: str) -> torch.device:
    """``auto`` = the GPU when there is one, else the CPU; any other value as torch names it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def preprocessing(info: dict):
    """The evaluation transform of a checkpoint (``load_backbone``'s description): resize to its
    input size, normalise with its mean and std, CHW float tensor."""
    return build_transform([], info["image_size"], info["mean"], info["std"])


@dataclass
class EmbeddedImages:
    """What ``embed_images`` wrote: ``count`` rows of ``embeddings`` in the order of ``index``;
    ``skipped`` holds (path, reason) of the images that could not be read."""

    embeddings: Path
    index: Path
    count: int
    dimension: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


@torch.no_grad()
def embed_images(
    backbone: nn.Module,
    dataset: ImageListDataset,
    output_dir: str | Path,
    *,
    batch_size: int = 128,
    num_workers: int = 2,
    flip: bool = False,
    normalize: bool = True,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    progress: bool = True,
) -> EmbeddedImages:
    """Embed every readable image of ``dataset`` with ``backbone`` (in eval mode) and write the
    result to ``output_dir``.

    ``flip`` sums each image's embedding with its mirror's (flip-test fusion, as in evaluation);
    ``normalize`` then divides each row by its L2 norm, so a dot product is the cosine
    similarity. Rows go to a memory-mapped temporary file (no N x D array in memory); each
    output file appears under its final name only once complete.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    backbone = backbone.to(device).eval()
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate_readable, pin_memory=device.type == "cuda",
    )
    final = {name: output_dir / name for name in (EMBEDDINGS_FILE, INDEX_FILE, SKIPPED_FILE)}
    temporary = {name: path.with_name(path.name + ".tmp") for name, path in final.items()}
    rows: np.memmap | None = None
    embedded: list[str] = []
    skipped: list[tuple[str, str]] = []
    try:
        with image_progress() as bar:
            task = bar.add_task("embedding", total=len(dataset), visible=progress)
            for indices, images, failed in loader:
                skipped.extend((dataset.paths[index], why) for index, why in failed)
                if images is not None:
                    images = images.to(device, non_blocking=True)
                    if channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    batch = embed(backbone, images, flip)
                    if normalize:
                        batch = F.normalize(batch, dim=1)
                    if rows is None:
                        rows = np.lib.format.open_memmap(
                            temporary[EMBEDDINGS_FILE], mode="w+", dtype=np.float32,
                            shape=(len(dataset), batch.shape[1]),
                        )
                    rows[len(embedded):len(embedded) + len(batch)] = batch.cpu().numpy()
                    embedded.extend(dataset.paths[index] for index in indices.tolist())
                bar.advance(task, len(indices) + len(failed))
        if rows is None:
            raise DatasetError(
                f"none of the {len(dataset)} images under {str(dataset.root)!r} could be read "
                f"(first: {skipped[0][0]}: {skipped[0][1]}); check the paths and image files"
            )
        dimension = rows.shape[1]
        rows.flush()
        if len(embedded) < len(dataset):  # drop the rows reserved for skipped images
            compact = np.lib.format.open_memmap(
                final[EMBEDDINGS_FILE].with_name(EMBEDDINGS_FILE + ".compact.tmp"), mode="w+",
                dtype=np.float32, shape=(len(embedded), dimension),
            )
            for start in range(0, len(embedded), 65536):
                end = min(start + 65536, len(embedded))
                compact[start:end] = rows[start:end]
            compact.flush()
            os.replace(Path(compact.filename), temporary[EMBEDDINGS_FILE])
            del compact
        del rows
        temporary[INDEX_FILE].write_text("".join(f"{path}\n" for path in embedded))
        os.replace(temporary[EMBEDDINGS_FILE], final[EMBEDDINGS_FILE])
        os.replace(temporary[INDEX_FILE], final[INDEX_FILE])
        if skipped:
            temporary[SKIPPED_FILE].write_text("".join(f"{p}\t{why}\n" for p, why in skipped))
            os.replace(temporary[SKIPPED_FILE], final[SKIPPED_FILE])
        else:  # a skipped.txt from an earlier run into the same folder would mislead
            final[SKIPPED_FILE].unlink(missing_ok=True)
    finally:
        for path in [*temporary.values(), output_dir / (EMBEDDINGS_FILE + ".compact.tmp")]:
            path.unlink(missing_ok=True)
    return EmbeddedImages(
        final[EMBEDDINGS_FILE], final[INDEX_FILE], len(embedded), dimension, skipped
    )


def embed_from_config(cfg: DictConfig) -> EmbeddedImages:
    """Embed what a composed ``embed`` config names; log what was written and skipped."""
    usage = "facetrain-embed checkpoint=outputs/train/<run> images=FOLDER_OR_LIST"
    if not cfg.checkpoint:
        raise CheckpointError(f"no checkpoint given (a run folder or a .ckpt file): {usage}")
    if not cfg.images:
        raise DatasetError(
            f"no images given (a folder, searched recursively, or a text file with one image "
            f"path per line): {usage}"
        )
    backbone, info = load_backbone(cfg.checkpoint)
    root, paths = list_images(cfg.images)
    # align=true: the images are photos; each is detected and aligned first (facetrain.align).
    dataset = image_list(cfg.get("align", False), info["image_size"], root, paths,
                         preprocessing(info))
    output_dir = Path(cfg.output or HydraConfig.get().runtime.output_dir)
    device = resolve_device(cfg.device)
    log.info(
        "embedding %d image(s) from %s with %s (%s, input %dx%d) on %s",
        len(dataset), cfg.images, info["path"], info["backbone"].get("_target_", "?"),
        *info["image_size"], device,
    )
    result = embed_images(
        backbone, dataset, output_dir, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        flip=cfg.flip, normalize=cfg.normalize, device=device,
        channels_last=cfg.channels_last, progress=cfg.progress,
    )
    if result.skipped:
        shown = "; ".join(f"{path} ({why})" for path, why in result.skipped[:5])
        log.warning(
            "skipped %d unreadable image(s), listed in %s: %s%s", len(result.skipped),
            output_dir / SKIPPED_FILE, shown, " ..." if len(result.skipped) > 5 else "",
        )
    log.info(
        "wrote %s (%d x %d float32%s) and %s", result.embeddings, result.count,
        result.dimension, ", L2-normalised" if cfg.normalize else "", result.index,
    )
    return result
