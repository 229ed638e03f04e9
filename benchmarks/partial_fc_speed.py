"""Step time of the class centers: Partial-FC ÷ full FC, two CPU processes over gloo, same run.

    python -m benchmarks.partial_fc_speed                    # C=100k, D=512, batch 128 per rank
    python -m benchmarks.partial_fc_speed --quick            # C=20k, fewer repeats
    python -m benchmarks.partial_fc_speed --sample-rate 0.3

A step is what training does to the class centers for one batch: forward and backward of the
head (ArcFace, paper defaults) on fixed embeddings, then an SGD step (momentum 0.9, weight
decay 5e-4). World size 2, one thread per process. Full FC (``classifier=full``): the (C, D)
matrix replicated on both ranks, each scoring its own batch, its gradient all-reduced and
averaged as DDP does. Partial-FC (``classifier=partial_fc``): each rank holds C/2 centers,
scores the all-gathered global batch against every positive plus random negatives
(``--sample-rate`` of its centers) and takes the sharded cross-entropy; no gradient
all-reduce for the centers. Steps alternate between the two (both see the same machine load);
the ratio is the median Partial-FC step over the median full step, rank 0's clock, each step
between barriers.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.figures import Figure
from facetrain.classifiers import FullClassCenters, PartialFC
from facetrain.heads import ArcFace

WORLD = 2


def optimizer_for(store):
    return torch.optim.SGD(store.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def timed_step(store, optimizer, embeddings, labels, margin, all_reduce_gradient: bool) -> float:
    dist.barrier()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    store(embeddings, labels, margin).loss.backward()
    if all_reduce_gradient:  # what DDP does with a replicated parameter's gradient
        dist.all_reduce(store.weight.grad)
        store.weight.grad.div_(WORLD)
    optimizer.step()
    dist.barrier()
    return time.perf_counter() - start


def run_rank(rank: int, args, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank,
                            world_size=WORLD)
    try:
        torch.manual_seed(0)  # replicated full matrix: the same on both ranks, as under DDP
        margin = ArcFace().train()
        full = FullClassCenters(args.embedding_size, args.classes, margin, rank, WORLD).train()
        partial = PartialFC(args.embedding_size, args.classes, margin, args.sample_rate,
                            rank, WORLD).train()
        optimizers = optimizer_for(full), optimizer_for(partial)
        generator = torch.Generator().manual_seed(1 + rank)
        embeddings = torch.randn(args.batch, args.embedding_size, generator=generator,
                                 requires_grad=True)
        labels = torch.randint(0, args.classes, (args.batch,), generator=generator)
        times = {"full": [], "partial_fc": []}
        pairs = list(zip(("full", "partial_fc"), (full, partial), optimizers, strict=True))
        for repeat in range(args.warmup + args.repeats):
            for name, store, optimizer in pairs[:: 1 if repeat % 2 else -1]:  # either first
                seconds = timed_step(store, optimizer, embeddings, labels, margin,
                                     all_reduce_gradient=name == "full")
                if repeat >= args.warmup:
                    times[name].append(seconds)
        if rank == 0:
            medians = {name: statistics.median(t) for name, t in times.items()}
            Path(folder, "results.json").write_text(
                json.dumps({**medians, "sampled": partial.num_sample})
            )
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128, help="per rank")
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="C=20k, 5 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.repeats = 20_000, 5

    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(run_rank, args=(args, folder), nprocs=WORLD, join=True)
        results = json.loads(Path(folder, "results.json").read_text())
    full, partial = results["full"], results["partial_fc"]
    print(f"class-center step (forward+backward+SGD) on {WORLD} CPU processes over gloo, 1 thread "
          f"each: C={args.classes:,}, D={args.embedding_size}, batch {args.batch} per rank, "
          f"ArcFace, median of {args.repeats}")
    print(f"full FC (gradient all-reduced):          {full * 1e3:8.1f} ms")
    print(f"partial_fc {args.sample_rate} ({results['sampled']:,} of "
          f"{args.classes // WORLD:,} centers per rank): {partial * 1e3:8.1f} ms")
    print(f"partial_fc ÷ full: {partial / full:.2f}x")
    return [Figure(
        "partial_fc_speed", f"partial_fc {args.sample_rate} class-center step, C={args.classes:,}, "
        f"D={args.embedding_size}, W={WORLD} (gloo), batch {args.batch} per rank: ms",
        partial / full, "full FC step, gradient all-reduced as DDP does, ms",
        f"{partial * 1e3:.1f} ms vs {full * 1e3:.1f} ms, ArcFace + SGD, median of {args.repeats}",
    )]


def quick() -> list[Figure]:
    return main(["--quick"])


def full() -> list[Figure]:
    return main([])


if __name__ == "__main__":
    main()
