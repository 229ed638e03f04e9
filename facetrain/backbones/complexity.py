"""Size and cost of a backbone: parameters and multiply-accumulates (MACs) per image.

"FLOPs" is ambiguous in the face-recognition literature: insightface and most papers report
multiply-adds under that name (r100: "12.1 GFLOPs"), OpenVINO's model zoo reports 2 FLOPs per
multiply-add (the same r100: 24.2 GFLOPs). We count with ``torch.utils.flop_counter``, which
gives 2 FLOPs per multiply-add of every convolution and matrix product, and report
MACs = FLOPs / 2. BatchNorm, activations and residual additions are not counted, as in the
papers.
"""

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (``trainable_only``: those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_size: tuple[int, int]) -> int:
    """Multiply-accumulates of one forward pass on one (3, H, W) image.

    Runs on the model's own device, so a model built under ``torch.device("meta")`` is
    counted without allocating or computing anything.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, *input_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
