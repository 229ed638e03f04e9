"""Improved ResNets of ArcFace (Deng et al., "ArcFace: Additive Angular Margin Loss for Deep
Face Recognition", CVPR 2019, Sec. 3.2: "LResNet-E-IR"), also the backbone of CurricularFace,
as in insightface arcface_torch ``backbones/iresnet.py``.

Model card at 112x112, 512-D embedding, measured here with ``facetrain.backbones.complexity``;
the insightface README's "GFLOPs" are multiply-adds (GMACs), OpenVINO's are 2 per MAC:

===========  ==========  =====  ===========================================================
backbone     params      GMACs  published
===========  ==========  =====  ===========================================================
iresnet18    24.03 M     2.61   2.6 GFLOPs (arcface_torch README)
iresnet34    34.14 M     4.46   ONNX release 131 MB ≈ 34 M float32 parameters (FastDeploy)
iresnet50    43.59 M     6.31   6.3 GFLOPs (arcface_torch); 43.576 M, 12.637 GFLOPs (OpenVINO)
iresnet100   65.16 M     12.09  12.1 GFLOPs (arcface_torch); 65.131 M, 24.209 GFLOPs (OpenVINO)
iresnet200   118.83 M    23.42  23.5 GFLOPs (arcface_torch README)
===========  ==========  =====  ===========================================================

Layout: a 3x3 stride-1 stem conv → BN → PReLU (the paper's input setting "L": 112x112 keeps a
7x7 last feature map), then four stages of "IR" units, BN → 3x3 conv → BN → PReLU → 3x3 conv
(the stride) → BN, plus the identity (1x1 conv + BN when the shape changes); units per stage
18: 2,2,2,2 · 34: 3,4,6,3 · 50: 3,4,14,3 · 100: 3,13,30,3 · 200: 6,26,60,6. Output "E":
BN → Dropout → FC → BN on the flattened 512x7x7 map. Initialisation as arcface_torch: convs
N(0, 0.1), BN γ=1 β=0, the final BN's γ fixed at 1. ``zero_init_residual`` zeroes each unit's
last BN γ so every unit starts as the identity (Goyal et al., 2017; arcface_torch zeroes the
middle BN instead, which leaves the unit's output at zero too).
"""

from collections.abc import Sequence

import torch
from torch import nn

from facetrain.backbones.layers import (
    Backbone,
    EmbeddingOutput,
    check_depth,
    feature_map_size,
)

UNITS_PER_STAGE = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
STAGE_WIDTHS = (64, 128, 256, 512)


def _units_per_stage(depth: int, units: Sequence[int] | None) -> tuple[int, int, int, int]:
    """The units of each stage: the depth's, or ``units`` (arcface_torch's ``layers``) for a
    network of another depth, which must then be 2 x (all units) + 2 (the stem and the FC)."""
    if units is None:
        check_depth("IResNet", depth, UNITS_PER_STAGE)
        return UNITS_PER_STAGE[depth]
    units = tuple(int(n) for n in units)
    if len(units) != len(STAGE_WIDTHS) or min(units) < 1:
        raise ValueError(f"IResNet units must be 4 positive numbers, one per stage "
                         f"(backbone.units), got {list(units)}")
    if depth != 2 * sum(units) + 2:
        raise ValueError(f"IResNet units {list(units)} make an IResNet-{2 * sum(units) + 2}, not "
                         f"{depth}: set backbone.depth={2 * sum(units) + 2}")
    return units


class IRUnit(nn.Module):
    """Improved residual unit: BN → conv3x3 → BN → PReLU → conv3x3(stride) → BN, + shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class IResNet(Backbone):
    """IResNet-``depth`` (18, 34, 50, 100, 200): (N, 3, H, W) → (N, ``embedding_size``).

    ``units`` (4 numbers) sets the units per stage instead, as arcface_torch's ``layers``
    argument does: ``IResNet(10, units=(1, 1, 1, 1))`` is the smallest IResNet.

    ``fp16`` runs the convolutional body under autocast and the embedding layers in float32,
    the arcface_torch recipe (:class:`Backbone`). ``dropout`` is applied before the FC
    (arcface_torch: 0; the MXNet ArcFace release: 0.4 on small data sets).
    """

    def __init__(self, depth: int = 50, embedding_size: int = 512,
                 input_size: tuple[int, int] = (112, 112), dropout: float = 0.0,
                 fp16: bool = False, zero_init_residual: bool = False,
                 units: Sequence[int] | None = None):
        units = _units_per_stage(depth, units)
        super().__init__(f"IResNet-{depth}", embedding_size, input_size, fp16)
        self.depth = depth
        self.units = units
        feature_map = feature_map_size(f"IResNet-{depth}", self.input_size, "112x112")
        layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)]
        in_channels = 64
        for width, count in zip(STAGE_WIDTHS, units, strict=True):
            for i in range(count):
                layers.append(IRUnit(in_channels, width, stride=2 if i == 0 else 1))
                in_channels = width
        self.body = nn.Sequential(*layers)
        self.output = EmbeddingOutput(in_channels, feature_map, embedding_size, dropout)
        self._init_weights(zero_init_residual)

    @property
    def embedding(self) -> nn.Module:
        return self.output  # saved as output.* in checkpoints

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.1)
            elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, IRUnit):
                    nn.init.zeros_(module.body[-1].weight)
