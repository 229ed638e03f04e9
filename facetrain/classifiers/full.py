"""The full class-center store: one (num_classes, embedding_size) matrix on every rank."""

import torch
import torch.nn.functional as F
from torch import nn

from facetrain.classifiers.base import ClassCenters, FusedInputs, best_other, margin_statistics
from facetrain.distributed import all_reduce_sum
from facetrain.heads.base import CenterCosines, Margin, Reduce, clamp_cosine


class FullClassCenters(ClassCenters):
    """Every class center on every rank (DDP replicates and all-reduces it): what one GPU or a
    few hundred thousand identities need. Runs every margin: it also holds a per-class bias
    (softmax family) and K sub-centers per class (Sub-center ArcFace) when the margin asks.

    ``weight`` is (num_classes · K, embedding_size), class-major, initialised N(0, 0.01).
    """

    name = "full"

    def __init__(
        self, embedding_size: int, num_classes: int, margin: Margin, rank: int = 0,
        world_size: int = 1, focal_gamma: float = 0.0,
    ):
        super().__init__(embedding_size, num_classes, margin, rank, world_size, focal_gamma)
        self.subcenters = margin.centers_per_class
        self.weight = nn.Parameter(torch.empty(num_classes * self.subcenters, embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if margin.class_bias else None

    def _products(self, features: torch.Tensor, normalized: bool):
        """``W_j·f`` (divided by ``|W_j|`` when ``normalized``), the max over each class's
        sub-centers, and the center norms. Dividing the product by the row norms instead of
        normalising W never materialises a normalised copy of the (C, D) matrix."""
        weight = self.weight.float()
        center_norms = weight.norm(dim=1).clamp_min(1e-12)
        product = F.linear(features, weight)
        if normalized:
            product = product / center_norms
        if self.subcenters > 1:
            product = product.view(-1, self.num_classes, self.subcenters).amax(dim=2)
            # per class, the largest sub-center norm (no margin of this store reads it)
            center_norms = center_norms.view(self.num_classes, self.subcenters).amax(dim=1)
        return product, center_norms

    def cosines(self, embeddings: torch.Tensor, labels: torch.Tensor, margin: Margin
                ) -> CenterCosines:
        x = embeddings.float()
        norms = x.norm(dim=1, keepdim=True)
        cos, center_norms = self._products(margin.features(x), margin.normalized_centers)
        if self.bias is not None:
            cos = cos + self.bias.float()
        index = labels.view(-1, 1)
        return CenterCosines(cos, clamp_cosine(cos.gather(1, index)), index, norms,
                             center_norms, norms)

    @property
    def centers_per_class(self) -> int:
        return self.subcenters

    def fused_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor, margin: Margin
                     ) -> FusedInputs:
        x = embeddings.float()
        norms = x.norm(dim=1, keepdim=True)
        features, weight = margin.features(x), self.weight.float()
        index = labels.view(-1, 1)
        return FusedInputs(features, weight, target_cosines(features, weight, index,
                                                            self.subcenters),
                           index, norms, norms)

    def state_reduce(self) -> Reduce:
        return all_reduce_sum  # each rank scored its own rows: sum the statistics over ranks

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor, margin: Margin
               ) -> torch.Tensor:
        """The (N, num_classes) logits the cross-entropy is taken of (training advances the
        margin's state, as in ``forward``)."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.margin_logits(self.cosines(embeddings, labels, margin), margin)

    @torch.no_grad()
    def summarize(self, c: CenterCosines, margin: Margin, embeddings: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
        cos = c.cos
        if not margin.normalized_centers:  # plain products: the angles need the cosines
            cos, _ = self._products(F.normalize(embeddings.float(), dim=1), normalized=True)
        cos = cos.detach()
        cos_y = clamp_cosine(cos.gather(1, c.index))
        scores = margin.unmargined(c).detach()
        correct = scores.gather(1, c.index).squeeze(1) > best_other(scores, c.index)
        target = margin.target_logit(cos_y, c.norms).squeeze(1)
        return margin_statistics(cos_y.squeeze(1), best_other(cos, c.index), correct, target)


@torch.no_grad()
def target_cosines(features: torch.Tensor, weight: torch.Tensor, column: torch.Tensor,
                   subcenters: int = 1) -> torch.Tensor:
    """Each row's cosine (rows, 1) to the center in its ``column`` of ``weight`` (the max over
    the class's K sub-centers), unclamped: N·K·D work instead of a gather from (N, C)."""
    rows = weight.view(-1, subcenters, weight.shape[1])[column.view(-1)]
    dots = torch.bmm(rows, features.unsqueeze(2)).squeeze(2)
    return (dots / rows.norm(dim=2).clamp_min(1e-12)).amax(dim=1, keepdim=True)
