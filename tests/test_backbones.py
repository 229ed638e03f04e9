"""MobileFaceNet against the paper's model card (Chen et al., CCBR 2018)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from facetrain.backbones import MobileFaceNet

PAPER_MADDS = 221e6  # Table 2 of the paper, 112x112 input, 128-D embedding


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def model() -> MobileFaceNet:
    return MobileFaceNet().eval()


def test_parameter_count_is_pinned(model):
    # Paper: 0.99 M. Pinned exactly so an accidental change to the architecture shows up.
    assert num_parameters(model) == 1_003_136


def test_embedding_shape_for_128_and_512(model):
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        embeddings = model(images)
        wide = MobileFaceNet(embedding_size=512).eval()(images)
    assert embeddings.shape == (2, 128) and embeddings.dtype == torch.float32
    assert torch.isfinite(embeddings).all()
    assert wide.shape == (2, 512)


def test_multiply_adds_match_paper(model):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 112, 112))
    madds = counter.get_total_flops() / 2  # the counter reports 2 FLOPs per multiply-add
    assert madds == pytest.approx(PAPER_MADDS, rel=0.01)


def test_non_square_input_size():
    model = MobileFaceNet(input_size=(128, 96)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 128, 96)).shape == (2, 128)


def test_wrong_input_shape_raises_with_expected_size(model):
    with pytest.raises(ValueError, match="112x112") as error:
        model(torch.randn(2, 3, 96, 96))
    assert "96x96" in str(error.value)


@pytest.mark.parametrize("size", [(100, 100), (112, 120)])
def test_input_size_not_divisible_by_16_raises(size):
    with pytest.raises(ValueError, match="divisible by 16"):
        MobileFaceNet(input_size=size)
