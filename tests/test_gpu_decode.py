"""data.decode=gpu (facetrain.data.gpu_decode): the device path's batch against the CPU path's,
its augmentations against albumentations', its refusals, and a training run on the CPU device
that trains exactly as decode=cpu."""

import io
import json
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from helpers import hydra_main_config, run_cli, tiny_overrides
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from facetrain.data import DatasetError, FaceDataModule, pack_identity_folder
from facetrain.data.gpu_decode import (
    DevicePipeline,
    adjust_hue,
    collate_encoded,
    read_encoded,
)
from facetrain.data.images import DECODE_ERRORS, decode_rgb
from facetrain.resources import config_dir

LEVEL = 1 / 127.5  # one grey level after normalising with mean = std = 0.5
SMALL = "a_small"  # the identity whose images are not 112x112 (sorted first: label 0)


def smooth_image(rng: np.random.Generator, height: int = 112, width: int = 112) -> np.ndarray:
    noise = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    return cv2.GaussianBlur(noise, (9, 9), 3)


def jpeg(image: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """An identity folder of the JPEG kinds a face set holds (every chroma subsampling,
    progressive, grey, OpenCV-written), a CMYK JPEG and a PNG (decoded by the worker, not the
    device), and an identity of 100x90 images (resized)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("gpu_decode") / "faces"
    kinds = [dict(quality=95, subsampling=0), dict(quality=90, subsampling=1),
             dict(quality=85, subsampling=2), dict(quality=95, progressive=True)]
    for identity in range(3):
        folder = root / f"id{identity}"
        folder.mkdir(parents=True)
        for number, options in enumerate(kinds):
            (folder / f"{number}.jpg").write_bytes(jpeg(smooth_image(rng), **options))
        _, encoded = cv2.imencode(".jpg", smooth_image(rng), [cv2.IMWRITE_JPEG_QUALITY, 92])
        (folder / "cv2.jpg").write_bytes(encoded.tobytes())
        gray = Image.fromarray(smooth_image(rng)).convert("L")
        gray.save(folder / "gray.jpg", quality=90)
    Image.fromarray(smooth_image(rng)).convert("CMYK").save(root / "id0" / "cmyk.jpg")
    Image.fromarray(smooth_image(rng)).save(root / "id1" / "png.png")
    (root / SMALL).mkdir()
    for number in range(4):
        (root / SMALL / f"{number}.jpg").write_bytes(jpeg(smooth_image(rng, 100, 90)))
    return root


@pytest.fixture(scope="module")
def pack(faces, tmp_path_factory) -> Path:
    return pack_identity_folder(faces, tmp_path_factory.mktemp("gpu_decode_pack"))


def batches(train_root: Path, decode: str, augmentations=(), batch_size: int = 8) -> list:
    """One epoch of (images, labels) from the datamodule's training loader, decoded on the CPU
    device for decode=gpu (as Lightning's transfer hook does)."""
    datamodule = FaceDataModule(str(train_root), {}, batch_size=batch_size, num_workers=0,
                                train_augmentations=list(augmentations), decode=decode,
                                gpu_decode_on_cpu=True, index_cache=None)
    datamodule.setup("fit")
    return [datamodule.transfer_batch_to_device(batch, torch.device("cpu"), 0)
            for batch in datamodule.train_dataloader()]


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")
def test_batched_cpu_decode_is_pils_decode(faces):
    """The premise of CPU equality: torchvision's libjpeg-turbo gives PIL's pixels exactly."""
    files = [f for f in sorted(faces.rglob("*.jpg")) if f.name != "cmyk.jpg"]
    streams = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    decoded = decode_jpeg(streams, mode=ImageReadMode.RGB, device="cpu")
    for file, image in zip(files, decoded, strict=True):
        assert np.array_equal(image.permute(1, 2, 0).numpy(), decode_rgb(file.read_bytes())), file


@pytest.mark.parametrize("source", ["pack", "folder"])
@pytest.mark.parametrize("augmentation", ["none", "flip"])
def test_device_batch_equals_cpu_batch(source, augmentation, faces, pack):
    """Same samples, labels, dtype and values: exactly, but for the resized identity, where
    OpenCV's fixed-point bilinear and torch's float one round apart by at most a level."""
    root = pack if source == "pack" else faces
    augmentations = [A.HorizontalFlip(p=1.0)] if augmentation == "flip" else []
    cpu, device = batches(root, "cpu", augmentations), batches(root, "gpu", augmentations)
    assert len(cpu) == len(device) == 3
    small = 0  # SMALL's label
    for (cpu_images, cpu_labels), (images, labels) in zip(cpu, device, strict=True):
        assert torch.equal(labels, cpu_labels)
        assert images.dtype == cpu_images.dtype == torch.float32
        assert images.shape == cpu_images.shape == (8, 3, 112, 112)
        exact = labels != small
        assert torch.equal(images[exact], cpu_images[exact])
        if (~exact).any():  # a batch may hold no resized image
            assert (images[~exact] - cpu_images[~exact]).abs().max() <= LEVEL + 1e-6


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded_batch(pipeline: DevicePipeline, images: list[np.ndarray], seed: int = 0,
                  encode=lambda image: jpeg(image, quality=95)):
    samples = []
    for position, image in enumerate(images):
        pipeline.set_random_state(np.random.default_rng([seed, position]))
        sample = pipeline(image=read_encoded(encode(image), position))["image"]
        samples.append((sample, position))
    return collate_encoded(samples)


def albumentations_reference(image: np.ndarray, ops: list, params: np.ndarray) -> np.ndarray:
    """The CPU path's pixels for one sample whose draws are ``params``, applied by
    albumentations' own transforms."""
    start = 0
    for op in ops:
        if isinstance(op, A.ColorJitter):
            applied, *factors = params[start : start + 5]
            order = [int(k) for k in params[start + 5 : start + 9]]
            if applied:
                keys = ("brightness", "contrast", "saturation", "hue")
                image = op.apply(image, order=order, **dict(zip(keys, factors, strict=True)))
            start += 9
        else:
            if params[start]:
                image = type(op)(p=1.0)(image=image)["image"]
            start += 1
    return image


@pytest.mark.parametrize("jitter, bound, mean_bound", [
    (dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0), 1, 0.05),
    # The CPU path's hue goes through OpenCV's uint8 HSV, whose hue steps are 2 degrees: one
    # step moves a channel of full value and saturation by 255 * 2/60 = 8.5 levels. The device
    # rotates in float (test_device_hue_is_the_float_rotation).
    (dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.2), 9, 1.0),
], ids=["brightness-contrast-saturation", "hue"])
def test_device_augmentations_are_albumentations(jitter, bound, mean_bound):
    rng = np.random.default_rng(1)
    images = [np.clip(smooth_image(rng, 32, 32).astype(int) * 3 - 250, 0, 255).astype(np.uint8)
              for _ in range(32)]
    ops = [A.HorizontalFlip(p=0.5), A.ColorJitter(p=0.7, **jitter), A.ToGray(p=0.3)]
    pipeline = DevicePipeline(ops, (32, 32), (0.5,) * 3, (0.5,) * 3)
    batch = encoded_batch(pipeline, images)
    device_images, labels = pipeline.decode(batch, "cpu")
    assert torch.equal(labels, torch.arange(32))
    params = batch.params.numpy()
    assert 4 <= params[:, 0].sum() <= 28 and 8 <= params[:, 1].sum() <= 30  # p=0.5, p=0.7
    assert 1 <= params[:, 10].sum() <= 20  # p=0.3
    normalize = A.Normalize(mean=(0.5,) * 3, std=(0.5,) * 3, max_pixel_value=255.0)
    errors = []
    for k, image in enumerate(images):
        decoded = decode_rgb(jpeg(image, quality=95))
        reference = normalize(image=albumentations_reference(decoded, ops, params[k]))["image"]
        errors.append(np.abs(device_images[k].permute(1, 2, 0).numpy() - reference) / LEVEL)
    errors = np.stack(errors)
    assert errors.max() <= bound + 1e-3
    assert errors.mean() < mean_bound


