"""Backbone size, cost and training-step throughput ÷ stock torchvision resnet18, same run.

    python -m benchmarks.backbone_speed                       # every configs/backbone/*.yaml
    python -m benchmarks.backbone_speed --backbones sphereface20 iresnet50 --steps 5
    python -m benchmarks.backbone_speed --backbones timm --timm-model convnext_atto
    python -m benchmarks.backbone_speed --backbones sphereface4 --compile
    python -m benchmarks.backbone_speed --device cuda --batch 128

Each backbone is built from its ``configs/backbone/NAME.yaml`` by
``facetrain.backbones.create(NAME)``, at its paper's input size (the constructors' default:
SphereFace 112x96, the others 112x112), so what is timed is what ``python train.py
backbone=NAME`` runs. The family files (``iresnet``, ``sphereface``, ``resnet``: no depth) are
left out. Parameters and multiply-accumulates (MACs = FLOPs / 2, one image) come
from ``facetrain.backbones.complexity``. A step is forward + backward of a batch (loss: the mean
squared embedding; no head) in the training memory format (channels_last unless
``--contiguous``). The baseline is stock ``torchvision.models.resnet18`` (1000 classes) at
112x112 with the same batch; its steps are interleaved with the backbone's so both see the same
machine load. ``÷ resnet18`` is backbone images/s over baseline images/s (medians).
``--compile`` also times ``torch.compile`` (inductor) and prints compiled ÷ eager throughput.
"""

import argparse
import statistics
import time

import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from benchmarks.figures import Figure
from facetrain.backbones import available, count_macs, count_parameters, create, load_config

# Figures published for the same architecture (see each backbone's model-card docstring).
PUBLISHED = {
    "sphereface20": "22.67M, 1.75 GMACs (OpenVINO card)",
    "iresnet18": "2.6 GMACs (arcface_torch)",
    "iresnet50": "43.58M, 6.3 GMACs",
    "iresnet100": "65.13M, 12.1 GMACs",
    "iresnet200": "23.5 GMACs (arcface_torch)",
    "mobilefacenet": "0.99M, 0.221 GMACs (paper)",
}


def family_then_depth(name: str) -> tuple[str, int]:
    """sphereface4 < sphereface10 < ... < iresnet18 < iresnet200 (by family, then depth)."""
    family = name.rstrip("0123456789")
    return family, int(name[len(family):] or 0)


def has_every_value(name: str) -> bool:
    """False for the family files, which leave ``depth: ???`` to the depth files."""
    config = load_config(name)
    return not any(OmegaConf.is_missing(config, key) for key in config)


def step_time(model: nn.Module, images: torch.Tensor) -> float:
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(images).float().square().mean().backward()
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model, baseline, images, baseline_images, steps) -> tuple[float, float]:
    """Median step seconds of ``model`` and of ``baseline``, interleaved, after one warm-up."""
    step_time(model, images), step_time(baseline, baseline_images)
    times, baseline_times = [], []
    for _ in range(steps):
        times.append(step_time(model, images))
        baseline_times.append(step_time(baseline, baseline_images))
    return statistics.median(times), statistics.median(baseline_times)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = sorted(filter(has_every_value, available()), key=family_then_depth)
    parser.add_argument("--backbones", nargs="+", default=[n for n in names if n != "timm"],
                        choices=names, metavar="NAME", help=f"any of {', '.join(names)}")
    parser.add_argument("--timm-model", default="resnet18", help="model_name for --backbones timm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Figure]:
    args = parse(argv)
    device = torch.device(args.device)
    memory_format = torch.contiguous_format if args.contiguous else torch.channels_last
    generator = torch.Generator().manual_seed(0)

    def batch(size):
        images = torch.randn(args.batch, 3, *size, generator=generator)
        return images.to(device).contiguous(memory_format=memory_format)

    torch.manual_seed(0)
    baseline = torchvision.models.resnet18(weights=None).to(device, memory_format=memory_format)
    baseline_images = batch((112, 112))
    layout = "NCHW" if args.contiguous else "channels_last"
    print(f"forward+backward, batch {args.batch}, {device}, {layout}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps; baseline: stock "
          f"torchvision resnet18 at 112x112")
    header = (f"{'backbone':<14}{'input':>8}{'params':>9}{'GMACs':>8}  {'published':<36}"
              f"{'img/s':>8}{'÷ resnet18':>12}")
    print(header + (f"{'compiled ÷ eager':>18}" if args.compile else ""), flush=True)
    figures = []
    for name in args.backbones:
        torch.manual_seed(0)
        model = create(name, **({"model_name": args.timm_model} if name == "timm" else {}))
        model, size = model.to(device, memory_format=memory_format), model.input_size
        macs = count_macs(model, size)
        model.train()
        images = batch(size)
        seconds, baseline_seconds = measure(model, baseline, images, baseline_images, args.steps)
        label = f"timm:{args.timm_model}" if name == "timm" else name
        params = count_parameters(model) / 1e6
        row = (f"{label:<14}{f'{size[0]}x{size[1]}':>8}{params:>8.2f}M"
               f"{macs / 1e9:>8.2f}  {PUBLISHED.get(name, '-'):<36}"
               f"{args.batch / seconds:>8.1f}{baseline_seconds / seconds:>11.2f}x")
        step = f"{label} {size[0]}x{size[1]} training step ({layout}), batch {args.batch}"
        figures.append(Figure(
            "backbone_speed", f"{step}: images/s", baseline_seconds / seconds,
            "torchvision resnet18 at 112x112, images/s",
            f"{args.batch / seconds:.1f} vs {args.batch / baseline_seconds:.1f} images/s; "
            f"{params:.2f}M params, {macs / 1e9:.2f} GMACs",
        ))
        if args.compile:
            start = time.perf_counter()
            compiled = torch.compile(model)
            step_time(compiled, images)
            compile_seconds = time.perf_counter() - start
            compiled_seconds, eager_seconds = measure(compiled, model, images, images, args.steps)
            row += f"{eager_seconds / compiled_seconds:>11.2f}x ({compile_seconds:.0f} s compile)"
            figures.append(Figure(
                "backbone_speed", f"{step}, torch.compile: images/s",
                eager_seconds / compiled_seconds, "the same backbone eager, images/s",
                f"{args.batch / compiled_seconds:.1f} vs {args.batch / eager_seconds:.1f} "
                f"images/s; {compile_seconds:.0f} s to compile",
            ))
        print(row, flush=True)
        del model
    return figures


def quick() -> list[Figure]:
    """The default backbone, the smallest insightface iresnet and SphereFace's paper net (the
    larger ones take minutes a step on 2 cores), batch 8."""
    return main(["--backbones", "mobilefacenet", "iresnet18", "sphereface20", "--batch", "8",
                 "--steps", "3"])


def full() -> list[Figure]:
    return main([])


if __name__ == "__main__":
    main()
