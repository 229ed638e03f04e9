"""MobileFaceNet (Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face
Verification on Mobile Devices", CCBR 2018).

Model card, 112x112 input, 128-D embedding:

===========================  ==========  ============
                             paper       measured here
===========================  ==========  ============
parameters                   0.99 M      1.00 M (1,003,136)
multiply-adds                221 M       221 M (torch.utils.flop_counter, FLOPs / 2)
===========================  ==========  ============

The network is MobileNetV2's inverted-residual bottleneck stack (Table 1 of the paper) with
PReLU, ending in a 7x7 global depthwise convolution (GDConv) instead of global average pooling:
a face's corners and centre carry different information, so every spatial position gets its
own learnt weight. A linear 1x1 convolution and BatchNorm give the embedding.
"""

import torch
from torch import nn

from facetrain.backbones.layers import Backbone, feature_map_size

# (expansion t, output channels c, repeats n, first stride s), Table 1 of the paper.
BOTTLENECK_SETTINGS = (
    (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1)
)


class ConvBlock(nn.Sequential):
    """Conv → BatchNorm → (PReLU unless linear)."""

    def __init__(self, in_ch, out_ch, kernel=1, stride=1, padding=0, groups=1, linear=False):
        layers = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if not linear:
            layers.append(nn.PReLU(out_ch))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand → 3x3 depthwise → linear 1x1 project (+ identity)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        self.residual = stride == 1 and in_ch == out_ch
        self.body = nn.Sequential(
            ConvBlock(in_ch, hidden),
            ConvBlock(hidden, hidden, 3, stride, 1, groups=hidden),
            ConvBlock(hidden, out_ch, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileFaceNet(Backbone):
    """MobileFaceNet: 112x112 RGB face → ``embedding_size``-D embedding (paper: 128).

    ``fp16`` as every backbone (:class:`Backbone`): the bottleneck stack in float16 on CUDA,
    the GDConv and the linear 1x1 convolution in float32.
    """

    def __init__(self, embedding_size: int = 128, input_size: tuple[int, int] = (112, 112),
                 fp16: bool = False):
        super().__init__("MobileFaceNet", embedding_size, input_size, fp16)
        feature_map = feature_map_size("MobileFaceNet", self.input_size, "112x112")
        layers = [ConvBlock(3, 64, 3, 2, 1), ConvBlock(64, 64, 3, 1, 1, groups=64)]
        channels = 64
        for expansion, out_ch, repeats, stride in BOTTLENECK_SETTINGS:
            for i in range(repeats):
                layers.append(Bottleneck(channels, out_ch, stride if i == 0 else 1, expansion))
                channels = out_ch
        layers.append(ConvBlock(channels, 512))
        self.features = nn.Sequential(*layers)
        self.embedding = nn.Sequential(
            ConvBlock(512, 512, feature_map, groups=512, linear=True),  # GDConv
            ConvBlock(512, embedding_size, linear=True),
            nn.Flatten(),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming-normal fan-out for convs, as in the insightface and FaceX-Zoo implementations.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def body(self) -> nn.Module:
        return self.features  # saved as features.* in checkpoints
