"""A callback that spoils chosen training batches before the module sees them, as a bad loader
would (callbacks' batch-start hooks run before the module's): ``+callbacks.bad._target_=
nonfinite_probe.BadBatches +callbacks.bad.nan_steps=[3]`` with this folder on PYTHONPATH puts
NaN into one image of the batch of each listed optimizer step (``rank=1``: on that DDP rank
only); ``label=N`` makes the first label of every batch N, ``float_labels=true`` turns the
labels into floats (as DALI's are)."""

import pytorch_lightning as pl


class BadBatches(pl.Callback):
    def __init__(self, nan_steps=(), rank: int | None = None, label: int | None = None,
                 float_labels: bool = False):
        self.nan_steps = {int(step) for step in nan_steps}
        self.rank, self.label, self.float_labels = rank, label, float_labels

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        images, labels = batch  # a list (default collate): its items can be replaced
        if trainer.global_step in self.nan_steps and self.rank in (None, trainer.global_rank):
            images[0].fill_(float("nan"))
        if self.label is not None:
            labels[0] = self.label
        if self.float_labels:
            batch[1] = labels.float()
