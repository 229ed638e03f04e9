"""CPU inference latency of an exported ONNX backbone (onnxruntime) ÷ the same backbone in
PyTorch, same run.

    python -m benchmarks.onnx_latency                              # MobileFaceNet, batch 1 and 64
    python -m benchmarks.onnx_latency --backbones mobilefacenet iresnet50 --repeats 20
    python -m benchmarks.onnx_latency --threads 1

Each backbone is built from its ``configs/backbone/*.yaml`` (``facetrain.backbones.create``) at
``--input-size`` (112x112 by default), its BatchNorm statistics set from synthetic faces (a
fresh network's near-zero activations would time denormal arithmetic, not the network), exported
with ``facetrain.export.write_onnx`` and checked for parity before timing. PyTorch runs in eval
mode under ``torch.inference_mode`` in both memory layouts (NCHW, and channels_last as training
and ``facetrain-embed`` use); onnxruntime uses the CPU execution provider with the same number
of threads and without spin-waiting. Each runtime is timed in blocks of consecutive calls, the
blocks of the three runtimes alternating over 3 rounds so that all see the same machine load;
the median is reported. (Calls alternating one by one would time thread pools waking up: on a
loaded 2-core machine a PyTorch call right after an onnxruntime call took up to 3 s.)
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

from benchmarks.figures import Figure
from facetrain.backbones import create
from facetrain.data.synthetic import draw_face, sample_traits
from facetrain.data.transforms import build_transform
from facetrain.export import check_parity, onnx_runner, write_onnx

ROUNDS = 3  # blocks per runtime, alternated so that every runtime sees the same machine load


def face_batch(count: int, input_size: list[int]) -> torch.Tensor:
    rng = np.random.default_rng(0)
    transform = build_transform([], input_size, (0.5,) * 3, (0.5,) * 3)
    faces = [draw_face(sample_traits(rng), rng) for _ in range(count)]
    return torch.stack([transform(image=face)["image"] for face in faces])


@torch.no_grad()
def calibrate_batchnorm(backbone: nn.Module, images: torch.Tensor) -> nn.Module:
    for module in backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass gives the batch statistics
    backbone.train()(images)
    return backbone.eval()


def seconds(run, images) -> float:
    start = time.perf_counter()
    run(images)
    return time.perf_counter() - start


def latencies(name: str, faces: torch.Tensor, args, threads: int) -> list[Figure]:
    """Print one row per batch size for backbone ``name``; a figure per batch and layout."""
    backbone = calibrate_batchnorm(create(name, input_size=args.input_size), faces[:32])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    # ORT's pool spin-waits after each run by default, which would steal the cores from the
    # PyTorch run timed next; a server sharing its cores turns it off too.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.onnx"
        write_onnx(backbone, faces[:2], path, {})
        parity = check_parity(backbone, onnx_runner(path), faces[:8])
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    nhwc = create(name, input_size=args.input_size)
    nhwc.load_state_dict(backbone.state_dict())
    nhwc = nhwc.eval().to(memory_format=torch.channels_last)
    runs = {
        "torch": backbone,
        "torch_nhwc": lambda x: nhwc(x.contiguous(memory_format=torch.channels_last)),
        "ort": lambda x: session.run(None, {"images": x.numpy()}),
    }
    figures = []
    for batch in args.batches:
        images = faces[:batch].contiguous()
        times = {key: [] for key in runs}
        with torch.inference_mode():
            for _ in range(ROUNDS):
                for key, run in runs.items():
                    for _ in range(2):  # warm-up: oneDNN primitives, ORT arena, thread wake-up
                        run(images)
                    times[key] += [seconds(run, images) for _ in range(args.repeats // ROUNDS)]
        ms = {key: 1000 * statistics.median(values) for key, values in times.items()}
        print(f"{name:<16}{batch:>6}{ms['torch']:>10.2f}{ms['torch_nhwc']:>14.2f}"
              f"{ms['ort']:>13.2f}{ms['ort'] / ms['torch']:>15.2f}"
              f"{ms['ort'] / ms['torch_nhwc']:>12.2f}")
        for key, layout in (("torch", "NCHW"), ("torch_nhwc", "channels_last")):
            figures.append(Figure(
                "onnx_latency", f"{name} ONNX, onnxruntime CPU, batch {batch}: ms per call",
                ms["ort"] / ms[key], f"the same backbone in PyTorch eval ({layout}), ms",
                f"{ms['ort']:.2f} ms vs {ms[key]:.2f} ms, {threads} threads",
            ))
    print(f"{'':<16}parity on 8 faces: {parity}")
    return figures


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["mobilefacenet"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--input-size", type=int, nargs=2, default=[112, 112])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)

    threads = args.threads
    torch.set_num_threads(threads)
    faces = face_batch(max(args.batches), args.input_size)
    print(f"CPU inference latency, {threads} threads, input {args.input_size[0]}x"
          f"{args.input_size[1]}, median of {args.repeats} (ms per batch)")
    print(f"{'backbone':<16}{'batch':>6}{'PyTorch':>10}{'PyTorch NHWC':>14}{'onnxruntime':>13}"
          f"{'ORT / PyTorch':>15}{'ORT / NHWC':>12}")
    return [figure for name in args.backbones for figure in latencies(name, faces, args, threads)]


def quick() -> list[Figure]:
    return main(["--batches", "1", "16", "--repeats", "9"])


def full() -> list[Figure]:
    return main([])


if __name__ == "__main__":
    main()
