"""The samplers of the loaders: training epochs in one global order that every rank reads its
share of (``UniformShuffleSampler``, identity-balanced P×K ``IdentityBalancedSampler``), and
evaluation sets split over DDP ranks with every image exactly once (``ShardedSequentialSampler``).

A training epoch is one sequence of sample indices, the same on every rank, drawn from the seed
and the epoch alone; with ``G = batch_size × world size``, global batch ``b`` is positions
``[b·G, (b+1)·G)`` and rank ``r`` reads positions ``[b·G + r·batch_size, b·G + (r+1)·batch_size)``
of it. "Samples consumed globally" is then a position in that sequence, which is what resuming in
the middle of an epoch needs (``facetrain.data.resumable``), at the same or another world size.

Identity-balanced (P×K) sampling: every batch holds P identities with K images each.

Metric losses (triplet, contrastive, center) need positives in the batch; a uniform shuffle of a
folder with 10k identities almost never puts two images of one identity together. The P×K
scheme follows "In Defense of the Triplet Loss for Person Re-Identification" (Hermans et al.,
2017).
"""

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from facetrain.data.images import DatasetError


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class GlobalOrderSampler(DistributedSampler):
    """A training epoch as one global order of sample indices (``global_order``, from the seed
    and the epoch), of which rank ``rank`` of ``num_replicas`` reads its slice of every global
    batch of ``global_batch = batch_size × num_replicas`` positions; only full global batches.

    ``start_at(epoch, position)`` makes the next iteration read ``epoch`` from that global
    position on (samples consumed over all ranks; later iterations are whole): with the same
    world size the exact continuation of an interrupted epoch, with another one the positions not
    yet read, in this world's batches. It draws the order at once: the epoch read is the one set
    when the loader's iterator is made, with or without workers (a DataLoader without workers
    asks for its first indices only at its first batch). ``len()`` stays the whole epoch's.

    With ``yield_seeds`` (the training loader sets it) it yields ``(index, (seed, epoch,
    position))``: the key an augmentation of that sample is seeded from, so that it repeats
    wherever and whenever the sample is read; otherwise plain indices, for any DataLoader.

    World size and rank default to ``torch.distributed``'s when it is initialised; the seed to
    Lightning's ``PL_GLOBAL_SEED`` (``seed_everything`` exports it, and seeds
    ``DistributedSampler`` alike). A ``DistributedSampler`` so that Lightning keeps it under DDP
    instead of injecting its own; it calls ``set_epoch`` before every epoch.
    """

    kind: str  # names the order in a loader's state: a resume refuses another kind

    def __init__(
        self,
        dataset: Sequence,
        batch_size: int,
        seed: int | None,
        num_replicas: int | None,
        rank: int | None,
    ):
        world_size, world_rank = _world()
        num_replicas = world_size if num_replicas is None else num_replicas
        rank = world_rank if rank is None else rank
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.global_batch = batch_size * num_replicas
        self.yield_seeds = False
        self._next: Iterator | None = None  # drawn by start_at

    def _set_epoch_length(self, global_batches: int) -> None:
        self.total_size = global_batches * self.global_batch  # positions in an epoch
        self.num_samples = self.total_size // self.num_replicas  # of them on this rank

    def global_order(self) -> np.ndarray:
        """This epoch's sample indices over all ranks, ``total_size`` of them, in order."""
        raise NotImplementedError

    def start_at(self, epoch: int, position: int) -> None:
        """Set ``epoch`` and draw its order now; the next iteration reads it from global
        ``position`` on."""
        self.set_epoch(epoch)
        self._next = self._iteration(position)

    def remaining_batches(self, position: int) -> int:
        """Batches per rank an iteration of this epoch starting at ``position`` yields."""
        return max(self.total_size - position, 0) // self.global_batch

    def _iteration(self, position: int) -> Iterator:
        rows = np.arange(self.remaining_batches(position))[:, None] * self.global_batch
        positions = (position + self.rank * self.batch_size + rows
                     + np.arange(self.batch_size)).reshape(-1)
        indices = self.global_order()[positions].tolist()
        if not self.yield_seeds:
            return iter(indices)
        seed, epoch = self.seed, self.epoch
        keys = zip(indices, positions.tolist(), strict=True)
        return ((index, (seed, epoch, position)) for index, position in keys)

    def __iter__(self) -> Iterator:
        iteration, self._next = self._next, None
        return iteration if iteration is not None else self._iteration(0)

    def __len__(self) -> int:
        return self.num_samples