@pytest.mark.parametrize("op", [
    A.ToGray(p=1.0),
    A.ColorJitter(brightness=0.4, contrast=0, saturation=0, hue=0, p=1.0),
    A.ColorJitter(brightness=0, contrast=0.4, saturation=0, hue=0, p=1.0),
], ids=["gray", "brightness", "contrast"])
def test_device_operations_without_float_rounding_are_exact(op):
    """Grey (OpenCV's fixed point), brightness and contrast (albucore's truncating tables) are
    reproduced to the bit; only OpenCV's rounding of saturation blends differs (by a level)."""
    rng = np.random.default_rng(3)
    # Noise, for colours of every kind, as PNG: the worker decodes it and the device augments
    # the very pixels albumentations gets.
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(8)]
    pipeline = DevicePipeline([op], (64, 64), (0.5,) * 3, (0.5,) * 3)
    batch = encoded_batch(pipeline, images, encode=png)
    device_images, _ = pipeline.decode(batch, "cpu")
    normalize = A.Normalize(mean=(0.5,) * 3, std=(0.5,) * 3, max_pixel_value=255.0)
    for k, image in enumerate(images):
        reference = albumentations_reference(image, [op], batch.params[k].numpy())
        expected = normalize(image=reference)["image"]
        assert np.array_equal(device_images[k].permute(1, 2, 0).numpy(), expected)


