"""Forward + backward time of every margin head ÷ plain linear + cross-entropy, same run.

    python -m benchmarks.head_speed                      # D=512, C=10k and 100k, batch 128
    python -m benchmarks.head_speed --classes 10000 --device cuda

Each margin is built from its ``configs/loss/*.yaml`` (paper defaults) on the full class-center
store, so what is timed is what ``python train.py loss=NAME`` runs. The baseline is
``F.linear`` + ``F.cross_entropy`` with the same (C, D) weight; the ratio is head time /
baseline time (median of repeats, interleaved so both see the same machine load).
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from facetrain.classifiers import FullClassCenters

LOSS_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "loss"


class LinearCrossEntropy(nn.Module):
    """The baseline: a bias-free linear classifier and cross-entropy."""

    def __init__(self, embedding_size: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_size) * 0.01)

    def forward(self, embeddings, labels):
        return F.cross_entropy(F.linear(embeddings, self.weight), labels)


class MarginLoss(nn.Module):
    """A margin on the full class-center store, plus its extra term: the training loss."""

    def __init__(self, margin: nn.Module, embedding_size: int, num_classes: int):
        super().__init__()
        self.margin = margin
        self.centers = FullClassCenters(embedding_size, num_classes, margin)

    def forward(self, embeddings, labels):
        loss = self.centers(embeddings, labels, self.margin).loss
        extra = self.margin.extra_loss()
        return loss if extra is None else loss + extra


def step_time(loss_of: nn.Module, embeddings, labels) -> float:
    if embeddings.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss_of(embeddings, labels).backward()
    if embeddings.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(head, baseline, embedding_size, num_classes, batch, repeats, device) -> float:
    head.to(device).train()
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(batch, embedding_size, generator=generator).to(device)
    embeddings.requires_grad_(True)
    labels = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    for _ in range(2):  # warm-up
        step_time(head, embeddings, labels), step_time(baseline, embeddings, labels)
    ratios = []
    for _ in range(repeats):
        ratios.append(step_time(head, embeddings, labels) / step_time(baseline, embeddings, labels))
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    configs = sorted(LOSS_CONFIGS.glob("*.yaml"))
    print(f"head step (forward+backward) time / linear+CE time, D={args.embedding_size}, "
          f"batch {args.batch}, {args.device}, median of {args.repeats}")
    print(f"{'loss=':<12}" + "".join(f"{f'C={c:,}':>12}" for c in args.classes))
    for config in configs:
        row = []
        for num_classes in args.classes:
            torch.manual_seed(0)
            margin = instantiate(OmegaConf.load(config))
            head = MarginLoss(margin, args.embedding_size, num_classes)
            baseline = LinearCrossEntropy(args.embedding_size, num_classes).to(args.device)
            row.append(measure(head, baseline, args.embedding_size, num_classes,
                               args.batch, args.repeats, args.device))
        print(f"{config.stem:<12}" + "".join(f"{ratio:>11.2f}x" for ratio in row), flush=True)


if __name__ == "__main__":
    main()
