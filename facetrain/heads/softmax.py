"""Plain softmax classifier: ``logit_j = W_j · x + b_j`` (no normalisation, no margin)."""

import torch
import torch.nn.functional as F
from torch import nn

from facetrain.heads.base import CosineMarginHead


class Softmax(CosineMarginHead):
    """Linear layer + softmax cross-entropy, the baseline every margin paper compares against."""

    def __init__(self, embedding_size: int, num_classes: int, bias: bool = True):
        super().__init__(embedding_size, num_classes, scale=1.0)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def unmargined_logits(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x, self.weight.float(), bias)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.unmargined_logits(embeddings.float())
