"""Class-center memory per rank: full FC ÷ Partial-FC, measured on the real tensors and
extrapolated to millions of identities.

    python -m benchmarks.partial_fc_memory                   # 1M and 10M identities, D=512
    python -m benchmarks.partial_fc_memory --scale 1000      # measure at C/1000 (faster)

What a rank holds for its class centers: the weight, its gradient, the optimizer state
(SGD with momentum: one copy; AdamW: two, plus a scalar step) and the float32 logits of one
step. Full FC (``classifier=full``): every rank holds all C centers and the logits of its own
batch (B × C). Partial-FC (``classifier=partial_fc``): rank 0 holds the largest shard,
``L = ceil(C / W)`` centers, and the logits of the global batch over the sampled centers,
``(B·W) × S`` with ``S = min(L, max(int(rate·L), B·W))`` (every positive of the global batch
must fit: the count grows to the global batch, see ``PartialFC``). The gradient of the dense
shard parameter is a full (L, D) tensor (zeros on unsampled rows): counted, because it is
allocated. Not counted: the backbone, activations other than the logits (the cosines,
probabilities kept for backward and their gradient are a few more logits-sized tensors), and,
for full FC under DDP, the gradient buckets (one more C·D·4 bytes unless
``gradient_as_bucket_view=True``).

Measured: the real ``PartialFC`` / ``FullClassCenters`` at C divided by ``--scale``, one
ArcFace training step with a real optimizer, summing the bytes of ``weight``, ``weight.grad``,
the optimizer state and the logits tensor the margin returned. World sizes above one run on
one process through torch's fake process group (collectives hallucinated, shapes real: what
rank 0 of W allocates). The formula above must agree with it to the byte; the extrapolation
to C is the formula.

Reference: arcface_torch (insightface ``recognition/arcface_torch/README.md``, "GPU Memory
Utilization", 8 × V100 32 GB, batch 128 per GPU) reports 29M identities with Partial-FC 0.1 at
32,324 MB per GPU (backbone, activations and CUDA context included), and 1.4M identities at
32,252 MB per GPU with data parallel, 6,056 MB with Partial-FC 0.1.
"""

import argparse
import logging
import math

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

from benchmarks.figures import Figure
from facetrain.classifiers import FullClassCenters, PartialFC
from facetrain.heads import ArcFace

FLOAT = 4  # bytes of a float32
OPTIMIZERS = {  # per-center state copies, bytes of scalar state
    "sgd": (1, 0),
    "adamw": (2, FLOAT),  # exp_avg, exp_avg_sq; step is a 0-dim float32 tensor
}
STORES = [("full", 1.0), ("partial_fc", 0.1), ("partial_fc", 0.3)]


def make_optimizer(name: str, parameters):
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=0.1, momentum=0.9, weight_decay=5e-4)
    return torch.optim.AdamW(parameters, lr=1e-3, weight_decay=5e-4)


def formula(store: str, rate: float, classes: int, world: int, batch: int, size: int,
            optimizer: str) -> dict[str, int]:
    """Bytes per rank (rank 0, the largest shard), as the module docstring states them."""
    copies, scalars = OPTIMIZERS[optimizer]
    if store == "full":
        rows, logits = classes, batch * classes
    else:
        rows = math.ceil(classes / world)
        sampled = rows if rate >= 1.0 else min(rows, max(max(1, int(rate * rows)), batch * world))
        logits = batch * world * sampled
    return {"centers": rows * size * FLOAT, "gradient": rows * size * FLOAT,
            "optimizer": copies * rows * size * FLOAT + scalars, "logits": logits * FLOAT}


def measure(store_name: str, rate: float, classes: int, world: int, batch: int, size: int,
            optimizer_name: str) -> dict[str, int]:
    """Bytes of the real tensors after one training step on rank 0 of ``world``."""
    margin = ArcFace().train()
    # The reference path makes the logits tensor where ``keep`` below sees it; the fused
    # epilogue (``facetrain.classifiers.fused``) keeps one buffer of the same shape inside.
    margin.fused = False
    if store_name == "full":
        store = FullClassCenters(size, classes, margin, world_size=world)
    else:
        store = PartialFC(size, classes, margin, sample_rate=rate, world_size=world)
    store.train()
    logits = {}
    margin_logits = store.margin_logits

    def keep(*args):  # the logits tensor the cross-entropy is taken of
        logits["bytes"] = (out := margin_logits(*args)).numel() * out.element_size()
        return out

    store.margin_logits = keep
    optimizer = make_optimizer(optimizer_name, store.parameters())
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(batch, size, generator=generator, requires_grad=True)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    store(embeddings, labels, margin).loss.backward()
    optimizer.step()
    weight = store.weight
    state = optimizer.state[weight].values()
    return {
        "centers": weight.numel() * weight.element_size(),
        "gradient": weight.grad.numel() * weight.grad.element_size(),
        "optimizer": sum(t.numel() * t.element_size() for t in state if torch.is_tensor(t)),
        "logits": logits["bytes"],
    }


