"""A callback that lets a test see inside every process of a multi-process run (the checkpoint
only shows rank 0): ``+callbacks.rank_probe._target_=rank_probe.SaveRankState
+callbacks.rank_probe.folder=DIR`` with this folder on PYTHONPATH."""

from pathlib import Path

import pytorch_lightning as pl
import torch


class SaveRankState(pl.Callback):
    """Before each validation (after the epoch's last optimizer step, before DDP's first
    evaluation forward broadcasts rank 0's buffers), every rank writes
    ``rank<r>.pt``: the global step, its number of torch threads and the replicated state
    (backbone and margin parameters and buffers; not the Partial-FC shard, which differs by
    design)."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {}
        for part in ("backbone", "head"):
            module = getattr(pl_module, part)
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                state[f"{part}.{name}"] = tensor.detach().clone()
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"global_step": trainer.global_step, "threads": torch.get_num_threads(),
             "state": state},
            self.folder / f"rank{trainer.global_rank}.pt",
        )
