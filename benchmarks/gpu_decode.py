"""GPU input pipeline (data.decode=gpu) vs the CPU worker path: images/s of decoding a pack.

    python -m benchmarks.gpu_decode                       # the device is this machine's CPU
    python -m benchmarks.gpu_decode --device cuda --batch 256

Writes synthetic faces (112x112 JPEGs, as ``python train.py`` trains on) packed as RecordIO,
then times, in the same run, with the default training augmentations (flip + colour jitter,
``configs/data/augmentation/default.yaml``):

- the CPU path (data.decode=cpu): a DataLoader worker's work per batch, read each record, decode
  it with PIL, augment and normalise with albumentations, collate (the baseline);
- the device half of data.decode=gpu: ``DevicePipeline.decode`` of a collated batch on
  ``--device``: one batched ``decode_jpeg`` (nvJPEG on CUDA), flip, jitter, normalise;
- the worker half of data.decode=gpu: read each record, walk its JPEG markers, draw its
  augmentation, collate the bytes: what a worker still does per image;
- decoding alone: one batched ``torchvision.io.decode_jpeg`` call vs PIL image by image.

Everything on the CPU runs on one thread (a DataLoader worker is one process on one core), so
on a machine without a GPU the ratios compare the same work per core. With ``--device cuda`` the
device half's ratio is the GPU's images/s against one CPU worker's.
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from benchmarks.figures import Figure
from facetrain.data import SyntheticFaces
from facetrain.data.gpu_decode import DevicePipeline, collate_encoded
from facetrain.data.images import decode_rgb
from facetrain.data.record import RecordDataset
from facetrain.data.resumable import SeededSamples
from facetrain.data.transforms import build_transform
from facetrain.data.writers import pack_identity_folder

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SIZE, MEAN, STD = (112, 112), (0.5,) * 3, (0.5,) * 3


def images_per_second(work: Callable[[], object], images: int, rounds: int,
                      sync: Callable[[], None] = lambda: None) -> float:
    """Median over ``rounds`` of ``images`` / the time of ``work()``, after one warm-up call."""
    work()
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        sync()
        times.append(time.perf_counter() - start)
    return images / statistics.median(times)


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=32)
    parser.add_argument("--images", type=int, default=16, help="per identity")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.set_num_threads(1)

    augmentations = instantiate(
        OmegaConf.load(CONFIGS / "data" / "augmentation" / "default.yaml").train_augmentations
    )
    with tempfile.TemporaryDirectory(prefix="facetrain-gpu-decode-") as temporary:
        faces = SyntheticFaces(
            root=str(Path(temporary) / "faces"), num_train_identities=args.identities,
            images_per_train_identity=args.images, num_verification_identities=4,
            images_per_verification_identity=4, num_pairs=20, image_size=SIZE[0], workers=1,
        ).generate()
        pack = pack_identity_folder(faces.train_root, Path(temporary) / "rec")
        records = RecordDataset(pack, build_transform(augmentations, SIZE, MEAN, STD))
        pipeline = DevicePipeline(augmentations, SIZE, MEAN, STD)
        # Read as the training loader reads: each sample's augmentation seeded from its key.
        cpu_set = SeededSamples(records)
        gpu_set = SeededSamples(RecordDataset(pack, pipeline, encoded=True))
        keys = [(i, (0, 0, i)) for i in range(min(args.batch, len(records)))]
        n = len(keys)

        def cpu_path():
            return default_collate([cpu_set[key] for key in keys])

        def worker_half():
            return collate_encoded([gpu_set[key] for key in keys])

        encoded = worker_half()
        streams = [image for image in encoded.images if image.dim() == 1]
        payloads = [stream.numpy().tobytes() for stream in streams]  # the same JPEGs, for PIL
        rate = {
            "cpu path": images_per_second(cpu_path, n, args.rounds),
            "worker half": images_per_second(worker_half, n, args.rounds),
            "device half": images_per_second(lambda: pipeline.decode(encoded, device), n,
                                             args.rounds, sync),
            "PIL decode": images_per_second(lambda: [decode_rgb(p) for p in payloads],
                                            len(payloads), args.rounds),
            "batched decode": images_per_second(
                lambda: pipeline._decode_jpegs(streams, device), len(streams), args.rounds, sync),
        }
    print(f"{args.identities * args.images} 112x112 JPEGs, batch {n}, device {device}, "
          f"1 CPU thread, median of {args.rounds}")
    for name, value in rate.items():
        print(f"{name + ':':<18}{value:9.0f} images/s")
    where = f"on {device.type}" if device.type == "cuda" else "on the CPU device, 1 thread"
    return [
        Figure("gpu_decode", f"data.decode=gpu device half (decode+flip+jitter+normalise) {where}",
               rate["device half"] / rate["cpu path"],
               "data.decode=cpu worker (PIL + albumentations), 1 thread",
               f"{rate['device half']:.0f} vs {rate['cpu path']:.0f} images/s, batch {n}"),
        Figure("gpu_decode", "data.decode=gpu worker half (read, header, draw), 1 thread",
               rate["worker half"] / rate["cpu path"],
               "data.decode=cpu worker (PIL + albumentations), 1 thread",
               f"{rate['worker half']:.0f} vs {rate['cpu path']:.0f} images/s"),
        Figure("gpu_decode", f"batched torchvision decode_jpeg {where}",
               rate["batched decode"] / rate["PIL decode"], "PIL decode, image by image",
               f"{rate['batched decode']:.0f} vs {rate['PIL decode']:.0f} images/s"),
    ]


def quick() -> list[Figure]:
    return main(["--identities", "12", "--images", "16", "--batch", "128", "--rounds", "3"])


def full() -> list[Figure]:
    return main(["--device", "cuda"] if torch.cuda.is_available() else [])


if __name__ == "__main__":
    main()