def world_of(size: int):
    """Rank 0 of a world of ``size`` processes on this one (the fake process group)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if size > 1:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)


def gb(value: float) -> str:
    return f"{value / 1e9:>8.2f}"


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128, help="per rank")
    parser.add_argument("--scale", type=int, default=100,
                        help="measure the real tensors at classes / scale")
    args = parser.parse_args(argv)
    # the count-grows-to-the-batch notice, once per store built here: the formula states it
    logging.getLogger("facetrain.classifiers.partial_fc").setLevel(logging.ERROR)
    size, batch = args.embedding_size, args.batch

    print(f"class-center memory per rank (GB = 1e9 bytes): centers + gradient + optimizer state "
          f"+ float32 logits, D={size}, batch {batch} per rank, ArcFace")
    print(f"\nmeasured on the real tensors at classes / {args.scale} (rank 0; W>1 on a fake "
          f"process group) vs the formula")
    print(f"{'classes':>10} {'W':>3} {'store':<16} {'optimizer':<9}{'measured MB':>13}"
          f"{'formula MB':>12}{'agree':>8}")
    worst = 1.0
    for world in args.worlds:
        world_of(world)
        for classes in args.classes:
            small = classes // args.scale
            for store, rate in STORES:
                for optimizer in OPTIMIZERS:
                    got = sum(measure(store, rate, small, world, batch, size, optimizer).values())
                    want = sum(formula(store, rate, small, world, batch, size, optimizer).values())
                    worst = min(worst, min(got, want) / max(got, want))
                    name = store if store == "full" else f"partial_fc {rate}"
                    print(f"{small:>10,} {world:>3} {name:<16} {optimizer:<9}{got / 1e6:>13.1f}"
                          f"{want / 1e6:>12.1f}{got / want:>8.3f}", flush=True)
    world_of(1)
    print(f"worst agreement: {worst:.4f}")
    figures = [Figure(
        "partial_fc_memory", f"class-center bytes measured on the real tensors at C/{args.scale}",
        worst, "the formula of the module docstring (worst case of every row)",
        f"{len(args.worlds) * len(args.classes) * len(STORES) * len(OPTIMIZERS)} configurations",
        "1 (to the byte)",
    )]

    print("\nextrapolated with the formula (GB per rank); ÷ full = total ÷ full FC's total at the "
          "same C, W and optimizer")
    print(f"{'classes':>10} {'W':>3} {'store':<16}{'centers':>9}{'grad':>9}{'logits':>9}"
          f"{'SGD':>9}{'÷ full':>8}{'AdamW':>9}{'÷ full':>8}")
    for classes in args.classes:
        for world in args.worlds:
            full = {o: sum(formula("full", 1.0, classes, world, batch, size, o).values())
                    for o in OPTIMIZERS}
            for store, rate in STORES:
                parts = {o: formula(store, rate, classes, world, batch, size, o)
                         for o in OPTIMIZERS}
                sgd, adamw = sum(parts["sgd"].values()), sum(parts["adamw"].values())
                name = store if store == "full" else f"partial_fc {rate}"
                p = parts["sgd"]
                if (store, rate) == ("partial_fc", 0.1) and world > 1:  # arcface_torch's rate
                    figures.append(Figure(
                        "partial_fc_memory", f"{name}, C={classes:,}, W={world}, SGD: class-center "
                        "bytes per rank", sgd / full["sgd"], "full FC (replicated), bytes per rank",
                        f"{sgd / 1e9:.2f} GB vs {full['sgd'] / 1e9:.2f} GB; AdamW "
                        f"{adamw / full['adamw']:.3f}x; D={size}, batch {batch} per rank",
                    ))
                print(f"{classes:>10,} {world:>3} {name:<16}{gb(p['centers'])} "
                      f"{gb(p['gradient'])} {gb(p['logits'])} {gb(sgd)}{sgd / full['sgd']:>7.3f}x"
                      f"{gb(adamw)}{adamw / full['adamw']:>7.3f}x")
    reference = sum(formula("partial_fc", 0.1, 29_000_000, 8, batch, size, "sgd").values())
    print(f"\n29M identities, W=8, partial_fc 0.1, SGD: {reference / 1e9:.1f} GB per rank for the "
          f"class centers (arcface_torch: 32.3 GB per V100 in all, backbone and activations "
          f"included)")
    return figures


def quick() -> list[Figure]:
    return main(["--worlds", "1", "8", "--scale", "1000"])


def full() -> list[Figure]:
    return main([])


if __name__ == "__main__":
    main()
