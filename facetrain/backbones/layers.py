"""What every backbone family shares: the interface (:class:`Backbone`), the input-size rule,
the input check, the ArcFace "E" embedding output and the half-precision body."""

import torch
from torch import nn


def check_depth(family: str, depth: int, depths) -> None:
    """A clear error for a depth the family does not define (``backbone.depth``)."""
    if depth not in depths:
        raise ValueError(
            f"{family} depth must be one of {sorted(depths)} (backbone.depth), got {depth}"
        )


def feature_map_size(
    name: str, input_size: tuple[int, int], paper_size: str, stride: int = 16
) -> tuple[int, int]:
    """(H / stride, W / stride) of the last feature map, or a ValueError stating the rule.

    Every backbone here halves the resolution four times (stride 16), so any H and W divisible
    by 16 work: 112x112 -> 7x7, 112x96 -> 7x6, 64x64 -> 4x4.
    """
    height, width = input_size
    if height % stride or width % stride or height <= 0 or width <= 0:
        raise ValueError(
            f"{name} needs an input size divisible by {stride} (it downsamples {stride}x), "
            f"got {height}x{width}; the paper uses {paper_size}"
        )
    return height // stride, width // stride


def check_images(name: str, images: torch.Tensor, input_size: tuple[int, int]) -> None:
    """Raise a ValueError naming the expected size unless ``images`` is (N, 3, H, W)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{name} expects a batch of RGB images shaped (N, 3, {input_size[0]}, "
            f"{input_size[1]}), got {tuple(images.shape)}"
        )
    if tuple(images.shape[-2:]) != tuple(input_size):
        raise ValueError(
            f"{name} was built for {input_size[0]}x{input_size[1]} inputs but got "
            f"{images.shape[-2]}x{images.shape[-1]}; resize the images or set backbone.input_size"
        )


class EmbeddingOutput(nn.Sequential):
    """ArcFace's output option "E" (Deng et al., CVPR 2019, Sec. 3.2): BN → Dropout → FC → BN.

    The last feature map is flattened rather than pooled, so every face position keeps its own
    weights. The final BatchNorm's scale is fixed at 1 (MXNet ``fix_gamma=True`` in the ArcFace
    release, ``requires_grad=False`` in arcface_torch); its shift is learnt.
    """

    def __init__(self, channels: int, feature_map: tuple[int, int], embedding_size: int,
                 dropout: float = 0.0):
        features = nn.BatchNorm1d(embedding_size)
        features.weight.requires_grad_(False)
        super().__init__(
            nn.BatchNorm2d(channels),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(channels * feature_map[0] * feature_map[1], embedding_size),
            features,
        )


def half_body_forward(body: nn.Module, output: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The arcface_torch ``fp16`` recipe: on CUDA the convolutions run under float16 autocast;
    the embedding layers always run in float32, even inside an outer autocast (Lightning's
    ``16-mixed``), so the flattened FC and its BatchNorm keep full precision. Like
    arcface_torch's ``torch.cuda.amp.autocast``, it changes nothing else on other devices, so a
    CPU export stays a float32 graph."""
    if images.is_cuda:
        with torch.autocast("cuda", dtype=torch.float16):
            features = body(images)
    else:
        features = body(images)
    with torch.autocast(images.device.type, enabled=False):
        return output(features.float())


class Backbone(nn.Module):
    """The interface of every backbone: (N, 3, H, W) images → (N, ``embedding_size``) floats.

    A family sets two parts: ``body`` (images → its last feature map or pooled features) and
    ``embedding`` (those features → the embedding vector: ArcFace's BN-Dropout-FC-BN, a GDConv,
    fc5). The submodules keep the names their checkpoints were saved under (``features`` /
    ``output`` in some families), so ``body`` or ``embedding`` may be a property naming one.
    The forward is this one for every family: the input check, then the body and the embedding,
    with ``fp16`` meaning :func:`half_body_forward` (the arcface_torch recipe) everywhere.
    """

    body: nn.Module
    embedding: nn.Module

    def __init__(self, architecture: str, embedding_size: int, input_size: tuple[int, int],
                 fp16: bool = False):
        super().__init__()
        self.architecture = architecture  # how errors name the network, e.g. "IResNet-50"
        self.embedding_size = embedding_size
        self.input_size = tuple(input_size)
        self.fp16 = fp16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(self.architecture, images, self.input_size)
        if self.fp16:
            return half_body_forward(self.body, self.embedding, images)
        return self.embedding(self.body(images))
