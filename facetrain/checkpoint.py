"""Checkpoints: written atomically, self-describing, and read back safely.

Every training checkpoint carries ``checkpoint["facetrain"]``, plain containers only (see
``describe_model``): the resolved backbone and loss configs, the input size and normalisation,
the embedding size and the number of classes. ``load_backbone`` rebuilds the backbone from it
without the training config, reading the file with ``torch.load(weights_only=True)``: tensors
and plain containers only, never arbitrary pickled objects.
"""

import json
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object, instantiate
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import nn

log = logging.getLogger(__name__)

METADATA_KEY = "facetrain"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that is missing, unsafe, not ours, or does not fit the requested model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holding pickled objects that could run code: never loaded."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<name>.tmp`` beside the target, flush it to disk (fsync), then rename it over
    the target (atomic on POSIX) and fsync the folder: a process killed at any point, or a
    machine that loses power, leaves the previous checkpoint whole.

    Remote paths (``s3://`` and other fsspec URLs) go to Lightning's own writer unchanged.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
            _fsync_folder(path.parent)  # makes the rename itself durable
        finally:
            temporary.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    try:  # Windows cannot open a folder, some network file systems cannot fsync one
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def describe_model(cfg: DictConfig, embedding_size: int, num_classes: int) -> dict:
    """What a checkpoint must carry to rebuild and check its model, from a training config.

    Paths of verification sets are made absolute so that a later evaluation finds them from any
    working directory.
    """

    def plain(node) -> Any:
        return OmegaConf.to_container(node, resolve=True) if node is not None else None

    data = cfg.get("data") or {}
    verification = plain(data.get("verification")) or {}
    verification = {name: _absolute_paths(spec) for name, spec in verification.items()}
    return {
        "version": FORMAT_VERSION,
        "backbone": plain(cfg.backbone),
        "loss": plain(cfg.get("loss")),
        "auxiliary": plain(cfg.get("auxiliary")) or {},
        "embedding_size": int(embedding_size),
        "num_classes": int(num_classes),
        "data": {
            "image_size": list(plain(data.get("image_size")) or (112, 112)),
            "mean": list(plain(data.get("mean")) or (0.5, 0.5, 0.5)),
            "std": list(plain(data.get("std")) or (0.5, 0.5, 0.5)),
            "verification": verification,
        },
    }


def _absolute_paths(spec):
    """A verification set's spec (a path, or a mapping whose ``path``/``pairs``/``images`` are
    paths) with existing relative paths made absolute."""
    if isinstance(spec, str):
        return str(Path(spec).resolve()) if Path(spec).exists() else spec
    if isinstance(spec, dict):
        return {k: _absolute_paths(v) if k in ("path", "pairs", "images") else v
                for k, v in spec.items()}
    return spec


def config_differences(stored: Mapping, given: Mapping, prefix: str = "") -> list[str]:
    """Keys whose values differ between two nested configs, as ``key: stored X, given Y`` lines.

    Only keys present in ``given`` are compared: a user who names some keys asserts those.
    """
    differences = []
    for key, value in given.items():
        name = f"{prefix}{key}"
        if key not in stored:
            differences.append(f"{name}: not in the checkpoint, given {value!r}")
        elif isinstance(value, Mapping) and isinstance(stored[key], Mapping):
            differences.extend(config_differences(stored[key], value, prefix=f"{name}."))
        elif _normalise(stored[key]) != _normalise(value):
            differences.append(f"{name}: checkpoint {stored[key]!r}, given {value!r}")
    return differences


def _normalise(value):
    """Lists and tuples compare equal (YAML gives lists, constructors often keep tuples)."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint file itself, or for a run directory its best checkpoint (else last.ckpt)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist; give a .ckpt file or a training run folder "
            f"(outputs/train/<run>)"
        )
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    best = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
    chosen = best[-1] if best else folder / "last.ckpt"
    recorded = _recorded_best(path / "metrics.json")  # with save_top_k > 1, several best*
    if recorded is not None and recorded.parent == folder.resolve() and recorded.is_file():
        chosen = recorded
    if not chosen.is_file():
        raise CheckpointError(
            f"no checkpoint in {str(path)!r}: expected checkpoints/best*.ckpt or "
            f"checkpoints/last.ckpt of a facetrain training run"
        )
    log.info("%s: using checkpoint %s", path, chosen)
    return chosen


def _recorded_best(metrics_file: Path) -> Path | None:
    """The best checkpoint a finished training run recorded in its metrics.json, if any."""
    try:
        return Path(json.loads(metrics_file.read_text())["best"]["checkpoint"]).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return None


def safe_load(path: Path, map_location: str | torch.device = "cpu", what: str = "checkpoint"):
    """``torch.load(weights_only=True)``: tensors and plain containers only, never pickled
    objects (``UnsafeCheckpointError``); an unreadable file is a ``CheckpointError`` naming it as
    a PyTorch ``what``. Memory-mapped, so a Partial-FC head of millions of classes is never read
    into memory just to get the backbone (needs the zip format torch.save writes since 1.6)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True,
                          mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers, "
            f"which could run code when unpickled ({reason})"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable PyTorch {what}: {error}") from None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a facetrain checkpoint with ``weights_only=True`` and check its metadata."""
    path = find_checkpoint(path)
    checkpoint = safe_load(path, map_location)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    metadata = checkpoint.get(METADATA_KEY)
    if not isinstance(metadata, dict):
        raise CheckpointError(
            f"{path} carries no facetrain model description (checkpoint['{METADATA_KEY}']): it "
            f"was not written by facetrain training, so the backbone cannot be rebuilt from it"
        )
    if metadata.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer facetrain (checkpoint format "
            f"{metadata.get('version')}, this one reads {FORMAT_VERSION}); upgrade facetrain"
        )
    return checkpoint


def check_targets(config: Any, where: str) -> None:
    """Refuse any ``_target_`` in a stored config that is not an ``nn.Module`` class.

    ``weights_only`` stops pickled code, but ``instantiate`` calls whatever ``_target_`` names
    (``os.system`` with arguments, say); a checkpoint may only name network layers.
    """
    if isinstance(config, Mapping):
        if "_target_" in config:
            target = config["_target_"]
            try:
                located = get_object(target)
            except Exception as error:
                raise CheckpointError(f"{where}: cannot import {target!r}: {error}") from None
            if not (isinstance(located, type) and issubclass(located, nn.Module)):
                raise CheckpointError(
                    f"{where}: _target_ {target!r} is not a torch.nn.Module class; refusing to "
                    f"call it"
                )
        for value in config.values():
            check_targets(value, where)
    elif isinstance(config, (list, tuple)):
        for value in config:
            check_targets(value, where)


def state_dict_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """The first missing, unexpected or differently shaped tensors, or None when they fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{label}: {', '.join(keys[:3])}{more}")
    return "; ".join(problems) or None


def upgrade_state_dict(state: dict) -> dict:
    """Checkpoints written before the class-center/margin split kept the class centers in the
    head (``head.weight``, ``head.bias``); they now live in the classifier. Renamed in place,
    so old runs resume and evaluate as before."""
    if not any(key.startswith("classifier.") for key in state):
        for name in ("weight", "bias"):
            if f"head.{name}" in state:
                state[f"classifier.{name}"] = state.pop(f"head.{name}")
    return state


def check_resume(checkpoint: Mapping, description: Mapping, model: nn.Module) -> None:
    """Before Lightning restores ``model`` from ``checkpoint``: fail clearly if the weights
    cannot fit (naming the config keys that differ and the first mismatching tensors); only
    warn when the configs differ in ways that leave every tensor's shape intact (a changed
    margin, say, is a legitimate fine-tuning choice)."""
    stored = checkpoint.get(METADATA_KEY)
    differences = []
    if isinstance(stored, Mapping):
        stored = {"auxiliary": {}, **stored}  # written before auxiliary loss terms existed
        for key in ("backbone", "loss", "auxiliary", "embedding_size", "num_classes"):
            if key in description:
                differences += config_differences(stored, {key: description[key]})
    mismatch = state_dict_mismatch(model, checkpoint["state_dict"])
    changed = "; ".join(differences) or "no facetrain description in the checkpoint"
    if mismatch:
        raise CheckpointError(
            f"cannot resume: the checkpoint's weights do not fit this run's model. Config "
            f"differences (checkpoint vs this run): {changed}. Tensors: {mismatch}"
        )
    if differences:
        log.warning("resuming with a changed config (checkpoint vs this run): %s", changed)


def load_backbone(
    path: str | Path,
    expected_backbone: Mapping | None = None,
    expected_loss: Mapping | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, dict]:
    """Rebuild a trained backbone from a facetrain checkpoint (file or run directory).

    Returns the backbone in eval mode and a description: ``path``, ``backbone`` and ``loss``
    (configs), ``image_size``, ``mean``, ``std``, ``embedding_size``, ``num_classes``, ``data``,
    ``epoch``, ``global_step``. ``expected_backbone`` / ``expected_loss`` are configs the caller
    expects (only the keys given are compared; ``${data.image_size}`` and other ``${data.*}``
    interpolations resolve against the checkpoint's data settings); a difference is an error
    naming the keys.
    """
    path = find_checkpoint(path)
    checkpoint = read_checkpoint(path, map_location)
    metadata = checkpoint[METADATA_KEY]
    for part, expected in (("backbone", expected_backbone), ("loss", expected_loss)):
        if expected is None:
            continue
        root = OmegaConf.create({"data": metadata["data"], part: expected})
        differences = config_differences(
            metadata.get(part) or {}, OmegaConf.to_container(root[part], resolve=True)
        )
        if differences:
            raise CheckpointError(
                f"{path} was trained with a different {part} config than the one given: "
                + "; ".join(differences)
            )
    backbone_cfg = metadata["backbone"]
    check_targets(backbone_cfg, f"{path} backbone config")
    # The checkpoint's weights replace any pretrained ones: do not download those again.
    backbone = instantiate({**backbone_cfg, **({"pretrained": False}
                                              if backbone_cfg.get("pretrained") else {})})
    state = {
        key.removeprefix("backbone."): value
        for key, value in checkpoint["state_dict"].items() if key.startswith("backbone.")
    }
    mismatch = state_dict_mismatch(backbone, state)
    if mismatch:
        raise CheckpointError(
            f"{path}: the stored weights do not fit the backbone rebuilt from the stored config "
            f"({backbone_cfg}): {mismatch}"
        )
    backbone.load_state_dict(state, strict=True)
    backbone.to(map_location).eval()
    data = metadata["data"]
    info = {
        "path": str(path),
        "backbone": backbone_cfg,
        "loss": metadata.get("loss"),
        "image_size": list(data["image_size"]),
        "mean": list(data["mean"]),
        "std": list(data["std"]),
        "embedding_size": metadata["embedding_size"],
        "num_classes": metadata["num_classes"],
        "data": data,
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "version": metadata["version"],
    }
    return backbone, info
