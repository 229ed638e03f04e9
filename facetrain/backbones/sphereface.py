"""SphereFace's residual CNNs (Liu et al., "SphereFace: Deep Hypersphere Embedding for Face
Recognition", CVPR 2017, Table 2), as released in Caffe (github.com/wy1iu/sphereface,
``sphereface_model.prototxt`` and ``make_spherenet.py``).

Model card, 512-D fc5, measured here with ``facetrain.backbones.complexity`` (MACs = FLOPs / 2):

=========  ============  ===========================  ===========================
backbone   units/stage   112x96 (paper)               112x112
=========  ============  ===========================  ===========================
4-layer    0, 0, 0, 0    12.56 M params, 0.16 GMACs   14.40 M params, 0.19 GMACs
10-layer   0, 1, 2, 0    15.22 M params, 0.76 GMACs   17.05 M params, 0.89 GMACs
20-layer   1, 2, 4, 1    22.67 M params, 1.75 GMACs   24.50 M params, 2.04 GMACs
36-layer   2, 4, 8, 2    32.77 M params, 3.34 GMACs   34.61 M params, 3.89 GMACs
64-layer   3, 8, 16, 3   48.19 M params, 6.11 GMACs   50.02 M params, 7.13 GMACs
=========  ============  ===========================  ===========================

Published: SphereFace-20 at 112x96, 22.671 M parameters and 3.504 GFLOPs counted as 2 per
multiply-add = 1.752 GMACs (OpenVINO model-zoo card of the released Caffe model); measured here
22,666,944 and 1.750 GMACs. The gap of 3,712 parameters is the Caffe model's biases on the
residual convolutions, which the prototxt freezes at zero (``lr_mult: 0``) and we leave out.
The paper gives the architecture, not the counts. fc5 holds most parameters (11.0 M of 22.7 M
for SphereFace-20) and grows with the input size.

Each of the four stages is a 3x3 stride-2 convolution (with bias) + PReLU followed by residual
units of two 3x3 convolutions + PReLU each; no BatchNorm. fc5, a fully connected layer on the
flattened last feature map, is the embedding. Initialisation as in the prototxt: Caffe "xavier"
(uniform ±sqrt(3 / fan_in)) for the strided convolutions and fc5, Gaussian std 0.01 for the
residual convolutions, zero biases, PReLU slopes 0.25 (Caffe's default).
"""

import math

import torch
from torch import nn

from facetrain.backbones.layers import Backbone, check_depth, feature_map_size

# Residual units per stage, Table 2 of the paper (and make_spherenet.py for 20/36/64).
UNITS_PER_STAGE = {
    4: (0, 0, 0, 0),
    10: (0, 1, 2, 0),
    20: (1, 2, 4, 1),
    36: (2, 4, 8, 2),
    64: (3, 8, 16, 3),
}
STAGE_WIDTHS = (64, 128, 256, 512)


def caffe_xavier_(weight: torch.Tensor) -> None:
    """Caffe's XavierFiller (default FAN_IN): uniform in ±sqrt(3 / fan_in)."""
    bound = math.sqrt(3.0 / weight[0].numel())
    nn.init.uniform_(weight, -bound, bound)


class ResidualUnit(nn.Module):
    """x + PReLU(conv(PReLU(conv(x)))), 3x3 convolutions without bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.PReLU(channels),
        )
        for conv in (self.body[0], self.body[2]):
            nn.init.normal_(conv.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SphereNet(Backbone):
    """SphereFace-``depth`` CNN (4, 10, 20, 36 or 64): (N, 3, H, W) → (N, ``embedding_size``).

    The paper trains on 112x96 crops; any H and W divisible by 16 work (fc5 grows with them).
    ``fp16`` as every backbone (:class:`Backbone`): the convolutions in float16 on CUDA, fc5
    in float32.
    """

    def __init__(self, depth: int = 20, embedding_size: int = 512,
                 input_size: tuple[int, int] = (112, 96), fp16: bool = False):
        check_depth("SphereNet", depth, UNITS_PER_STAGE)
        super().__init__(f"SphereFace-{depth}", embedding_size, input_size, fp16)
        self.depth = depth
        feature_map = feature_map_size(f"SphereFace-{depth}", self.input_size, "112x96")
        layers = []
        in_channels = 3
        for width, units in zip(STAGE_WIDTHS, UNITS_PER_STAGE[depth], strict=True):
            downsample = nn.Conv2d(in_channels, width, 3, 2, 1)
            caffe_xavier_(downsample.weight)
            nn.init.zeros_(downsample.bias)
            layers += [downsample, nn.PReLU(width)]
            layers += [ResidualUnit(width) for _ in range(units)]
            in_channels = width
        self.features = nn.Sequential(*layers)
        fc5 = nn.Linear(in_channels * feature_map[0] * feature_map[1], embedding_size)
        caffe_xavier_(fc5.weight)
        nn.init.zeros_(fc5.bias)
        self.embedding = nn.Sequential(nn.Flatten(), fc5)

    @property
    def body(self) -> nn.Module:
        return self.features  # saved as features.* in checkpoints
