"""Margins that adapt to the feature norm, a proxy for image quality: AdaFace and MagFace."""

import math

import torch

from facetrain.heads.base import (
    COS_EPS,
    CenterCosines,
    Margin,
    Reduce,
    additive_angular_margin,
    easy_margin,
)


class AdaFace(Margin):
    """AdaFace (Kim et al., CVPR 2022): ``T = cos(theta_y − m·z) − (m·z + m)`` with the
    normalised norm ``z = clip(h·(|x| − mu)/(sigma + eps), −1, 1)``; mu and sigma are EMAs
    (rate ``t_alpha``) of the norm mean and std over the global batch. High-quality
    (large-norm) samples get an angular margin, low-quality ones an additive one.
    Paper: m=0.4, h=0.333, s=64."""

    def __init__(
        self, scale: float = 64.0, margin: float = 0.4, h: float = 0.333, t_alpha: float = 0.01
    ):
        super().__init__(scale)
        self.margin, self.h, self.t_alpha = margin, h, t_alpha
        self.register_buffer("norm_mean", torch.tensor(20.0))  # initial values of the paper's code
        self.register_buffer("norm_std", torch.tensor(100.0))

    def update_state(self, cos_y: torch.Tensor, norms: torch.Tensor, reduce: Reduce) -> None:
        norms = norms.clamp(0.001, 100).double()  # sums of squares: float64 keeps the std exact
        count, total, squares = reduce(
            torch.stack([torch.ones_like(norms).sum(), norms.sum(), (norms * norms).sum()])
        )
        mean = total / count
        # In the buffers' own dtype (the module's: float32, or 16/64-bit after a model cast).
        self.norm_mean.lerp_(mean.to(self.norm_mean.dtype), self.t_alpha)
        # The spread of a single sample is undefined: keep sigma then (no host check needed).
        variance = (squares - count * mean * mean) / (count - 1).clamp_min(1)
        std = variance.clamp_min(0).sqrt().to(self.norm_std.dtype)
        self.norm_std.lerp_(torch.where(count > 1, std, self.norm_std), self.t_alpha)

    def target_logit(self, cos_y: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        z = (norms.clamp(0.001, 100) - self.norm_mean) / (self.norm_std + 1e-3)
        z = (z * self.h).clamp(-1, 1).detach()
        theta = (torch.acos(cos_y) - self.margin * z).clamp(COS_EPS, math.pi - COS_EPS)
        return torch.cos(theta) - (self.margin + self.margin * z)

    def state_metrics(self) -> dict[str, torch.Tensor]:
        return {"norm_mean": self.norm_mean.detach(), "norm_std": self.norm_std.detach()}


class MagFace(Margin):
    """MagFace (Meng et al., CVPR 2021): ArcFace with a margin growing with the feature
    magnitude ``a = clip(|x|, l_a, u_a)``: ``m(a) = l_m + (u_m − l_m)(a − l_a)/(u_a − l_a)``,
    plus the regulariser ``lambda_g·mean(1/a + a/u_a²)`` (returned by ``extra_loss``, averaged
    over this rank's own embeddings), which pushes easy samples to large norms. Paper: l_a=10,
    u_a=110, l_m=0.45, u_m=0.8, lambda_g=35, s=64.

    Past ``theta_y > pi − m(a)`` the target falls back to ``cos_y − m(a)·sin(m(a))`` as in ArcFace
    (the paper's formula, the default). ``easy_margin`` is the rule of the MagFace training code's
    default instead: the margin only where ``cos_y > 0``, ``cos_y`` elsewhere."""

    def __init__(
        self,
        scale: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = False,
    ):
        super().__init__(scale)
        self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g = l_a, u_a, l_m, u_m, lambda_g
        self.easy_margin = easy_margin

    def margin_for(self, norms: torch.Tensor) -> torch.Tensor:
        a = norms.clamp(self.l_a, self.u_a)
        return self.l_m + (self.u_m - self.l_m) * (a - self.l_a) / (self.u_a - self.l_a)

    def target_logit(self, cos_y: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        target = additive_angular_margin(cos_y, self.margin_for(norms))
        return easy_margin(cos_y, target) if self.easy_margin else target

    def extra_term(self, c: CenterCosines) -> torch.Tensor:
        a = c.local_norms.clamp(self.l_a, self.u_a)
        return self.lambda_g * (1.0 / a + a / self.u_a**2).mean()
