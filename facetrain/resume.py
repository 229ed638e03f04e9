"""Resuming a training run exactly: which checkpoint to resume from, and the random state that
travels with it.

A run resumes from (first that applies):

- ``ckpt_path=<file>``: that checkpoint;
- ``resume=<run folder>`` or ``ckpt_path=last``: the newest complete checkpoint of that run
  folder (``last``: of this run's own folder);
- nothing given, but this run's folder already holds checkpoints — a requeued SLURM job, or the
  same command run again with the same ``hydra.run.dir``: the newest of them, without any user
  action.

Every candidate is read with ``torch.load(weights_only=True)`` before Lightning sees it
(``checkpoint.read_checkpoint``): a file that holds pickled code is refused before anything in
it runs, and one that cannot be read (a disk that filled up mid-write) is skipped for the next
newest.

The position in the epoch travels in the train loader's state (``facetrain.data``), the learning
rate schedule in the scheduler's (``facetrain.optim``), the margin's state in the module's
buffers; ``RandomState`` adds every rank's random number generators.
"""

import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states
from pytorch_lightning import Callback, LightningModule, Trainer

from facetrain.checkpoint import CheckpointError, UnsafeCheckpointError, read_checkpoint
from facetrain.distributed import is_distributed

log = logging.getLogger(__name__)

CHECKPOINT_FOLDER = "checkpoints"


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The most recently written readable checkpoint of a run folder (or of a checkpoints
    folder), or None when it holds none. Unreadable files are skipped with a warning; a file
    with pickled code raises ``CheckpointError``."""
    run_dir = Path(run_dir).expanduser()
    folder = run_dir / CHECKPOINT_FOLDER if (run_dir / CHECKPOINT_FOLDER).is_dir() else run_dir
    # Writes are atomic (write .tmp, rename): a .ckpt is never half-written by facetrain.
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in candidates:
        try:
            read_checkpoint(candidate)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as error:
            log.warning("skipping checkpoint %s: %s", candidate, error)
            continue
        return candidate
    return None


def resume_checkpoint(ckpt_path: str | None, resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint this run resumes from (see the module docstring), checked safe to load;
    None to start afresh."""
    if ckpt_path is not None and resume is not None:
        raise CheckpointError(
            f"both ckpt_path={ckpt_path!r} and resume={resume!r} are set; give one: a checkpoint "
            f"file (ckpt_path=...) or a run folder to continue (resume=...)"
        )
    if ckpt_path not in (None, "last"):
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
        read_checkpoint(path)
        return path
    folder = Path(resume).expanduser() if resume is not None else run_dir
    if resume is not None and not folder.is_dir():
        raise CheckpointError(f"resume={resume!r}: no such run folder")
    found = newest_checkpoint(folder) if folder.is_dir() else None
    if found is None and (ckpt_path == "last" or resume is not None):
        raise CheckpointError(
            f"no readable checkpoint in {str(folder)!r} (looked for {CHECKPOINT_FOLDER}/*.ckpt); "
            f"give the run folder of a facetrain training run"
        )
    if found is not None:
        why = "requested" if (ckpt_path or resume) else "this run folder already holds it"
        log.info("resuming from %s (%s)", found, why)
    return found


class RandomState(Callback):
    """Every rank's random number generators (Python, NumPy, torch CPU and CUDA) go into each
    checkpoint; on resume each rank gets its own back when training starts — after the model
    was rebuilt and the data loaders started, which draw from them too — so that dropout and any
    other random draw of the training processes continue as in an uninterrupted run.

    Saving is collective (every rank contributes its state; Lightning builds a checkpoint's
    contents on every rank). A resume on a different number of processes keeps the ranks that
    exist in both and leaves the others as seeded."""

    def __init__(self):
        self._to_restore: list | None = None

    def state_dict(self) -> dict:
        states = _collect_rng_states(include_cuda=True)
        # NumPy's state as plain lists: checkpoints are read with weights_only=True, which
        # refuses NumPy arrays.
        name, keys, *rest = states["numpy"]
        states["numpy"] = (name, keys.tolist(), *rest)
        if is_distributed():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            return {"ranks": gathered}
        return {"ranks": [states]}

    def load_state_dict(self, state_dict: dict) -> None:
        self._to_restore = list(state_dict.get("ranks", []))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._to_restore:
            return
        if len(self._to_restore) != trainer.world_size:
            log.warning(
                "the checkpoint holds the random state of %d process(es), this run has %d: the "
                "random draws of the others restart from the seed",
                len(self._to_restore), trainer.world_size,
            )
        if trainer.global_rank < len(self._to_restore):
            states = dict(self._to_restore[trainer.global_rank])
            name, keys, *rest = states["numpy"]
            states["numpy"] = (name, np.asarray(keys, dtype=np.uint32), *rest)
            # one CUDA generator per GPU that this process sees (maybe fewer than when saved)
            states["torch.cuda"] = states.get("torch.cuda", [])[: torch.cuda.device_count()]
            _set_rng_states(states)
        self._to_restore = None
