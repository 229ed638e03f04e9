"""What ``model.compile=true`` buys: a training step's forward + backward through
``torch.compile`` (inductor) ÷ the same step eager, and what the compile costs.

    python -m benchmarks.compile_speed                         # MobileFaceNet 64x64, CPU
    python -m benchmarks.compile_speed --backbone iresnet50 --image-size 112 --device cuda

The backbone is built from ``configs/backbone/NAME.yaml`` (``facetrain.backbones.create``) in
channels_last, as the default run trains it, and compiled as ``FaceRecognitionModule`` compiles
it: ``torch.compile(backbone.forward)``. A step is forward, the ArcFace loss on full class centers
(``--classes``, eager on both sides: the module compiles the backbone only) and backward. The
compiled and the eager step alternate, so both see the same machine load; on a CPU shared with
other work the steps are timed in process CPU time (one thread: the same as wall time on an idle
machine), on a GPU in wall time with synchronisation. ``--head`` also times the class-center
store + margin compiled against eager, the part the module leaves eager. Compile time is the
wall time of the first compiled step (tracing, AOTAutograd, inductor's code generation) minus
an eager step.
"""

import argparse
import statistics
import time

import torch

from benchmarks.figures import Figure
from facetrain.backbones import create
from facetrain.classifiers import FullClassCenters
from facetrain.heads import ArcFace


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def timed(step, device: torch.device) -> float:
    start = clock(device)
    step()
    return clock(device) - start


def compare(compiled_step, eager_step, device, steps: int) -> tuple[float, float, float]:
    """(compile seconds, median compiled step, median eager step): the first compiled step
    (wall) less an eager one, then ``steps`` interleaved pairs after one warm-up each."""
    eager_seconds = timed(eager_step, device)
    start = time.perf_counter()
    compiled_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    compile_seconds = time.perf_counter() - start - eager_seconds
    compiled_step(), eager_step()
    compiled, eager = [], []
    for _ in range(steps):
        compiled.append(timed(compiled_step, device))
        eager.append(timed(eager_step, device))
    return compile_seconds, statistics.median(compiled), statistics.median(eager)


def backbone_steps(name: str, image_size: int, batch: int, classes: int, device):
    """The eager and the compiled training step of backbone ``name``, and its label."""
    torch.manual_seed(0)
    backbone = create(name, input_size=(image_size, image_size))
    backbone = backbone.to(device, memory_format=torch.channels_last).train()
    head = ArcFace()
    centers = FullClassCenters(backbone.embedding_size, classes, head).to(device)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), device=device)
    compiled_forward = torch.compile(backbone.forward)

    def step(forward):
        def run():
            centers(forward(images), labels, head).loss.backward()
        return run

    label = f"{backbone.architecture} {image_size}x{image_size}"
    return step(compiled_forward), step(backbone), label


def head_steps(embedding_size: int, batch: int, classes: int, device):
    """The eager and the compiled step (forward + backward) of ArcFace on full class centers."""
    torch.manual_seed(0)
    head = ArcFace()
    centers = FullClassCenters(embedding_size, classes, head).to(device)
    embeddings = torch.randn(batch, embedding_size, device=device, requires_grad=True)
    labels = torch.randint(0, classes, (batch,), device=device)
    compiled = torch.compile(centers.forward)

    def step(forward):
        def run():
            forward(embeddings, labels, head).loss.backward()
        return run

    return step(compiled), step(centers)


def figures(backbone: str, image_size: int, batch: int, classes: int, steps: int,
            device: torch.device, head: bool) -> list[Figure]:
    where = f"batch {batch}, {device.type}" + (
        f" {torch.get_num_threads()} thread(s)" if device.type == "cpu" else "")
    compiled_step, eager_step, label = backbone_steps(backbone, image_size, batch, classes,
                                                      device)
    compile_s, compiled, eager = compare(compiled_step, eager_step, device, steps)
    result = [Figure(
        "compile_speed", f"{label} training step (fwd+bwd, ArcFace {classes} classes), "
        f"model.compile=true, {where}", compiled / eager, "the same step eager",
        f"{compiled * 1000:.1f} / {eager * 1000:.1f} ms per step, median of {steps}; compile "
        f"{compile_s:.0f} s (= {compile_s / max(eager - compiled, 1e-9):.0f} steps' saving)"
        if compiled < eager else
        f"{compiled * 1000:.1f} / {eager * 1000:.1f} ms per step, median of {steps}; compile "
        f"{compile_s:.0f} s, never paid back",
    )]
    if head:
        compiled_step, eager_step = head_steps(512, batch, classes, device)
        compile_s, compiled, eager = compare(compiled_step, eager_step, device, steps)
        result.append(Figure(
            "compile_speed", f"ArcFace on {classes} full class centers (D=512) fwd+bwd compiled, "
            f"{where}", compiled / eager, "the same eager",
            f"{compiled * 1000:.2f} / {eager * 1000:.2f} ms per step, median of {steps}; "
            f"compile {compile_s:.0f} s",
        ))
    return result


def quick() -> list[Figure]:
    torch.set_num_threads(1)
    return figures("mobilefacenet", 64, 32, 400, 10, torch.device("cpu"), head=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilefacenet")
    parser.add_argument("--image-size", type=int, default=64, help="64: the default run's")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=400)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--head", action="store_true", help="also time the head compiled")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for figure in figures(args.backbone, args.image_size, args.batch, args.classes, args.steps,
                          torch.device(args.device), args.head):
        print(f"{figure.name}: x{figure.ratio:.3f} of {figure.baseline} ({figure.detail})")


if __name__ == "__main__":
    main()
