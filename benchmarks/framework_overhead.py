"""What the framework costs per training step: the real ``FaceRecognitionModule`` in the real
``pl.Trainer`` of ``python train.py`` ÷ a hand-written PyTorch loop, same model, same batch.

    python -m benchmarks.framework_overhead                  # default run: MobileFaceNet, 64x64
    python -m benchmarks.framework_overhead --image-size 112 --rounds 8

The trainer side is the default job run through the real entry point (``python -m
facetrain.cli.train``), so its callbacks (checkpointing, learning-rate monitor, progress bar,
ROC, projector, histograms, throughput, preemption, random state), its TensorBoard logger and
``trainer.log_every_n_steps`` are what the default config composes. Two things are swapped for
the measurement: the data (``FixedBatch``: one batch of the default data's shape and number of
classes, yielded every step, so neither side reads images) and one more callback
(``Interleave``), which runs the hand-written loop inside the same process between rounds of
trainer steps, so both see the same machine load.

The hand-written loop trains deep copies of the module's backbone, margin and class centers
with an optimizer and schedule of the trainer's own settings (AdamW at the default learning
rate and weight decays, the warm-up/cosine factor every step) and clips the backbone's gradient
to the default ``trainer.gradient_clip_val``: ``zero_grad``, forward, loss, ``backward``,
``clip_grad_norm_``, ``step``, schedule step — and nothing else (no logging, no checks).

A round is ``--steps`` consecutive trainer steps, timed from the end of one batch to the end of
the batch ``--steps`` later (every hook, callback, logger write and progress-bar update of
those steps included), then as many hand-written steps. ``--steps`` defaults to the histogram
interval, a multiple of the logging interval, so that each round holds the same logging steps.
The ratio is the median over rounds of (trainer round ÷ the loop's round that follows).
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from benchmarks.figures import Figure

MODULE = "benchmarks.framework_overhead"  # what Hydra imports the two classes from
WALL, CPU = 0, 1  # the two clocks of each round
WARMUP_STEPS = 20  # first steps: allocator, oneDNN primitive cache, the throughput warm-up


class _Repeat(Dataset):
    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], length: int):
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.batch


class FixedBatch(pl.LightningDataModule):
    """Stands in for ``data=synthetic`` (``data._target_=...FixedBatch``, the group's other keys
    taken and ignored): one seeded batch of ``batch_size`` random images at ``image_size`` with
    labels among the synthetic data's ``num_train_identities`` classes, ``steps`` times per
    epoch; no verification sets (no validation)."""

    def __init__(self, image_size, batch_size: int, synthetic, steps: int, **_ignored):
        super().__init__()
        self.batch_size = int(batch_size)
        self.num_classes = int(synthetic.num_train_identities)
        generator = torch.Generator().manual_seed(0)
        self.batch = (
            torch.randn(self.batch_size, 3, *image_size, generator=generator),
            torch.randint(0, self.num_classes, (self.batch_size,), generator=generator),
        )
        self.train_set = _Repeat(self.batch, int(steps))
        self.sampler = None
        self.verification_sets: list = []

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=None, shuffle=False)

    def load_failures(self) -> dict:
        return {"count": 0, "first": []}


class HandLoop:
    """The loop a user writes without a framework, on copies of ``module``'s parts and with
    ``trainer``'s optimizer and schedule settings."""

    def __init__(self, module, trainer: pl.Trainer, batch):
        self.backbone = copy.deepcopy(module.backbone)
        self.head = copy.deepcopy(module.head)
        self.classifier = copy.deepcopy(module.classifier)
        self.channels_last = module.channels_last
        self.clip = trainer.gradient_clip_val
        groups = trainer.optimizers[0].param_groups
        own = [list(self.backbone.parameters()),
               [p for p in [*self.classifier.parameters(), *self.head.parameters()] if p.ndim]]
        if [len(g["params"]) for g in groups] != [len(params) for params in own]:
            raise RuntimeError("the trainer's parameter groups are not backbone + class centers: "
                               "this benchmark times the default ArcFace run")
        settings = [{k: v for k, v in g.items() if k not in ("params", "initial_lr")}
                    for g in groups]
        self.optimizer = torch.optim.AdamW(
            [{"params": params, **s} for params, s in zip(own, settings, strict=True)]
        )
        self.scheduler = LambdaLR(self.optimizer, trainer.lr_scheduler_configs[0].scheduler
                                  .lr_lambdas)
        self.images, self.labels = batch
        if self.channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        embeddings = self.backbone(self.images)
        loss = self.classifier(embeddings, self.labels, self.head).loss
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process: every thread, the logger's and the
    progress bar's included)."""
    return time.perf_counter(), time.process_time()


def elapsed(start: tuple[float, float], end: tuple[float, float]) -> list[float]:
    return [end[0] - start[0], end[1] - start[1]]


