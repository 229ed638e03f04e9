"""Multiplicative angular margin with annealing: L-Softmax (Liu et al., ICML 2016) and
A-Softmax / SphereFace (Liu et al., CVPR 2017).

``psi(theta) = (-1)^k cos(m·theta) - 2k`` for ``theta in [k·pi/m, (k+1)·pi/m]`` is monotonically
decreasing on [0, pi]. ``cos(m·theta)`` comes from the Chebyshev polynomial of cos theta and k
from the thresholds ``cos(k·pi/m)``, so no acos is needed. Training anneals from softmax
towards psi: ``T = (lambda·cos_y + psi(theta_y)) / (1 + lambda)`` with
``lambda = max(lambda_min, base·(1 + gamma·iteration)^(-power))`` (the Caffe layer's schedule;
iteration counts optimizer steps, also under gradient accumulation: the step in progress is
iteration ``global_step + 1``, as the Caffe layer counts its first forward 1). ``base=0,
lambda_min=0`` gives the un-annealed loss.
"""

import math

import torch

from facetrain.heads.base import CenterCosines, Margin

# cos(m·theta) as a polynomial of c = cos(theta) (Chebyshev polynomials of the first kind).
CHEBYSHEV = {
    1: lambda c: c,
    2: lambda c: 2 * c**2 - 1,
    3: lambda c: 4 * c**3 - 3 * c,
    4: lambda c: 8 * c**4 - 8 * c**2 + 1,
}


def psi(cos: torch.Tensor, margin: int) -> torch.Tensor:
    """``(-1)^k cos(m·theta) - 2k`` from cos theta, for integer margins 1..4."""
    if margin not in CHEBYSHEV:
        raise ValueError(f"the multiplicative margin m must be 1, 2, 3 or 4, got {margin}")
    k = torch.zeros_like(cos)
    for j in range(1, margin):
        k = k + (cos <= math.cos(j * math.pi / margin)).to(cos.dtype)
    sign = 1.0 - 2.0 * torch.remainder(k, 2)
    return sign * CHEBYSHEV[margin](cos) - 2.0 * k


class AnnealedAngularMargin(Margin):
    """Shared by L-Softmax and SphereFace: psi target, annealed lambda, iteration buffer."""

    def __init__(self, margin: int, base: float, gamma: float, power: float, lambda_min: float):
        super().__init__(scale=1.0)
        psi(torch.zeros(1), margin)  # validates the margin now, not at the first step
        self.margin = margin
        self.base, self.gamma, self.power, self.lambda_min = base, gamma, power, lambda_min
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def annealed_lambda(self) -> torch.Tensor:
        """lambda as a tensor on the buffer's device: reading it costs no host sync per step."""
        annealed = self.base * (1.0 + self.gamma * self.iteration.double()) ** (-self.power)
        return annealed.clamp_min(self.lambda_min)

    @property
    def lambda_(self) -> float:
        return float(self.annealed_lambda())

    def set_step(self, step: int) -> None:
        # A host-to-device fill, not a device-to-host wait: the counter follows the trainer's
        # optimizer steps exactly (accumulation, resume) instead of counting forwards.
        self.iteration.fill_(step + 1)

    def target_logit(self, cos_y: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        lam = self.annealed_lambda().to(cos_y.dtype)
        return (lam * cos_y + psi(cos_y, self.margin)) / (1.0 + lam)

    def state_metrics(self) -> dict[str, torch.Tensor]:
        return {"lambda": self.annealed_lambda().detach()}


class LSoftmax(AnnealedAngularMargin):
    """L-Softmax: weights and features un-normalised, ``logit_j = |W_j||x| cos_j`` and the
    target ``|W_y||x| psi(theta_y)`` (annealed). No bias, as in the paper. Needs every class
    center's norm, so it runs on the full class-center store only."""

    stores = ("full",)
    fused = False  # the scale |W_j||x| differs by class: the reference path

    def __init__(
        self,
        margin: int = 2,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 0.0,
    ):
        super().__init__(margin, base, gamma, power, lambda_min)

    def unmargined(self, c: CenterCosines) -> torch.Tensor:
        return c.cos * c.center_norms  # the row factor |x| does not change the argmax

    def logit_scale(self, norms: torch.Tensor, center_norms: torch.Tensor) -> torch.Tensor:
        return norms * center_norms


class SphereFace(AnnealedAngularMargin):
    """A-Softmax: class weights normalised, no bias, ``logit_j = |x| cos_j`` and the target
    ``|x| psi(theta_y)`` (annealed). Paper: m=4; lambda base 1000, gamma 0.12, power 1, min 5."""

    def __init__(
        self,
        margin: int = 4,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
    ):
        super().__init__(margin, base, gamma, power, lambda_min)

    def logit_scale(self, norms: torch.Tensor, center_norms: torch.Tensor) -> torch.Tensor:
        return norms
