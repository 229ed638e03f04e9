"""Margins that adapt to the feature norm, a proxy for image quality: AdaFace and MagFace."""

import math

import torch

from facetrain.heads.base import COS_EPS, CosineMarginHead, additive_angular_margin


class AdaFace(CosineMarginHead):
    """AdaFace (Kim et al., CVPR 2022): ``T = cos(theta_y − m·z) − (m·z + m)`` with the
    normalised norm ``z = clip(h·(|x| − mu)/(sigma + eps), −1, 1)``; mu and sigma are EMAs
    (rate ``t_alpha``) of the batch's norm mean and std. High-quality (large-norm) samples get
    an angular margin, low-quality ones an additive one. Paper: m=0.4, h=0.333, s=64."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
    ):
        super().__init__(embedding_size, num_classes, scale)
        self.margin, self.h, self.t_alpha = margin, h, t_alpha
        self.register_buffer("norm_mean", torch.tensor(20.0))  # initial values of the paper's code
        self.register_buffer("norm_std", torch.tensor(100.0))

    def update_state(self, cos_y: torch.Tensor, norms: torch.Tensor) -> None:
        norms = norms.clamp(0.001, 100)
        self.norm_mean.lerp_(norms.mean(), self.t_alpha)
        if norms.numel() > 1:  # the spread of a single sample is undefined
            self.norm_std.lerp_(norms.std(), self.t_alpha)

    def target_logit(self, cos_y: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        z = (norms.clamp(0.001, 100) - self.norm_mean) / (self.norm_std + 1e-3)
        z = (z * self.h).clamp(-1, 1).detach()
        theta = (torch.acos(cos_y) - self.margin * z).clamp(COS_EPS, math.pi - COS_EPS)
        return torch.cos(theta) - (self.margin + self.margin * z)

    def state_metrics(self) -> dict[str, float]:
        return {"norm_mean": float(self.norm_mean), "norm_std": float(self.norm_std)}


class MagFace(CosineMarginHead):
    """MagFace (Meng et al., CVPR 2021): ArcFace with a margin growing with the feature
    magnitude ``a = clip(|x|, l_a, u_a)``: ``m(a) = l_m + (u_m − l_m)(a − l_a)/(u_a − l_a)``,
    plus the regulariser ``lambda_g·mean(1/a + a/u_a²)`` (returned by ``extra_loss``), which
    pushes easy samples to large norms. Paper: l_a=10, u_a=110, l_m=0.45, u_m=0.8,
    lambda_g=35, s=64."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
    ):
        super().__init__(embedding_size, num_classes, scale)
        self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g = l_a, u_a, l_m, u_m, lambda_g

    def margin_for(self, norms: torch.Tensor) -> torch.Tensor:
        a = norms.clamp(self.l_a, self.u_a)
        return self.l_m + (self.u_m - self.l_m) * (a - self.l_a) / (self.u_a - self.l_a)

    def target_logit(self, cos_y: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        return additive_angular_margin(cos_y, self.margin_for(norms))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = super().forward(embeddings, labels)
        if self.training:
            with torch.autocast(device_type=embeddings.device.type, enabled=False):
                a = embeddings.float().norm(dim=1).clamp(self.l_a, self.u_a)
                self._extra_loss = self.lambda_g * (1.0 / a + a / self.u_a**2).mean()
        return logits