class Interleave(pl.Callback):
    """After ``warmup`` trainer steps, alternates rounds of ``steps`` trainer steps with
    ``steps`` steps of the hand-written loop; writes the rounds' seconds to ``file`` at the end
    of training."""

    def __init__(self, file: str, steps: int, warmup: int = WARMUP_STEPS):
        self.file, self.steps, self.warmup = Path(file), int(steps), int(warmup)
        self.trainer_rounds: list[list[float]] = []  # [wall, CPU] seconds of each round
        self.loop_rounds: list[list[float]] = []
        self.loop: HandLoop | None = None
        self._round_start = clock()
        self._batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = clock()
        self._batches += 1
        if self._batches < self.warmup or (self._batches - self.warmup) % self.steps:
            return
        if self._batches == self.warmup:  # the hand loop warms up too
            self.loop = HandLoop(pl_module, trainer, trainer.datamodule.batch)
            for _ in range(self.warmup):
                self.loop.step()
        else:
            self.trainer_rounds.append(elapsed(self._round_start, now))
            start = clock()
            for _ in range(self.steps):
                self.loop.step()
            self.loop_rounds.append(elapsed(start, clock()))
        self._round_start = clock()

    def on_train_end(self, trainer, pl_module) -> None:
        self.file.write_text(json.dumps({"trainer": self.trainer_rounds,
                                         "loop": self.loop_rounds}))


def measure(rounds: int, steps: int, image_size: int, threads: int,
            overrides: tuple[str, ...] = ()) -> dict:
    """Run the default job with ``Interleave`` for ``rounds`` rounds; the rounds' seconds."""
    total = WARMUP_STEPS + rounds * steps + 1  # the last batch ends the final round
    with tempfile.TemporaryDirectory() as folder:
        timings = Path(folder) / "timings.json"
        command = [
            sys.executable, "-m", "facetrain.cli.train", f"hydra.run.dir={folder}/run",
            "measure_baselines=false", "trainer.max_epochs=1", f"+trainer.max_steps={total}",
            f"data._target_={MODULE}.FixedBatch", f"+data.steps={total}",
            "data.verification={}", f"data.image_size=[{image_size},{image_size}]",
            f"+callbacks.interleave._target_={MODULE}.Interleave",
            f"+callbacks.interleave.file={timings}", f"+callbacks.interleave.steps={steps}",
            *overrides,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                           os.environ.get("PYTHONPATH")]))}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode:
            raise RuntimeError(f"the training run failed:\n{result.stderr[-3000:]}")
        return json.loads(timings.read_text())


def summarize(timings: dict, steps: int, kind: int) -> tuple[float, float, float]:
    """Of the ``kind`` of time (0: wall, 1: CPU), the median ratio of each trainer round to the
    loop round after it, and each side's median milliseconds per step."""
    trainer = [round_[kind] for round_ in timings["trainer"]]
    loop = [round_[kind] for round_ in timings["loop"]]
    ratios = [t / h for t, h in zip(trainer, loop, strict=True)]
    return (statistics.median(ratios), statistics.median(trainer) / steps * 1000,
            statistics.median(loop) / steps * 1000)


def describe(image_size: int, threads: int) -> str:
    return (f"MobileFaceNet {image_size}x{image_size}, ArcFace on 400 full class centers, AdamW, "
            f"batch 32, CPU {threads} thread(s)")


def quick() -> list[Figure]:
    steps, threads, image_size, rounds = 50, 1, 64, 4
    timings = measure(rounds, steps, image_size, threads)
    ratio, trainer_ms, loop_ms = summarize(timings, steps, CPU)
    wall_ratio = summarize(timings, steps, WALL)[0]
    return [Figure(
        "framework_overhead", f"training step in pl.Trainer with the default callbacks and "
        f"logger ({describe(image_size, threads)})", ratio,
        "hand-written PyTorch loop, same model and batch",
        f"CPU {trainer_ms:.1f} / {loop_ms:.1f} ms per step (wall-clock ratio x{wall_ratio:.3f}), "
        f"median of {rounds} interleaved rounds of {steps}", "<= 1.02x",
    )]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=50, help="steps per round (a multiple of "
                        "trainer.log_every_n_steps and of the histogram interval)")
    parser.add_argument("--image-size", type=int, default=64, help="64: the default run's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="more train.py overrides for both runs")
    args = parser.parse_args()
    timings = measure(args.rounds, args.steps, args.image_size, args.threads,
                      tuple(args.overrides))
    print(f"{describe(args.image_size, args.threads)}; {args.rounds} rounds of {args.steps} "
          f"steps, interleaved; ms per step")
    print(f"{'round':>5}{'trainer CPU':>13}{'loop CPU':>10}{'ratio':>8}{'trainer wall':>14}"
          f"{'loop wall':>11}{'ratio':>8}")
    for index, (trainer, loop) in enumerate(zip(timings["trainer"], timings["loop"],
                                                strict=True)):
        cells = [f"{trainer[k] / args.steps * 1000:.2f}{'':>2}{loop[k] / args.steps * 1000:.2f}"
                 f"{'':>2}x{trainer[k] / loop[k]:.3f}" for k in (CPU, WALL)]
        print(f"{index:>5}  {cells[0]:>30}  {cells[1]:>30}")
    for kind, label in ((CPU, "CPU time"), (WALL, "wall clock")):
        ratio, trainer_ms, loop_ms = summarize(timings, args.steps, kind)
        print(f"{label}: median trainer step {trainer_ms:.2f} ms, hand-written loop "
              f"{loop_ms:.2f} ms; overhead x{ratio:.3f} (aim <= 1.02)")


if __name__ == "__main__":
    main()
