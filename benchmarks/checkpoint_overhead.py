"""What mid-epoch checkpointing costs the default run: the time of one ``last.ckpt`` write
(atomic, fsync'd, with every rank's random state) over the training time between two writes.

    python -m benchmarks.checkpoint_overhead               # 300 steps of the default run
    python -m benchmarks.checkpoint_overhead --steps 120   # quicker

It runs the README's default job (``python train.py``: MobileFaceNet, ArcFace, synthetic faces)
through the real entry point with a timing callback (``Timer``, below). The callback times every
training step and, every ``--every`` steps, one more ``trainer.save_checkpoint`` of the run's
``last.ckpt`` — the call the periodic ``callbacks.last_checkpoint`` and the preemption handler
make — interleaved with the steps, so both see the same machine load. Printed: the median step,
the median write, and the overhead ratio (time with writes ÷ time without) at the default
interval (every 30 minutes), at every 1000 steps, and at the measured ``--every``.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl

from benchmarks.figures import Figure

DEFAULT_INTERVAL_S = 30 * 60  # configs/callbacks/last_checkpoint.yaml
TRAIN = Path(__file__).resolve().parent.parent / "train.py"


class Timer(pl.Callback):
    """Times each training step and, every ``every`` steps, one checkpoint write; writes the
    timings to ``file`` when training ends."""

    def __init__(self, file: str, every: int):
        self.file, self.every = Path(file), every
        self.steps: list[float] = []
        self.saves: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(time.perf_counter() - self._start)
        if trainer.global_step % self.every == 0:
            start = time.perf_counter()
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
            self.saves.append(time.perf_counter() - start)

    def on_train_end(self, trainer, pl_module) -> None:
        self.file.write_text(json.dumps({"steps": self.steps, "saves": self.saves}))


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        timings = Path(folder) / "timings.json"
        command = [
            sys.executable, str(TRAIN), f"hydra.run.dir={folder}/run", "measure_baselines=false",
            f"+trainer.max_steps={args.steps}", "trainer.check_val_every_n_epoch=1000",
            "+callbacks.timer._target_=benchmarks.checkpoint_overhead.Timer",
            f"+callbacks.timer.file={timings}", f"+callbacks.timer.every={args.every}",
        ]
        subprocess.run(command, check=True, capture_output=True, text=True)
        result = json.loads(timings.read_text())
        size = (Path(folder) / "run" / "checkpoints" / "last.ckpt").stat().st_size
    steps = result["steps"][10:]  # the first steps warm up (allocator, oneDNN kernels)
    step, save = statistics.median(steps), statistics.median(result["saves"])
    print(f"default run (MobileFaceNet, ArcFace, synthetic faces, batch 32), {len(steps)} steps, "
          f"{len(result['saves'])} writes of last.ckpt ({size / 2**20:.1f} MiB)")
    print(f"median step {step * 1000:.1f} ms; median checkpoint write {save * 1000:.1f} ms "
          f"({save / step:.2f} steps)")
    run = f"default run (MobileFaceNet, ArcFace, batch 32), last.ckpt {size / 2**20:.1f} MiB"
    figures = [Figure("checkpoint_overhead", f"{run}: one checkpoint write, seconds", save / step,
                      "one training step, seconds",
                      f"{save * 1000:.1f} ms vs {step * 1000:.1f} ms, medians")]
    for label, between in (
        (f"every {DEFAULT_INTERVAL_S // 60} min (default)", DEFAULT_INTERVAL_S),
        ("every 1000 steps", 1000 * step),
        (f"every {args.every} steps (measured)", args.every * step),
    ):
        print(f"  overhead {label:<32} x{(between + save) / between:.4f}")
        if "measured" not in label:
            figures.append(Figure(
                "checkpoint_overhead", f"{run}: training time with a write {label}",
                (between + save) / between, "training time without writes",
                f"{save * 1000:.0f} ms per {between:,.0f} s of steps",
            ))
    return figures


def quick() -> list[Figure]:
    return main(["--steps", "40", "--every", "8"])


def full() -> list[Figure]:
    return main([])


if __name__ == "__main__":
    main()
