"""Is the loader the bottleneck? Data-loading throughput ÷ the training step's consumption rate.

    python -m benchmarks.data_loading                       # 112x112, 2 workers, batch 64
    python -m benchmarks.data_loading --workers 8 --device cuda

Writes synthetic faces (112x112 JPEGs, as ``python train.py`` trains on) as an identity folder
and packs them as RecordIO, then measures, in the same run: images/s out of a ``DataLoader``
(default train transforms from ``configs/data/augmentation/default.yaml``) for the folder and the
pack, and images/s consumed by a MobileFaceNet + ArcFace training step (forward, backward, SGD
step; channels_last) at the same batch size. A ratio above 1 means the loader keeps up. On a
CPU-only machine the loader workers and the training step share the cores during a real run;
here each is timed alone.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from benchmarks.figures import Figure
from facetrain.backbones import create
from facetrain.classifiers import FullClassCenters
from facetrain.data import IdentityFolderDataset, SyntheticFaces
from facetrain.data.record import RecordDataset
from facetrain.data.transforms import build_transform
from facetrain.data.writers import pack_identity_folder

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def loader_rate(dataset, batch_size: int, workers: int, batches: int) -> float:
    """Images/s over ``batches`` batches, after the first (worker start-up) is discarded."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def training_rate(batch_size: int, num_classes: int, size: int, steps: int, device: str) -> float:
    """Images/s of MobileFaceNet + ArcFace forward + backward + SGD step (median step time)."""
    backbone = create("mobilefacenet", input_size=[size, size])
    margin = instantiate(OmegaConf.load(CONFIGS / "loss" / "arcface.yaml"))
    centers = FullClassCenters(backbone.embedding_size, num_classes, margin).to(device)
    backbone = backbone.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([*backbone.parameters(), *centers.parameters()], lr=0.01)
    images = torch.randn(batch_size, 3, size, size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        loss = centers(backbone(images), labels, margin).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=100)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats; medians")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    size = 112
    augmentations = instantiate(
        OmegaConf.load(CONFIGS / "data" / "augmentation" / "default.yaml").train_augmentations
    )
    transform = build_transform(augmentations, (size, size), (0.5,) * 3, (0.5,) * 3)
    with tempfile.TemporaryDirectory(prefix="facetrain-loading-") as temporary:
        faces = SyntheticFaces(
            root=str(Path(temporary) / "faces"), num_train_identities=args.identities,
            images_per_train_identity=args.images, num_verification_identities=4,
            images_per_verification_identity=4, num_pairs=20, image_size=size,
        ).generate()
        folder = IdentityFolderDataset(faces.train_root, transform, index_cache=None)
        pack = RecordDataset(pack_identity_folder(faces.train_root, Path(temporary) / "rec"),
                             transform)
        rates: dict[str, list[float]] = {"folder": [], "rec": [], "train": []}
        for _ in range(args.rounds):
            for name, dataset in (("folder", folder), ("rec", pack)):
                rates[name].append(loader_rate(dataset, args.batch, args.workers, args.batches))
            rates["train"].append(
                training_rate(args.batch, folder.num_classes, size, args.steps, args.device)
            )
    rate = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{size}x{size}, batch {args.batch}, {args.workers} loader workers, "
          f"torch threads {torch.get_num_threads()}, {args.device}, median of {args.rounds}")
    print(f"MobileFaceNet+ArcFace training step: {rate['train']:8.0f} images/s")
    figures = []
    for name, what in (("folder", "identity folder (JPEG)"), ("rec", "RecordIO pack")):
        print(f"{name + ' loader:':<36}{rate[name]:8.0f} images/s   "
              f"= {rate[name] / rate['train']:.2f}x the training step")
        figures.append(Figure(
            "data_loading", f"{what} loader, default augmentations, {args.workers} workers, "
            f"batch {args.batch}: images/s", rate[name] / rate["train"],
            "MobileFaceNet+ArcFace training step, images/s (above 1: the loader keeps up)",
            f"{rate[name]:.0f} vs {rate['train']:.0f} images/s, {size}x{size}, {args.device}",
        ))
    return figures


def quick() -> list[Figure]:
    return main(["--identities", "20", "--images", "10", "--batch", "32", "--batches", "5",
                 "--steps", "3", "--rounds", "1"])


def full() -> list[Figure]:
    return main([])


if __name__ == "__main__":
    main()
