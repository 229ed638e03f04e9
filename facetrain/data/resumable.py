"""The training loader that Lightning resumes in the middle of an epoch: the rest of the epoch's
batches, augmented as they would have been had the run not stopped.

Lightning keeps a train loader's ``state_dict()`` in every checkpoint when the loader has one and,
resuming from a checkpoint saved mid-epoch, calls ``load_state_dict`` before it iterates the
loader (``FitLoop.setup_data``) and before it calls ``set_epoch``: the state carries the epoch.
The position saved is the trainer's count of processed batches (``progress``): the loader's own
count of batches handed out is one ahead while a batch is in training (a checkpoint saved from
``on_train_batch_start`` or an optimizer hook) and under Lightning's prefetching (which 2.6 does
only for loaders without a length).

A sample's augmentation is seeded from (seed, epoch, global position) (``SeededSamples``), so it
does not depend on which DataLoader worker loads the sample or on what that worker loaded before.
The loader draws its workers' base seed from its own generator (seeded per epoch; persistent
workers keep the seed of their first epoch), never from the
global torch RNG, which a resume restores and the loader must leave as it is.
"""

import logging
import os
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset, Sampler

from facetrain.data.images import DatasetError
from facetrain.data.samplers import GlobalOrderSampler

log = logging.getLogger(__name__)

STATE_KEYS = ("epoch", "batches_done", "samples_consumed", "epoch_samples", "world_size",
              "batch_size", "seed", "sampler", "dataset_size")
# What a resumed epoch must share with the saved one (the config key that sets it): the global
# order is drawn from the seed, the sampler and the training set, and the trainer counts batches.
MUST_MATCH = {"batch_size": "data.batch_size", "seed": "seed", "sampler": "data.sampler",
              "dataset_size": "data.train_root: the number of training images"}


# Ctrl-C reaches the whole process group, and SLURM's requeue signal every process of the job:
# a DataLoader worker that died of one would fail the main process's next fetch before it could
# save. The main process decides (facetrain.preemption) and shuts its workers down itself.
# SIGTERM too (scancel, a preemption): torch shuts its workers down through their queues, and a
# worker whose parent died exits by itself.
WORKER_IGNORES = [number for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")
                  if (number := getattr(signal, name, None)) is not None]


def _init_worker(worker_id: int, rank: int) -> None:
    for number in WORKER_IGNORES:
        signal.signal(number, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):  # what Lightning adds without our own init
        pl_worker_init_function(worker_id, rank)


