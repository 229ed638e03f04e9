"""CurricularFace's t is estimated from the global batch under DDP (two CPU processes, gloo)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from facetrain.classifiers import FullClassCenters
from facetrain.heads import CurricularFace


def batch_for(rank: int):
    generator = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4 + 4 * rank, 8, generator=generator), torch.arange(4 + 4 * rank) % 5


def update_on_rank(rank: int, world_size: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        torch.manual_seed(0)  # same initial class centers on every rank, as DDP guarantees
        head = CurricularFace().train()
        centers = FullClassCenters(8, 5, head)
        embeddings, labels = batch_for(rank)
        centers(embeddings, labels, head)
        results[rank] = float(head.t)
    finally:
        dist.destroy_process_group()


def test_t_uses_the_mean_over_all_ranks(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(update_on_rank, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)

    torch.manual_seed(0)
    weight = FullClassCenters(8, 5, CurricularFace()).weight.detach()
    cos_y = []
    for rank in range(2):  # independent: cosine of each sample to its own class center
        embeddings, labels = batch_for(rank)
        unit_x = embeddings / embeddings.norm(dim=1, keepdim=True)
        unit_w = weight / weight.norm(dim=1, keepdim=True)
        cos_y.append((unit_x * unit_w[labels]).sum(dim=1))
    expected = 0.01 * torch.cat(cos_y).mean().item()  # t0 = 0, momentum 0.99, global batch of 12
    assert abs(results[0] - expected) < 1e-6 and abs(results[1] - expected) < 1e-6
    assert abs(expected - 0.01 * cos_y[0].mean().item()) > 1e-4  # a per-rank mean would differ
