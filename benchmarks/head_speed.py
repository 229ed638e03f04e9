"""Forward + backward time of every margin head ÷ plain linear + cross-entropy, same run.

    python -m benchmarks.head_speed                      # D=512, C=10k and 100k, batch 128
    python -m benchmarks.head_speed --classes 10000 --device cuda
    python -m benchmarks.head_speed --heads arcface curricular --classes 100000 --compile

Each margin is built from its ``configs/loss/*.yaml`` (paper defaults) on the full class-center
store, so what is timed is what ``python train.py loss=NAME`` runs (the fused epilogue where
the margin has one). The baseline is ``F.linear`` + ``F.cross_entropy`` with a weight of as
many rows as the store holds: (C, D), or (K·C, D) for Sub-center ArcFace's K centers a class
("K linear layers"). The ratio is head time / baseline time (median of repeats, interleaved
so both see the same machine load); gradients are dropped between steps, as the optimizer's
``zero_grad`` does. ``--compile`` adds a column: ``torch.compile`` of the margin's reference
path (``Margin.logits`` + cross-entropy, what the fused epilogue replaces) ÷ the same baseline.
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

from benchmarks.figures import Figure
from facetrain.classifiers import FullClassCenters

LOSS_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "loss"
QUICK_HEADS = ("arcface", "cosface", "curricular", "adaface", "subcenter")
AIMS = {"arcface": "<= 1.15x", "cosface": "<= 1.15x", "curricular": "<= 1.15x",
        "adaface": "<= 1.15x", "subcenter": "<= 1.3x"}


def margin_configs() -> dict[str, Path]:
    """The loss configs that are a margin head on their own (not metric losses or the center
    loss, which are no ``facetrain.heads`` class), by name."""
    return {path.stem: path for path in sorted(LOSS_CONFIGS.glob("*.yaml"))
            if str(OmegaConf.load(path).get("_target_", "")).startswith("facetrain.heads.")}


class LinearCrossEntropy(nn.Module):
    """The baseline: a bias-free linear classifier and cross-entropy."""

    def __init__(self, embedding_size: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_size) * 0.01)

    def forward(self, embeddings, labels):
        return F.cross_entropy(F.linear(embeddings, self.weight), labels)


class MarginLoss(nn.Module):
    """A margin on the full class-center store, plus its extra term: the training loss.
    ``reference``: the un-fused path (``Margin.logits`` + cross-entropy), e.g. to compile."""

    def __init__(self, margin: nn.Module, embedding_size: int, num_classes: int,
                 reference: bool = False):
        super().__init__()
        self.margin = margin
        self.centers = FullClassCenters(embedding_size, num_classes, margin)
        self.reference = reference

    def forward(self, embeddings, labels):
        if self.reference:
            logits = self.centers.logits(embeddings, labels, self.margin)
            loss = F.cross_entropy(logits, labels)
        else:
            loss = self.centers(embeddings, labels, self.margin).loss
        extra = self.margin.extra_loss()
        return loss if extra is None else loss + extra


def step_time(loss_of, parameters, embeddings, labels) -> float:
    for tensor in (*parameters, embeddings):
        tensor.grad = None
    if embeddings.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss_of(embeddings, labels).backward()
    if embeddings.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(heads: list, baseline, embedding_size, num_classes, batch, warmup, repeats, device
            ) -> list[tuple[float, float, float]]:
    """Per head (a callable loss and the module holding its parameters): the median ratio to
    the baseline, and the median head and baseline times (seconds)."""
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(batch, embedding_size, generator=generator).to(device)
    embeddings.requires_grad_(True)
    labels = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    timed = [(loss_of, list(module.to(device).train().parameters())) for loss_of, module in heads]
    timed.append((baseline, list(baseline.parameters())))
    times = [[] for _ in timed]
    for repeat in range(warmup + repeats):
        for slot, (loss_of, parameters) in enumerate(timed):  # interleaved: same machine load
            seconds = step_time(loss_of, parameters, embeddings, labels)
            if repeat >= warmup:
                times[slot].append(seconds)
    base = statistics.median(times[-1])
    return [(statistics.median(h / b for h, b in zip(t, times[-1], strict=True)),
             statistics.median(t), base) for t in times[:-1]]


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--heads", nargs="+", metavar="LOSS",
                        help="configs/loss names (default: every margin head)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the reference (un-fused) margin path")
    args = parser.parse_args(argv)

    configs = margin_configs()
    names = args.heads or list(configs)
    unknown = sorted(set(names) - set(configs))
    if unknown:
        parser.error(f"--heads {' '.join(unknown)}: not a margin head of configs/loss/ "
                     f"(choose from {', '.join(configs)})")
    print(f"head step (forward+backward) time / linear+CE time, D={args.embedding_size}, "
          f"batch {args.batch}, {args.device}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats}" + (" (compiled: torch.compile of the un-fused path)"
                               if args.compile else ""))
    columns = [f"C={c:,}" + (" compiled" if args.compile else "") for c in args.classes]
    print(f"{'loss=':<12}" + "".join(f"{c:>{12 + 10 * args.compile}}" for c in columns))
    figures = []
    for name in names:
        cells = []
        for num_classes in args.classes:
            torch.manual_seed(0)
            heads = [MarginLoss(instantiate(OmegaConf.load(configs[name])), args.embedding_size,
                                num_classes)]
            heads = [(head, head) for head in heads]
            if args.compile:
                torch.manual_seed(0)
                reference = MarginLoss(instantiate(OmegaConf.load(configs[name])),
                                       args.embedding_size, num_classes, reference=True)
                heads.append((torch.compile(reference), reference))
            rows = heads[0][1].centers.weight.shape[0]  # K·C for K sub-centers a class
            baseline = LinearCrossEntropy(args.embedding_size, rows).to(args.device)
            results = measure(heads, baseline, args.embedding_size, num_classes, args.batch,
                              args.warmup, args.repeats, args.device)
            (ratio, head_s, base_s) = results[0]
            cells.append(f"{ratio:>11.2f}x" + (f"{results[1][0]:>9.2f}x" if args.compile else ""))
            k = rows // num_classes
            figures.append(Figure(
                benchmark="head_speed",
                name=f"{name} fwd+bwd, C={num_classes:,}, D={args.embedding_size}, "
                     f"batch {args.batch}",
                ratio=ratio,
                baseline="F.linear + cross-entropy" + (f" at K·C={rows:,} rows" if k > 1 else ""),
                detail=f"{head_s * 1e3:.0f} ms / {base_s * 1e3:.0f} ms"
                       + (f"; torch.compile of the un-fused path {results[1][0]:.2f}x"
                          if args.compile else ""),
                aim=AIMS.get(name, "") if num_classes == 100_000 else "",
            ))
        print(f"{name:<12}" + "".join(cells), flush=True)
    return figures


def quick() -> list[Figure]:
    """The issue's sizes (C=100k, D=512, batch 128), the heads it sets aims for, few repeats."""
    return main(["--classes", "100000", "--heads", *QUICK_HEADS, "--warmup", "1",
                 "--repeats", "3"])


def full() -> list[Figure]:
    return main([])


if __name__ == "__main__":
    main()
