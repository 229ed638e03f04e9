"""The samplers of the loaders: identity-balanced (P×K) training batches, and evaluation sets
split over DDP ranks with every image exactly once (``ShardedSequentialSampler``).

Identity-balanced (P×K) sampling: every batch holds P identities with K images each.

Metric losses (triplet, contrastive, center) need positives in the batch; a uniform shuffle of a
folder with 10k identities almost never puts two images of one identity together. The P×K
scheme follows "In Defense of the Triplet Loss for Person Re-Identification" (Hermans et al.,
2017).
"""

import os
from collections.abc import Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from facetrain.data.images import DatasetError


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class IdentityBalancedSampler(DistributedSampler):
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
    ``num_replicas``-th one starting at ``rank``, so ranks see disjoint batches; call
    ``set_epoch`` before each epoch (Lightning does) for a new order. World size and rank default
    to ``torch.distributed``'s when it is initialised. It subclasses ``DistributedSampler`` so
    that Lightning leaves it as it is instead of wrapping it in another distributed sampler.
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
        world_size, world_rank = _world()
        num_replicas = world_size if num_replicas is None else num_replicas
        rank = world_rank if rank is None else rank
        # Lightning's seed_everything exports PL_GLOBAL_SEED; it seeds DistributedSampler alike.
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        labels = np.asarray(labels)
        super().__init__(labels, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        k = images_per_identity
        if k < 1 or batch_size % k:
            raise ValueError(
                f"data.sampler: batch_size={batch_size} must be a multiple of "
                f"images_per_identity={k} (batch = identities × images per identity)"
            )
        self.batch_size, self.images_per_identity = batch_size, k
        self.identities_per_batch = batch_size // k
        order = np.argsort(labels, kind="stable")
        boundaries = np.flatnonzero(np.diff(labels[order])) + 1
        self._members = np.split(order, boundaries) if len(order) else []
        if len(self._members) < self.identities_per_batch:
            raise DatasetError(
                f"data.sampler needs {self.identities_per_batch} identities per batch "
                f"(batch_size {batch_size} / images_per_identity {k}) but the training set has "
                f"{len(self._members)}; lower data.batch_size or raise images_per_identity"
            )
        total = max(len(labels) // batch_size // num_replicas, 1) * num_replicas
        self.batches_per_rank = total // num_replicas

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

    def __iter__(self):
        return iter(self.batches()[self.rank :: self.num_replicas].reshape(-1).tolist())

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size


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
