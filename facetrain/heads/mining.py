"""Margins that also re-weight hard negatives: MV-Softmax and CurricularFace.

A non-target class is *hard* for a sample when ``cos_j > T(cos_y)``: it beats the
margin-modulated target. Both margins change only the hard non-target logits.
"""

import torch

from facetrain.heads.arcface import ArcFace
from facetrain.heads.base import Margin, Reduce, additive_angular_margin, easy_margin


class MVSoftmax(Margin):
    """MV-Softmax (Wang et al., AAAI 2020): hard negatives become ``t·cos_j + t − 1`` with a
    fixed t > 1 (paper: 1.2; large t such as 1.4 can diverge). ``target="am"``: T = cos − m
    (MV-AM, m=0.35); ``target="arc"``: T = cos(theta + m) (MV-Arc, m=0.5). Paper: s=32.

    ``easy_margin`` is the rule the MV-Softmax training code (SV-X-Softmax) defaults to: the
    margin only where ``cos_y > 0``, ``cos_y`` elsewhere (FaceX-Zoo's MV-AM tests ``cos_y > m``
    instead). As in that code, a negative is hard when it exceeds the margined target
    ``cos_y − m`` / ``cos(theta_y + m)`` whether or not the easy rule drops the margin. The
    default (false) is the paper's formula."""

    def __init__(
        self, scale: float = 32.0, margin: float = 0.35, t: float = 1.2, target: str = "am",
        easy_margin: bool = False,
    ):
        super().__init__(scale)
        if target not in ("am", "arc"):
            raise ValueError(f"MV-Softmax target must be 'am' or 'arc', got {target!r}")
        self.margin, self.t, self.target = margin, t, target
        self.easy_margin = easy_margin

    def margined(self, cos_y: torch.Tensor) -> torch.Tensor:
        if self.target == "am":
            return cos_y - self.margin
        return additive_angular_margin(cos_y, self.margin)

    def target_logit(self, cos_y: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        target = self.margined(cos_y)
        return easy_margin(cos_y, target) if self.easy_margin else target

    def hard_negative_bound(self, cos_y: torch.Tensor, norms: torch.Tensor,
                            target: torch.Tensor) -> torch.Tensor:
        return self.margined(cos_y) if self.easy_margin else target

    def hard_negative_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return self.t * cos + self.t - 1.0

    def hard_negative_slope(self, cos: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cos, self.t)


class CurricularFace(ArcFace):
    """CurricularFace (Huang et al., CVPR 2020): ArcFace target; hard negatives become
    ``cos_j·(t + cos_j)``, where t is an EMA of the batch-mean target cosine
    (``t ← alpha·t + (1 − alpha)·mean(cos_y)``, t0 = 0, alpha = 0.99; the mean is over the global
    batch under DDP). Early on t ≈ 0 down-weights hard samples; as t grows they are emphasised.
    Paper: s=64, m=0.5."""

    def __init__(self, scale: float = 64.0, margin: float = 0.5, momentum: float = 0.99):
        super().__init__(scale, margin)
        self.momentum = momentum
        self.register_buffer("t", torch.zeros(()))

    def update_state(self, cos_y: torch.Tensor, norms: torch.Tensor, reduce: Reduce) -> None:
        count = torch.ones_like(cos_y).sum()  # a device tensor: no host-made constant per step
        total = reduce(torch.stack([cos_y.sum(), count]))
        self.t.mul_(self.momentum).add_((1.0 - self.momentum) * total[0] / total[1])

    def hard_negative_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return cos * (self.t + cos)

    def hard_negative_slope(self, cos: torch.Tensor) -> torch.Tensor:
        return 2.0 * cos + self.t

    def state_metrics(self) -> dict[str, torch.Tensor]:
        return {"t": self.t.detach()}
