"""torchvision's ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016)
adapted to 112x112 faces and an embedding output.

Model card at 112x112, 512-D embedding, measured here with ``facetrain.backbones.complexity``:

==========  ==========  ======  ===================================================
backbone    params      GMACs   stock torchvision at 224x224 (1000 classes)
==========  ==========  ======  ===================================================
resnet18    24.02 M     1.73    11.69 M, 1.81 GMACs
resnet50    74.89 M     4.04    25.56 M, 4.09 GMACs
==========  ==========  ======  ===================================================

The adaptation is ArcFace's (Deng et al., CVPR 2019, Sec. 3.2). Input setting "L" replaces
the 7x7 stride-2 stem convolution by a 3x3 stride-1 one so that a 112x112 face ends in a 7x7
map: the stages then see 56, 28, 14 and 7 pixels, as a 224x224 image does in the stock network.
(insightface's IResNets drop the max-pool and stride their first stage instead; torchvision's
first stage has stride 1, so the max-pool stays.) Output setting "E" replaces global pooling +
classifier by BN → Dropout → FC → BN on the flattened last map (as face.evoLVe's ResNet-50).
Every stage is torchvision's, so the cost is the stock network's at 224x224; resnet50's wide
last map (2048x7x7) makes its FC alone 51.4 M parameters. Initialisation: torchvision's (Kaiming
normal, fan-out, for every convolution; BN γ=1 β=0; ``zero_init_residual`` optional).
"""

from torch import nn

from facetrain.backbones.layers import (
    Backbone,
    EmbeddingOutput,
    check_depth,
    feature_map_size,
)

DEPTHS = (18, 34, 50, 101, 152)  # torchvision.models.resnet{depth}


class TorchvisionResNet(Backbone):
    """torchvision ResNet-``depth`` with a 3x3 stride-1 stem and the ArcFace "E" output:
    (N, 3, H, W) → (N, ``embedding_size``). ``fp16`` as every backbone (:class:`Backbone`)."""

    def __init__(self, depth: int = 18, embedding_size: int = 512,
                 input_size: tuple[int, int] = (112, 112), dropout: float = 0.0,
                 fp16: bool = False, zero_init_residual: bool = False):
        check_depth("TorchvisionResNet", depth, DEPTHS)
        super().__init__(f"ResNet-{depth}", embedding_size, input_size, fp16)
        self.depth = depth
        feature_map = feature_map_size(f"ResNet-{depth}", self.input_size, "112x112")
        import torchvision  # here, not at the top: a second or more to import, only needed here

        constructor = getattr(torchvision.models, f"resnet{depth}")
        resnet = constructor(weights=None, zero_init_residual=zero_init_residual)
        stem = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
        self.body = nn.Sequential(
            stem, resnet.bn1, resnet.relu, resnet.maxpool,
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4,
        )
        channels = resnet.fc.in_features
        self.output = EmbeddingOutput(channels, feature_map, embedding_size, dropout)

    @property
    def embedding(self) -> nn.Module:
        return self.output  # saved as output.* in checkpoints
