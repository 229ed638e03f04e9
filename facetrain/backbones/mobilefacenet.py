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

from collections.abc import Sequence

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
    """Inverted residual: 1x1 expand to ``hidden`` → 3x3 depthwise → linear 1x1 project
    (+ identity when the shape is kept)."""

    def __init__(self, in_ch: int, hidden: int, out_ch: int, stride: int):
        super().__init__()
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
                layers.append(
                    Bottleneck(channels, channels * expansion, out_ch, stride if i == 0 else 1)
                )
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


class ArcFaceMobileFaceNet(Backbone):
    """MobileFaceNet as insightface arcface_torch builds it, ``mbf`` in its model zoo
    (``backbones/mobilefacenet.py``: ``get_mbf(fp16, num_features, blocks=(1, 4, 6, 2),
    scale=2)``; ``mbf_large`` is ``blocks=(2, 8, 12, 4), scale=4``), so its ``backbone.pth``
    files load (``facetrain.pretrained``).

    Model card at 112x112, 512-D, measured with ``facetrain.backbones.complexity``: 2.06 M
    parameters (2,059,520, as arcface_torch's own ``get_mbf``), 0.44 GMACs (arcface_torch
    README: "mobilefacenet-0.45G").

    Not :class:`MobileFaceNet`: the channels are ``scale`` x 64 / 128 rather than 64 / 128, the
    inverted residuals expand to fixed widths (128, then 256, 512 in the strided units), the
    second stem convolution is grouped (groups=64) rather than depthwise, each of the four
    stages is a strided unit followed by ``blocks[1:]`` residual ones (``blocks[0]`` residual
    units replace the stem's second convolution unless it is 1), and the embedding is a
    bias-free FC + BatchNorm1d after the GDConv. The 1x1 convolution to 512 channels before the
    GDConv is part of ``embedding`` so that ``fp16`` leaves it in float32, as arcface_torch does.
    """

    def __init__(self, embedding_size: int = 512, input_size: tuple[int, int] = (112, 112),
                 blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2, fp16: bool = False):
        blocks = tuple(int(n) for n in blocks)
        if len(blocks) != 4 or min(blocks) < 0 or scale < 1:
            raise ValueError(f"mbf needs 4 block counts >= 0 (backbone.blocks) and a scale >= 1 "
                             f"(backbone.scale), got blocks={list(blocks)}, scale={scale}")
        super().__init__("MobileFaceNet-mbf", embedding_size, input_size, fp16)
        self.blocks, self.scale = blocks, scale
        feature_map = feature_map_size(self.architecture, self.input_size, "112x112")
        width = 64 * scale
        layers = [ConvBlock(3, width, 3, 2, 1)]
        if blocks[0] == 1:
            layers.append(ConvBlock(width, width, 3, 1, 1, groups=64))
        else:
            layers += [Bottleneck(width, 128, width, 1) for _ in range(blocks[0])]
        channels = width
        # (output channels, hidden width of the strided unit, of the residual ones, residuals)
        for out_ch, strided_hidden, hidden, repeats in (
            (width, 128, 128, blocks[1]), (2 * width, 256, 256, blocks[2]),
            (2 * width, 512, 256, blocks[3]),
        ):
            layers.append(Bottleneck(channels, strided_hidden, out_ch, 2))
            layers += [Bottleneck(out_ch, hidden, out_ch, 1) for _ in range(repeats)]
            channels = out_ch
        self.features = nn.Sequential(*layers)
        self.embedding = nn.Sequential(
            ConvBlock(channels, 512),
            ConvBlock(512, 512, feature_map, groups=512, linear=True),  # GDConv
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        for module in self.modules():  # as arcface_torch: Kaiming fan-out, BN at 1 and 0
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @property
    def body(self) -> nn.Module:
        return self.features  # saved as features.* in checkpoints