def test_device_hue_is_the_float_rotation():
    """albumentations' hue on float images (OpenCV's float HSV, no quantisation), to the level."""
    rng = np.random.default_rng(2)
    images = np.stack([smooth_image(rng, 24, 24) for _ in range(4)])
    factors = np.array([0.2, -0.13, 0.5, 0.04], dtype=np.float32)
    device = adjust_hue(torch.from_numpy(images).permute(0, 3, 1, 2).float(),
                        torch.from_numpy(factors))
    for image, factor, result in zip(images, factors, device, strict=True):
        reference = A.ColorJitter(brightness=0, contrast=0, saturation=0, hue=0.5).apply(
            image.astype(np.float32) / 255, brightness=1.0, contrast=1.0, saturation=1.0,
            hue=float(factor), order=[0, 1, 2, 3]) * 255
        assert np.abs(result.permute(1, 2, 0).numpy() - reference).max() <= 1


def test_draws_are_seeded_per_sample(pack):
    """The loader's (seed, epoch, position) seeds reach the device augmentation: an epoch read
    twice gets the same draws (a resumed run augments as the uninterrupted one), and samples
    get different ones."""
    datamodule = FaceDataModule(str(pack), {}, batch_size=8, num_workers=0, decode="gpu",
                                gpu_decode_on_cpu=True,
                                train_augmentations=[A.HorizontalFlip(p=0.5),
                                                     A.ColorJitter(p=1.0)])
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    first, second = ([batch.params for batch in loader] for _ in range(2))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    brightness = torch.cat(first)[:, 2]
    assert len(brightness.unique()) == len(brightness)


def test_unsupported_augmentations_are_refused_by_key():
    with pytest.raises(DatasetError, match=r"^data\.train_augmentations\[1\] \(GaussianBlur\) "
                                           r"cannot run with data\.decode=gpu: .*data\.decode=cpu"):
        DevicePipeline([A.HorizontalFlip(), A.GaussianBlur()], (112, 112), (0.5,) * 3,
                       (0.5,) * 3)
    with pytest.raises(DatasetError, match=r"\[0\] \(ToGray\).*weighted_average"):
        DevicePipeline([A.ToGray(method="average")], (112, 112), (0.5,) * 3, (0.5,) * 3)
    for name in ("default", "none"):  # what the device runs: the shipped light pipelines
        spec = OmegaConf.load(Path(config_dir(), "data", "augmentation", f"{name}.yaml"))
        DevicePipeline(instantiate(spec.train_augmentations), (112, 112), (0.5,) * 3, (0.5,) * 3)


