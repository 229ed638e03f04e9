"""facetrain-eval throughput on a 6,000-pair verification set (LFW's size), flip-test off and on.

    python -m benchmarks.eval_speed                       # MobileFaceNet, 112x112, CPU
    python -m benchmarks.eval_speed --identities 600 --device cuda

The set is drawn once by the synthetic face generator (cached under ``$FACETRAIN_DATA_DIR`` or
``data/``) and evaluated through ``facetrain.eval.evaluate`` exactly as the CLI runs it, from a
checkpoint of an untrained MobileFaceNet (speed does not depend on the weights). The baseline is
the bare backbone forward pass over the same number of images as random tensors in the same
batches (no reading, decoding, resizing, flip or metrics), measured before and after the two
evaluations and averaged; the ratio is eval time / baseline. Flip-test doubles the forward
passes, so its ratio should be near twice the other's when the network dominates.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from benchmarks.figures import Figure
from facetrain.backbones import MobileFaceNet
from facetrain.data import SyntheticFaces
from facetrain.data.pairs import read_pair_list
from facetrain.eval import evaluate
from facetrain.resources import config_dir


def write_checkpoint(path: Path, pairs_file: str | None, image_size: int) -> None:
    """A checkpoint shaped like a training run's: backbone weights plus facetrain's description
    (validated on ``pairs_file``, or on no set when None)."""
    backbone = MobileFaceNet(embedding_size=128, input_size=(image_size, image_size))
    description = {
        "version": 1,
        "backbone": {"_target_": "facetrain.backbones.MobileFaceNet", "embedding_size": 128,
                     "input_size": [image_size, image_size]},
        "loss": None, "embedding_size": 128, "num_classes": 0,
        "data": {"image_size": [image_size] * 2, "mean": [0.5] * 3, "std": [0.5] * 3,
                 "verification": {"bench": pairs_file} if pairs_file else {}},
    }
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    torch.save({"state_dict": state, "facetrain": description}, path)


def bare_forward_seconds(num_images: int, image_size: int, batch_size: int, device) -> float:
    backbone = MobileFaceNet(input_size=(image_size, image_size)).eval().to(device)
    backbone.to(memory_format=torch.channels_last)
    batches = [min(batch_size, num_images - i) for i in range(0, num_images, batch_size)]
    with torch.no_grad():
        backbone(torch.randn(2, 3, image_size, image_size, device=device))  # warm-up
        start = time.perf_counter()
        for size in batches:
            images = torch.randn(size, 3, image_size, image_size, device=device)
            backbone(images.contiguous(memory_format=torch.channels_last)).cpu()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--identities", type=int, default=300)
    parser.add_argument("--images-per-identity", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    data_dir = Path(os.environ.get("FACETRAIN_DATA_DIR", "data"))
    name = f"bench_eval_{args.identities}x{args.images_per_identity}_{args.pairs}"
    faces = SyntheticFaces(
        root=str(data_dir / name),
        num_train_identities=2, images_per_train_identity=2,
        num_verification_identities=args.identities,
        images_per_verification_identity=args.images_per_identity, num_pairs=args.pairs,
    ).generate()
    pairs_file = str(Path(faces.root, "verification_pairs.txt").resolve())

    num_images = len(read_pair_list(pairs_file)[0])
    bare = [bare_forward_seconds(num_images, args.image_size, args.batch_size, args.device)]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "model.ckpt"
        write_checkpoint(checkpoint, pairs_file, args.image_size)
        for flip in (False, True):
            with initialize_config_dir(config_dir(), version_base="1.3"):
                cfg = compose("eval", overrides=[
                    f"checkpoint={checkpoint}", f"flip_test={flip}", f"output={folder}",
                    f"batch_size={args.batch_size}", f"num_workers={args.num_workers}",
                    f"device={args.device}",
                ])
            start = time.perf_counter()
            result = evaluate(cfg)["checkpoints"]["model"]["sets"]["bench"]
            rows.append((f"facetrain-eval, flip {'on' if flip else 'off'}",
                         time.perf_counter() - start, result["num_images"], result["num_pairs"]))
    bare.append(bare_forward_seconds(num_images, args.image_size, args.batch_size, args.device))
    baseline = statistics.mean(bare)  # before and after: both see the machine's load drift
    num_pairs = rows[0][3]
    rows.insert(0, ("bare forward (baseline)", baseline, num_images, num_pairs))

    print(f"\n{num_pairs} pairs over {num_images} images, MobileFaceNet "
          f"{args.image_size}x{args.image_size}, batch {args.batch_size}, {args.num_workers} "
          f"loader workers, {args.device} ({torch.get_num_threads()} threads)")
    print(f"{'':<28}{'seconds':>9}{'images/s':>10}{'pairs/s':>10}{'÷ baseline':>12}")
    for name, seconds, images, pairs in rows:
        print(f"{name:<28}{seconds:>9.2f}{images / seconds:>10.1f}{pairs / seconds:>10.1f}"
              f"{seconds / baseline:>12.2f}")
    return [
        Figure("eval_speed", f"{name}, {num_pairs:,} pairs over {num_images:,} images: seconds",
               seconds / baseline, "bare MobileFaceNet forward over as many random tensors",
               f"{seconds:.2f} s vs {baseline:.2f} s; {pairs / seconds:.0f} pairs/s, "
               f"{args.device}, {args.num_workers} loader workers")
        for name, seconds, images, pairs in rows[1:]
    ]


def quick() -> list[Figure]:
    """A twentieth of LFW's 6,000 pairs."""
    return main(["--pairs", "300", "--identities", "40", "--images-per-identity", "6"])


def full() -> list[Figure]:
    return main([])


if __name__ == "__main__":
    main()
