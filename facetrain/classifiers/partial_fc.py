"""Partial-FC (An et al., "Partial FC: Training 10 Million Identities on a Single Machine",
ICCVW 2021; insightface arcface_torch ``partial_fc_v2.py``), on Lightning's DDP.

Rank r of W holds the ``C // W + (r < C % W)`` consecutive classes starting at
``r·(C // W) + min(r, C % W)``. Each step the embeddings and labels of the global batch are
all-gathered (the embeddings with their gradient); each rank keeps every positive class of the
global batch that it owns plus random negatives, up to ``sample_rate`` of its classes, redrawn
every step; the cross-entropy is distributed over the shards (``distributed.py``). At
``sample_rate=1`` the loss equals the full-matrix loss to float precision.

Centers not sampled in a step get a zero gradient, but they are still parameters of the
optimizer: weight decay still shrinks them and momentum (SGD's buffer, AdamW's moments) still
moves them, exactly as in arcface_torch v2 (one dense ``weight`` parameter, sampled by index).

Checkpoints hold the whole (num_classes, embedding_size) matrix, gathered from the shards when
saved and cut to this rank's rows when loaded, and the optimizer state of the centers likewise
(``full_rows`` / ``own_rows``): a run saved at one world size resumes at any other, and
``facetrain-eval`` / export read it like any other checkpoint.
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn

from facetrain.classifiers.base import (
    ClassCenters,
    ClassifierError,
    FusedInputs,
    best_other,
    margin_statistics,
)
from facetrain.classifiers.full import target_cosines
from facetrain.distributed import (
    all_gather_rows,
    all_reduce_sum,
    gather_with_gradient,
    is_distributed,
    sharded_cross_entropy,
)
from facetrain.heads.base import CenterCosines, Margin, clamp_cosine

log = logging.getLogger(__name__)


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """First class and number of classes rank ``rank`` of ``world_size`` holds."""
    per_rank, extra = divmod(num_classes, world_size)
    return rank * per_rank + min(rank, extra), per_rank + (rank < extra)


class PartialFC(ClassCenters):
    """Class centers sharded over the ranks, a sampled subset of negatives per step.

    ``sample_rate`` in (0, 1]: the share of this rank's centers scored per training step
    (arcface_torch: 0.1 to 0.3; 1.0 = every center, the full-FC loss). Every positive class
    of the global batch is always sampled: if the global batch has more rows than the sampled
    count, the count grows to the batch (logged once). Evaluation-mode forwards score every
    center this rank holds.
    """

    name = "partial_fc"
    sharded = True

    def __init__(
        self, embedding_size: int, num_classes: int, margin: Margin, sample_rate: float = 0.1,
        rank: int = 0, world_size: int = 1, focal_gamma: float = 0.0,
    ):
        super().__init__(embedding_size, num_classes, margin, rank, world_size, focal_gamma)
        if not 0.0 < sample_rate <= 1.0:
            raise ClassifierError(
                f"classifier.sample_rate must be in (0, 1], got {sample_rate}"
            )
        if num_classes < world_size:
            raise ClassifierError(
                f"classifier=partial_fc needs at least one class per rank: {num_classes} "
                f"classes on {world_size} ranks"
            )
        self.sample_rate = sample_rate
        self.class_start, self.num_local = shard_range(num_classes, rank, world_size)
        self.num_sample = max(1, int(sample_rate * self.num_local))
        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self._batch_size: int | None = None  # per-rank batch, checked equal on the first step
        self._warned_count = False  # the sampled count grew to the global batch (said once)
        if world_size > 1:
            # A margin parameter (learnt scale) gets from each rank the gradient of its shard's
            # logits only; DDP averages, so scale by W to make that average the sum.
            for parameter in margin.parameters():
                if parameter.requires_grad:
                    parameter.register_hook(lambda grad: grad * world_size)

    # -- the batch ---------------------------------------------------------------------------

    def _check_batch(self, embeddings: torch.Tensor) -> None:
        """The all-gather needs the same per-rank batch size on every rank: checked across
        ranks once (the one host sync), then against that size locally (free)."""
        size = embeddings.shape[0]
        if self._batch_size is None and is_distributed():
            sizes = all_gather_rows(torch.tensor([size], device=embeddings.device)).tolist()
            if len(set(sizes)) > 1:
                raise ClassifierError(
                    f"classifier=partial_fc needs the same batch size on every rank, got "
                    f"{sizes}: keep the training loader's drop_last=true and equal shards"
                )
        elif self._batch_size is not None and size != self._batch_size:
            raise ClassifierError(
                f"classifier=partial_fc needs a fixed per-rank batch size (first {self._batch_size}"
                f", now {size}): keep the training loader's drop_last=true"
            )
        self._batch_size = size

    def _sample(self, local_labels: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        """Sorted indices of the centers scored this step: every held positive plus random
        negatives (no host sync: positives get a score above every random one)."""
        count = min(self.num_local, max(self.num_sample, local_labels.numel()))
        if count != self.num_sample and not self._warned_count:
            log.warning(
                "partial_fc: %d sampled centers per rank cannot hold the %d positives of a "
                "global batch; sampling %d", self.num_sample, local_labels.numel(), count,
            )
            self._warned_count = True
        score = torch.rand(self.num_local, device=local_labels.device)
        positive = torch.where(held, 2.0, 0.0)  # amax with 0 leaves a random score unchanged
        score.scatter_reduce_(0, local_labels.clamp(0, self.num_local - 1), positive, "amax")
        return score.topk(count).indices.sort().values

    def _step_centers(self, embeddings: torch.Tensor, labels: torch.Tensor):
        """The global batch and the centers scored this step: float32 embeddings x (their
        norms, and those of this rank's own rows), the (sampled) float32 weight, and each row's
        target column in it, -1 where another rank holds the target (``index``, (rows, 1))."""
        x = embeddings.float()
        local_norms = x.norm(dim=1, keepdim=True)
        if is_distributed():
            self._check_batch(x)
            x, labels = gather_with_gradient(x), all_gather_rows(labels)
        # On the global labels: every rank fails on a bad label, none waits in a collective.
        torch._assert_async(
            ~self.labels_outside(labels).any(),
            f"a label is outside [0, {self.num_classes}) (the classifier's num_classes)",
        )
        local_labels = labels - self.class_start
        held = (local_labels >= 0) & (local_labels < self.num_local)
        weight = self.weight
        column = local_labels.clamp(0, self.num_local - 1)
        if self.training and self.num_sample < self.num_local:
            sampled = self._sample(local_labels, held)
            weight = weight[sampled]
            column = torch.searchsorted(sampled, column).clamp_max(sampled.numel() - 1)
        index = torch.where(held, column, -1).view(-1, 1)
        return x, x.norm(dim=1, keepdim=True), local_norms, weight.float(), index

    @staticmethod
    def _global_target(cos_y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Every rank needs every row's target cosine (hard-negative masks, state): the rank
        holding a row's target gives it, the others add zero."""
        cos_y = torch.where(index >= 0, cos_y, 0.0)
        if is_distributed():
            cos_y = torch.where(index >= 0, cos_y, all_reduce_sum(cos_y.detach().clone()))
        return cos_y

    def cosines(self, embeddings: torch.Tensor, labels: torch.Tensor, margin: Margin
                ) -> CenterCosines:
        x, norms, local_norms, weight, index = self._step_centers(embeddings, labels)
        center_norms = weight.norm(dim=1).clamp_min(1e-12)
        cos = F.linear(F.normalize(x, dim=1), weight) / center_norms
        cos_y = self._global_target(cos.gather(1, index.clamp_min(0)), index)
        return CenterCosines(cos, clamp_cosine(cos_y), index, norms, center_norms, local_norms)

    def fused_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor, margin: Margin
                     ) -> FusedInputs:
        x, norms, local_norms, weight, index = self._step_centers(embeddings, labels)
        features = F.normalize(x, dim=1)
        cos_y = target_cosines(features, weight, index.clamp_min(0))
        return FusedInputs(features, weight, self._global_target(cos_y, index), index, norms,
                           local_norms, distributed=is_distributed())

    def cross_entropy(self, logits: torch.Tensor, c: CenterCosines) -> torch.Tensor:
        if is_distributed():
            return sharded_cross_entropy(logits, c.index)
        return super().cross_entropy(logits, c)  # one process holds every target column

    @torch.no_grad()
    def summarize(self, c: CenterCosines, margin: Margin, embeddings: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
        """Statistics over the global batch and the centers scored this step (identical on
        every rank). Every margin that runs here scores by cosine."""
        cos = c.cos.detach()
        cos_negative = best_other(cos, c.index)
        if is_distributed():
            torch.distributed.all_reduce(cos_negative, torch.distributed.ReduceOp.MAX)
        cos_y = c.cos_y.detach()
        target = margin.target_logit(cos_y, c.norms).squeeze(1)
        cos_y = cos_y.squeeze(1)
        return margin_statistics(cos_y, cos_negative, cos_y > cos_negative, target)

    # -- checkpoints: the whole matrix ---------------------------------------------------------

    def full_rows(self, shard: torch.Tensor) -> torch.Tensor:
        """This rank's (num_local, ...) rows of a per-center tensor → all (num_classes, ...)
        rows, gathered from every rank (a collective: every rank calls it)."""
        if not is_distributed():
            return shard
        largest = shard_range(self.num_classes, 0, self.world_size)[1]
        padded = shard.new_zeros((largest, *shard.shape[1:]))
        padded[: shard.shape[0]] = shard
        parts = all_gather_rows(padded.unsqueeze(0))
        sizes = [shard_range(self.num_classes, r, self.world_size)[1]
                 for r in range(self.world_size)]
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    def own_rows(self, full: torch.Tensor) -> torch.Tensor:
        """The rows of a (num_classes, ...) tensor that this rank holds."""
        return full[self.class_start:self.class_start + self.num_local]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = destination[prefix + "weight"]
        destination[prefix + "weight"] = self.full_rows(weight.detach())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict and state_dict[key].shape[0] == self.num_classes:
            state_dict[key] = self.own_rows(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