def test_gpu_decode_without_cuda_is_a_one_line_data_error(monkeypatch, tmp_path):
    """Raised by prepare_data, which train() calls straight after instantiating the data config:
    outside Hydra's instantiate, so the command line reports it as a data error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with hydra_main_config("train", "data.decode=gpu", f"hydra.run.dir={tmp_path}") as cfg:
        datamodule = instantiate(cfg.data)
    with pytest.raises(DatasetError, match=r"^data\.decode=gpu needs a CUDA device; .*"
                                           r"set data\.decode=cpu$"):
        datamodule.prepare_data()
    with pytest.raises(DatasetError, match=r"data\.decode must be one of cpu, gpu, got 'nvjpeg'"):
        FaceDataModule("unused", {}, decode="nvjpeg").prepare_data()


def test_training_on_a_cpu_device_is_refused_at_the_first_batch(pack, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # CUDA present, CPU trainer
    datamodule = FaceDataModule(str(pack), {}, batch_size=8, num_workers=0, decode="gpu")
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    with pytest.raises(DatasetError, match=r"trains on cpu \(trainer\.accelerator\)"):
        datamodule.transfer_batch_to_device(batch, torch.device("cpu"), 0)


def test_a_stream_the_device_cannot_decode_is_replaced_and_counted(faces, tmp_path):
    """A JPEG with a sound header and end marker but a garbled body: the CPU path replaces it
    by the next image; the device path by another image of the batch, with that image's label,
    counted and named as a load failure."""
    root = tmp_path / "faces"
    for identity in ("id0", "id1"):
        (root / identity).mkdir(parents=True)
        for file in sorted((faces / identity).glob("[0-3].jpg")):
            (root / identity / file.name).write_bytes(file.read_bytes())
    data = bytearray((root / "id1" / "0.jpg").read_bytes())
    data[700:2700] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    (root / "id1" / "0.jpg").write_bytes(bytes(data))
    with pytest.raises(DECODE_ERRORS):
        decode_rgb(bytes(data))
    datamodule = FaceDataModule(str(root), {}, batch_size=8, num_workers=0, decode="gpu",
                                gpu_decode_on_cpu=True, index_cache=None)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    bad = int(np.flatnonzero(batch.positions.numpy() == 4)[0])  # id1/0.jpg: 5th file in order
    images, labels = datamodule.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    twins = [k for k in range(8) if k != bad and torch.equal(images[k], images[bad])]
    assert twins and labels[bad] == labels[twins[0]]
    failures = datamodule.load_failures()
    assert failures["count"] == 1 and failures["first"][0].endswith("id1/0.jpg")


def test_images_the_device_does_not_take_are_decoded_by_the_worker(faces):
    data = (faces / "id0" / "0.jpg").read_bytes()
    with pytest.raises(DECODE_ERRORS):
        read_encoded(data[: len(data) // 2], 0)
    assert read_encoded(data, 0).data.dim() == 1  # whole: the device decodes it
    for other in ("id0/cmyk.jpg", "id1/png.png"):  # decoded by the worker, as PIL decodes them
        image = read_encoded((faces / other).read_bytes(), 0).data
        assert np.array_equal(image.permute(1, 2, 0).numpy(),
                              decode_rgb((faces / other).read_bytes()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decode_is_close_to_the_cpu_path(pack):
    """nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: within torchvision's own
    bound for its CUDA decoder (mean absolute difference below 2 levels)."""
    datamodule = FaceDataModule(str(pack), {}, batch_size=8, num_workers=0, decode="gpu")
    datamodule.setup("fit")
    reference = batches(pack, "cpu")
    for batch, (cpu_images, cpu_labels) in zip(datamodule.train_dataloader(), reference,
                                               strict=True):
        images, labels = datamodule.transfer_batch_to_device(batch, torch.device("cuda"), 0)
        assert images.is_cuda and labels.is_cuda and torch.equal(labels.cpu(), cpu_labels)
        assert (images.cpu() - cpu_images).abs().mean() < 2 * LEVEL


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False,
                            map_location="cpu")
    return checkpoint["state_dict"]


@pytest.mark.slow
def test_training_with_gpu_decode_on_a_cpu_device_trains_as_cpu_decode(tiny_faces, tmp_path):
    """``python train.py data.decode=gpu`` through the device path (on the CPU device, a worker
    reading the bytes) ends with the weights of the same run decoding with PIL: the batches were
    the same tensors. At the faces' own 112x112 (no resize) without augmentation."""
    runs = {}
    for decode, extra in (("cpu", ["data.num_workers=0"]),
                          ("gpu", ["data.num_workers=1", "+data.gpu_decode_on_cpu=true"])):
        run_dir = tmp_path / decode
        tiny = [o for o in tiny_overrides(tiny_faces, run_dir)
                if not o.startswith(("data.image_size=", "data.num_workers="))]
        result = run_cli(
            "train.py", *tiny, "data.image_size=[112,112]", "data/augmentation=none",
            f"data.decode={decode}", *extra, "trainer.max_epochs=1",
            "+trainer.limit_train_batches=3", "measure_baselines=false", cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 3
        runs[decode] = last_weights(run_dir)
    assert runs["cpu"].keys() == runs["gpu"].keys()
    for name, tensor in runs["cpu"].items():
        assert torch.equal(tensor, runs["gpu"][name]), name


@pytest.mark.slow
def test_command_line_without_cuda_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what a machine without a GPU sees
    result = run_cli("train", "data.decode=gpu", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "facetrain: data error: data.decode=gpu needs a CUDA device; torch finds none here "
        "(torch.cuda.is_available() is False); set data.decode=cpu"
    )
    assert "Traceback" not in result.stderr