class SeededSamples(Dataset):
    """``dataset`` read by the keys ``(index, (seed, epoch, position))`` of a
    ``GlobalOrderSampler``: the dataset's albumentations ``transform`` is seeded from the key
    before ``dataset[index]`` is read. A plain index reads the sample as the dataset would.
    Other attributes (``labels``, ``num_classes``, ...) are the dataset's."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            key, entropy = key
            transform = getattr(self.dataset, "transform", None)
            if hasattr(transform, "set_random_state"):
                rng = np.random.default_rng(entropy)
                # One stream for the whole pipeline: Compose.set_random_seed gives every transform
                # its own copy of one stream, so that a flip and a jitter of equal p fire together.
                transform.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        return self.dataset[key]

    def __getattr__(self, name: str):
        if name == "dataset":  # unpickling (in a spawned worker) asks before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.dataset, name)


@dataclass
class _Start:
    """Where an iteration of ``epoch`` starts: a global position, and the batches the trainer
    counts as done in the epoch by then."""

    epoch: int
    position: int = 0
    batches: int = 0


class ResumableDataLoader(DataLoader):
    """The training loader: ``dataset`` in the order of ``sampler`` (a ``GlobalOrderSampler``),
    full batches of ``batch_size``, each sample augmented from its own seed; resumable in the
    middle of an epoch through ``state_dict`` / ``load_state_dict`` (Lightning's stateful loader
    protocol).

    ``progress``, when given, returns how many batches of the current epoch the trainer has
    processed (``FaceDataModule`` passes Lightning's); without it the loader counts the batches
    it handed out. Other keyword arguments are the DataLoader's (``num_workers``, ...).

    Given another sampler (Lightning puts a ``SequentialSampler`` in for
    ``trainer.overfit_batches``) it is a plain DataLoader that does not resume: its state is
    empty.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        sampler: GlobalOrderSampler | Sampler,
        progress: Callable[[], int] | None = None,
        rank: int = 0,
        **kwargs,
    ):
        if isinstance(sampler, GlobalOrderSampler):
            if sampler.batch_size != batch_size:
                raise ValueError(f"the sampler cuts batches of {sampler.batch_size}, not "
                                 f"batch_size={batch_size}")
            sampler.yield_seeds = True  # keys (index, augmentation seed) for SeededSamples
        kwargs.setdefault("worker_init_fn", partial(_init_worker, rank=rank))
        super().__init__(
            SeededSamples(dataset), batch_size=batch_size, sampler=sampler, drop_last=True,
            generator=torch.Generator(), **kwargs,
        )
        self.resumable = isinstance(sampler, GlobalOrderSampler)
        self.progress = progress
        self._resume: _Start | None = None  # loaded, not yet iterated
        self._run = _Start(epoch=-1)  # the latest iteration's start
        self._handed_out = 0  # batches that iteration has yielded

    def __iter__(self) -> Iterator:
        if not self.resumable:
            return super().__iter__()
        sampler = self.sampler
        start = self._resume if self._resume and self._resume.epoch == sampler.epoch else None
        self._resume = None
        self._run = start or _Start(sampler.epoch)
        self._handed_out = 0
        sampler.start_at(sampler.epoch, self._run.position)
        # The workers' base seed comes from this generator: the same for an epoch however often
        # the run was resumed, and the global torch RNG is not drawn from.
        self.generator.manual_seed(
            int(np.random.SeedSequence([sampler.seed, sampler.epoch]).generate_state(1)[0])
        )
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator) -> Iterator:
        for batch in batches:
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict:
        """Where the epoch stands, and what the global order was drawn from."""
        if not self.resumable:
            return {}
        sampler = self.sampler
        if self._resume is not None and self._resume.epoch == sampler.epoch:
            at = self._resume
        elif self._run.epoch != sampler.epoch:  # set_epoch came, its iteration has not
            at = _Start(sampler.epoch)
        else:
            batches = self._run.batches + self._handed_out
            if self.progress is not None:  # the loader runs ahead of the trainer
                batches = max(min(batches, self.progress()), self._run.batches)
            at = _Start(sampler.epoch, self._run.position
                        + (batches - self._run.batches) * sampler.global_batch, batches)
        return {"epoch": at.epoch, "batches_done": at.batches, "samples_consumed": at.position,
                **self._order()}

    def _order(self) -> dict:
        """What this loader's epochs are drawn from and cut into."""
        sampler = self.sampler
        return {
            "epoch_samples": sampler.total_size,
            "world_size": sampler.num_replicas,
            "batch_size": sampler.batch_size,
            "seed": sampler.seed,
            "sampler": sampler.kind,
            "dataset_size": len(self.dataset),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved epoch where it stood: its next iteration yields the batches not
        yet read, then epochs are whole. Refuses a state whose order this loader cannot
        continue; at another world size the epoch continues with the samples not yet read."""
        if not self.resumable:
            if state:
                raise DatasetError(
                    f"cannot resume mid-epoch: the training loader reads in "
                    f"{type(self.sampler).__name__} order (trainer.overfit_batches?), not the "
                    f"checkpoint's; resume without it, or from a checkpoint saved at the end of "
                    f"an epoch"
                )
            return
        ours = self._order()
        for key in STATE_KEYS:
            if key not in state:
                raise DatasetError(
                    f"cannot resume mid-epoch: the checkpoint's train loader state has no "
                    f"{key!r}; resume from a checkpoint saved at the end of an epoch"
                )
        epoch, position, batches = state["epoch"], state["samples_consumed"], state["batches_done"]
        saved_batch = state["world_size"] * state["batch_size"]
        if position + saved_batch > state["epoch_samples"]:
            # Saved after the epoch's last batch: Lightning resumes with the next epoch, whole,
            # whatever its batch size, seed or training set.
            epoch, position, batches = epoch + 1, 0, 0
        else:
            for key, setting in MUST_MATCH.items():
                if state[key] != ours[key]:
                    raise DatasetError(
                        f"cannot resume mid-epoch: the checkpoint's train loader has {key}="
                        f"{state[key]!r}, this run {ours[key]!r} (set by {setting}); resume "
                        f"with the checkpoint's setting, or from a checkpoint saved at the end "
                        f"of an epoch"
                    )
        if position and state["world_size"] != ours["world_size"]:
            self._warn_world_change(state, position, batches)
        self._resume = _Start(epoch, position, batches)
        self.sampler.set_epoch(epoch)  # Lightning iterates before its own set_epoch

    def _warn_world_change(self, state: dict, position: int, batches: int) -> None:
        sampler = self.sampler
        remaining = sampler.remaining_batches(position)
        message = (
            f"resuming epoch {state['epoch']} at sample {position} of "
            f"{state['epoch_samples']} with {sampler.num_replicas} processes (saved with "
            f"{state['world_size']}): the epoch continues with the samples not yet read, "
            f"{remaining} batches per process, and the next epoch is whole"
        )
        trainer_left = max(len(self) - batches, 0)
        if self.progress is not None and remaining > trainer_left:
            message += (
                f"; but the trainer counts the {batches} batches done as {batches} of this "
                f"world's {len(self)} per epoch and stops after {trainer_left} more, leaving "
                f"{(remaining - trainer_left) * sampler.global_batch} samples out of this epoch"
            )
        log.warning(message)
