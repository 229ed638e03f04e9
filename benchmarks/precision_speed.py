"""Training-step time under each ``trainer.precision`` ÷ 32-true, same run, with the steps the
non-finite guard skipped and the fp16 loss-scaling overflows.

    python -m benchmarks.precision_speed                    # CPU: bf16-mixed vs 32-true
    python -m benchmarks.precision_speed --device cuda      # 16-mixed, bf16-mixed vs 32-true
    python -m benchmarks.precision_speed --device cuda --backbone iresnet50 --batch 128 \\
        --classes 10000 --steps 20 --rounds 3

Every precision trains its own copy of one model, as ``python train.py`` builds it: the
backbone from ``configs/backbone/NAME.yaml`` (channels_last), ArcFace on the full class-center
store, SGD (lr 0.1, momentum 0.9, insightface's weight decay), backbone gradient clipped to norm
5, ``model.nonfinite=skip``, through Lightning's Trainer (its autocast, its GradScaler for
16-mixed: one scaler per precision kept across rounds, so overflows are counted once, while the
scale settles). Random images and labels, made once. The precisions take turns: each round
trains every precision for ``--steps`` steps (a fresh ``Trainer.fit`` on the same module), so
all of them see the same machine load; round 0 is a warm-up and is not timed. A step is timed
from Lightning's batch-start to batch-end hook (the batch is already on the device; CUDA is
synchronised at both ends): forward, backward, the guard's check, clipping and the optimizer
step. ``÷ 32-true`` is the median step time over the 32-true median.

The guard's own device work (the gradients' non-finite check, the buffer snapshot) is timed
apart on the 32-true model; its host sync per step (the GradScaler makes one too under 16-mixed)
only shows in the step times.
"""

import argparse
import copy
import logging
import statistics
import time
import warnings
from functools import partial

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

from benchmarks.figures import Figure
from facetrain.backbones import create
from facetrain.classifiers import FullClassCenters
from facetrain.heads import ArcFace
from facetrain.module import FaceRecognitionModule, non_finite_tensors


class StepTimer(pl.Callback):
    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self, module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)


def build(args) -> FaceRecognitionModule:
    torch.manual_seed(0)
    backbone = create(args.backbone, input_size=(args.size, args.size))
    head = ArcFace()
    return FaceRecognitionModule(
        backbone, head, FullClassCenters(backbone.embedding_size, args.classes, head),
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9), channels_last=True,
    )


def plugins(precision: str, device: str) -> tuple[dict, list]:
    """Trainer arguments for ``precision``: 16-mixed gets a GradScaler of its own that lives
    across the rounds (Lightning would make a new one, at the initial scale, every fit)."""
    if precision == "16-mixed":
        return {}, [MixedPrecision("16-mixed", device, scaler=torch.amp.GradScaler(device))]
    return {"precision": precision}, []


def train_steps(module, loader, steps, device, precision_args, timer) -> None:
    options, extra = precision_args
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=steps,
        gradient_clip_val=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer], plugins=extra,
        log_every_n_steps=max(steps, 1), **options,
    )
    trainer.fit(module, loader)


def guard_ms(module, device: str, repeats: int = 20) -> float:
    """Median milliseconds of the guard's device work on ``module`` with gradients set."""
    module.to(device)
    for parameter in module.parameters():
        parameter.grad = torch.randn_like(parameter)
    gradients = [p.grad for p in module.parameters()]
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        bad = non_finite_tensors(gradients)
        module._snapshot_buffers()
        bad.tolist()  # the host read, as on_before_optimizer_step
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backbone", default="mobilefacenet")
    parser.add_argument("--size", type=int, default=None, help="input size (CPU 64, CUDA 112)")
    parser.add_argument("--batch", type=int, default=None, help="per step (CPU 16, CUDA 128)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=None, help="per round (CPU 3, CUDA 20)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after a warm-up")
    parser.add_argument("--precisions", nargs="+", default=None,
                        help="default: 16-mixed (CUDA only), bf16-mixed (where supported)")
    args = parser.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)  # a Trainer per round
    warnings.filterwarnings("ignore", message=r".*(val_dataloader|LeafSpec|GPU available)")
    cuda = args.device == "cuda"
    args.size = args.size or (112 if cuda else 64)
    args.batch = args.batch or (128 if cuda else 16)
    args.steps = args.steps or (20 if cuda else 3)
    if args.precisions is None:
        args.precisions = ["16-mixed"] if cuda else []
        if not cuda or torch.cuda.is_bf16_supported():
            args.precisions.append("bf16-mixed")
    precisions = ["32-true", *[p for p in args.precisions if p != "32-true"]]

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch * args.steps, 3, args.size, args.size, generator=generator)
    labels = torch.randint(0, args.classes, (len(images),), generator=generator)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=args.batch, drop_last=True
    )
    model = build(args)
    modules = {precision: copy.deepcopy(model) for precision in precisions}
    trainer_args = {precision: plugins(precision, args.device) for precision in precisions}
    timers = {precision: StepTimer() for precision in precisions}
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.backbone} at {args.size}x{args.size}, batch {args.batch}, {args.classes} classes,"
          f" ArcFace + SGD, {where}; {args.rounds} rounds of {args.steps} steps per precision "
          f"after a warm-up round, interleaved", flush=True)
    for round_ in range(args.rounds + 1):
        for precision in precisions:
            timer = timers[precision] if round_ else StepTimer()  # round 0: warm-up
            train_steps(modules[precision], loader, args.steps, args.device,
                        trainer_args[precision], timer)

    baseline = statistics.median(timers["32-true"].times)
    print(f"{'precision':<12}{'ms/step':>10}{'÷ 32-true':>11}{'skipped':>9}{'amp overflows':>15}")
    setup = (f"{args.backbone} {args.size}x{args.size} + ArcFace training step, batch "
             f"{args.batch}, {'CUDA' if cuda else 'CPU'}")
    figures = []
    for precision in precisions:
        seconds = statistics.median(timers[precision].times)
        module = modules[precision]
        overflows = module.amp_overflow_steps if precision == "16-mixed" else "-"
        print(f"{precision:<12}{1e3 * seconds:>10.1f}{seconds / baseline:>10.2f}x"
              f"{module.nonfinite_skipped:>9}{overflows:>15}")
        if precision != "32-true":
            figures.append(Figure(
                "precision_speed", f"{setup}, trainer.precision={precision}: ms",
                seconds / baseline, "the same step at 32-true, ms",
                f"{1e3 * seconds:.1f} ms vs {1e3 * baseline:.1f} ms; {module.nonfinite_skipped} "
                "steps skipped" + (f", {overflows} amp overflows" if overflows != "-" else ""),
            ))
    guard = guard_ms(copy.deepcopy(model), args.device)
    print(f"non-finite guard's device work (32-true model): {guard:.2f} ms per step")
    figures.append(Figure(
        "precision_speed", f"{setup}: the non-finite guard's device work, ms", guard / baseline /
        1e3, "the 32-true step it guards, ms", f"{guard:.2f} ms vs {1e3 * baseline:.1f} ms",
    ))
    return figures


def quick() -> list[Figure]:
    """The device there is, at its default size (on a CPU: bf16-mixed vs 32-true at 64x64),
    one timed round."""
    return main(["--device", "cuda" if torch.cuda.is_available() else "cpu", "--rounds", "1"])


def full() -> list[Figure]:
    return main(["--device", "cuda" if torch.cuda.is_available() else "cpu"])


if __name__ == "__main__":
    main()