class UniformShuffleSampler(GlobalOrderSampler):
    """Every image at most once per epoch, in a uniformly random order drawn from (seed, epoch):
    one permutation of the dataset cut to whole global batches (``len(dataset) // global_batch``
    of them; the rest of the permutation waits for another epoch's order), as
    ``DataLoader(shuffle=True, drop_last=True)`` on one process and ``DistributedSampler
    (drop_last=True)`` under DDP, but reproducible per epoch and resumable within one."""

    kind = "uniform"

    def __init__(
        self,
        dataset: Sequence,
        batch_size: int,
        seed: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        super().__init__(dataset, batch_size, seed, num_replicas, rank)
        self.dataset_size = len(dataset)
        self._set_epoch_length(self.dataset_size // self.global_batch)
        if not self.total_size:
            raise DatasetError(
                f"the training set has {self.dataset_size} images, fewer than one batch on each "
                f"of the {self.num_replicas} processes (data.batch_size={batch_size}); lower "
                f"data.batch_size or add images"
            )

    def global_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.dataset_size)


class IdentityBalancedSampler(GlobalOrderSampler):
    """Indices in batches of ``batch_size = P × images_per_identity`` (K): each consecutive
    block of ``batch_size`` indices is P distinct identities × K of their images.

    Use with ``DataLoader(sampler=..., batch_size=sampler.batch_size, drop_last=True)``.

    One epoch is ``len(labels) // batch_size`` batches over all ranks (rounded down to a multiple
    of the world size, at least one per rank): about one pass over the images. Within a pass each
    identity's images are shuffled and cut into groups of K (a remainder below K waits for a
    later pass); each batch takes one group from each of P identities drawn uniformly from those
    with groups left; when fewer than P remain a new pass starts. An identity with fewer than K
    images contributes one group per pass drawn **with replacement** (repeated images; an identity
    with one image gives K copies, distinct only after augmentation).

    Distributed: every rank draws the same batches from ``seed`` and the epoch and keeps every
    ``num_replicas``-th one starting at ``rank`` (its slice of each global batch of
    ``GlobalOrderSampler``), so ranks see disjoint batches; call ``set_epoch`` before each epoch
    (Lightning does) for a new order. Batches are drawn one after another, so batch ``j`` of an
    epoch is the same at any world size: an epoch resumed at another world size continues with the
    batches not yet read.
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        images_per_identity: int = 4,
        seed: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        labels = np.asarray(labels)
        super().__init__(labels, batch_size, seed, num_replicas, rank)
        k = images_per_identity
        if k < 1 or batch_size % k:
            raise ValueError(
                f"data.sampler: batch_size={batch_size} must be a multiple of "
                f"images_per_identity={k} (batch = identities × images per identity)"
            )
        self.images_per_identity = k
        self.identities_per_batch = batch_size // k
        self.kind = f"identity_balanced(images_per_identity={k})"
        order = np.argsort(labels, kind="stable")
        boundaries = np.flatnonzero(np.diff(labels[order])) + 1
        self._members = np.split(order, boundaries) if len(order) else []
        if len(self._members) < self.identities_per_batch:
            raise DatasetError(
                f"data.sampler needs {self.identities_per_batch} identities per batch "
                f"(batch_size {batch_size} / images_per_identity {k}) but the training set has "
                f"{len(self._members)}; lower data.batch_size or raise images_per_identity"
            )
        self.batches_per_rank = max(len(labels) // batch_size // self.num_replicas, 1)
        self._set_epoch_length(self.batches_per_rank)

    def _pass(self, rng: np.random.Generator) -> list[list[np.ndarray]]:
        """Each identity's images shuffled and cut into groups of K."""
        k = self.images_per_identity
        groups = []
        for members in self._members:
            if len(members) < k:
                groups.append([rng.choice(members, size=k, replace=True)])
            else:
                shuffled = rng.permutation(members)
                groups.append(list(shuffled[: len(members) // k * k].reshape(-1, k)))
        return groups

    def batches(self) -> np.ndarray:
        """All ranks' batches of this epoch, (num_replicas × batches_per_rank, batch_size)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        p = self.identities_per_batch
        batches = []
        groups: list[list[np.ndarray]] = []
        available: list[int] = []  # identities with groups left in this pass
        for _ in range(self.batches_per_rank * self.num_replicas):
            if len(available) < p:
                groups, available = self._pass(rng), list(range(len(self._members)))
            chosen = rng.choice(len(available), size=p, replace=False)
            batches.append(np.concatenate([groups[available[i]].pop() for i in chosen]))
            for i in sorted(chosen, reverse=True):  # swap-remove the exhausted identities
                if not groups[available[i]]:
                    available[i] = available[-1]
                    available.pop()
        return np.stack(batches)

    def global_order(self) -> np.ndarray:
        return self.batches().reshape(-1)


class ShardedSequentialSampler(DistributedSampler):
    """Rank ``rank`` of ``num_replicas`` reads images ``rank, rank + num_replicas, ...`` in
    order: over the ranks every image exactly once, without the padding ``DistributedSampler``
    adds (it repeats images until every rank has as many), so ranks may differ by one image.

    For evaluation, where a repeated image would be embedded twice and a dropped one missed;
    the gatherer handles the unequal counts. It subclasses ``DistributedSampler`` so that
    Lightning keeps it instead of injecting its padding sampler.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas, rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
