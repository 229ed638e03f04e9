"""Test callbacks for runs driven through the real entry point (this folder on PYTHONPATH):

- ``+callbacks.probe._target_=step_probe.RecordBatches +callbacks.probe.file=F``: one JSON line
  per training batch — the optimizer step it led to, its labels and the sum of each image — so a
  test can compare what an interrupted-and-resumed run trained on with an uninterrupted one.
- ``+callbacks.kill._target_=step_probe.SignalAtStep +callbacks.kill.step=N
  +callbacks.kill.signal=SIGKILL``: after optimizer step N, the process sends itself the signal.
"""

import json
import os
import signal
from pathlib import Path

import pytorch_lightning as pl


class RecordBatches(pl.Callback):
    def __init__(self, file: str):
        self.file = Path(file)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        images, labels = batch
        line = {"step": trainer.global_step, "epoch": trainer.current_epoch,
                "labels": labels.tolist(), "image_sums": images.double().sum((1, 2, 3)).tolist()}
        with self.file.open("a") as out:
            out.write(json.dumps(line) + "\n")


class SignalAtStep(pl.Callback):
    def __init__(self, step: int, signal: str = "SIGKILL"):
        self.step, self.signal = step, getattr(signal_module, signal)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), self.signal)


signal_module = signal


def read_batches(file: Path) -> list[dict]:
    return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []
