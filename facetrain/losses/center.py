"""Center loss (Wen, Zhang, Li & Qiao, ECCV 2016): pull every embedding to its class center."""

import torch
import torch.nn.functional as F

from facetrain.distributed import all_gather_rows, is_distributed
from facetrain.losses.base import EmbeddingLoss, LossError, LossOutput


class CenterLoss(EmbeddingLoss):
    """``½·|x − c_y|²`` averaged over the batch, beside a classification loss (the paper adds
    ``λ·`` this to softmax, λ = 0.003: the term's weight in the config).

    The centers are not trained by the network's optimizer: after each training forward they
    take the paper's own step (Algorithm 1, rate α = 0.5)::

        Δc_j = Σ_{i: y_i = j} (c_j − x_i) / (1 + n_j)        c_j ← c_j − α·Δc_j

    with ``n_j`` the images of class j in the batch — under DDP the global batch (every rank
    gathers it and takes the same step), so the replicas' centers stay equal. The loss of the
    batch is computed with the centers before the step. ``normalize``: on L2-normalised
    embeddings (beside a cosine-margin head, whose embeddings' norms are otherwise free); the
    paper's is on the raw features. Centers start at zero; they are a buffer (``centers``),
    saved in checkpoints and resumed.
    """

    needs_identity_batches = False
    needs_classification = True  # alone it collapses: every embedding onto its center

    def __init__(self, alpha: float = 0.5, normalize: bool = False):
        super().__init__()
        if not 0 < alpha <= 1:
            raise LossError(f"center loss alpha must be in (0, 1], got {alpha}")
        self.alpha, self.normalize = float(alpha), normalize
        self.register_buffer("centers", torch.zeros(0, 0))

    def bind(self, num_classes: int, embedding_size: int) -> None:
        self.centers = torch.zeros(num_classes, embedding_size)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        features = embeddings.float()
        if self.normalize:
            features = F.normalize(features, dim=1)
        squared = (features - self.centers[labels]).square().sum(dim=1)
        if self.training:
            self.update(features.detach(), labels)
        return LossOutput(0.5 * squared.mean(), {"distance": squared.detach().sqrt().mean()})

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """The paper's center step on a batch (of every rank, under DDP)."""
        if is_distributed():  # training batches are the same size on every rank
            features, labels = all_gather_rows(features), all_gather_rows(labels)
        # per-class counts without a host sync (bincount reads the largest label back on CUDA)
        counts = self.centers.new_zeros(self.centers.shape[0]).index_add_(
            0, labels, torch.ones_like(labels, dtype=self.centers.dtype))
        # row i's share of Δc_{y_i}: index_add_ sums the shares of a class's images
        shares = (self.centers[labels] - features) / (1.0 + counts[labels]).unsqueeze(1)
        self.centers.index_add_(0, labels, shares, alpha=-self.alpha)
