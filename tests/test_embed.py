"""Embedding a folder or list of images: rows equal the backbone's own embeddings of the same
images, the index names them in order, unreadable images are skipped and reported."""

import shutil

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli
from torch import nn

from facetrain.backbones import MobileFaceNet
from facetrain.checkpoint import load_backbone
from facetrain.data.image_list import ImageListDataset, list_images
from facetrain.data.images import DatasetError, read_rgb
from facetrain.embed import embed_images, preprocessing

SIZE = (64, 64)
INFO = {"image_size": list(SIZE), "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.5, 0.2]}


def preprocess_independently(path) -> torch.Tensor:
    """OpenCV decode + resize + per-channel normalisation, written without facetrain's code."""
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    image = cv2.resize(image, SIZE[::-1], interpolation=cv2.INTER_LINEAR)
    image = (image / np.float32(255) - np.float32(INFO["mean"])) / np.float32(INFO["std"])
    return torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))


@pytest.fixture(scope="module")
def backbone(tiny_faces):
    """MobileFaceNet with BatchNorm statistics from real faces (a fresh network's eval outputs
    are ~1e-5 and would make the comparison meaningless)."""
    torch.manual_seed(0)
    model = MobileFaceNet(embedding_size=32, input_size=SIZE)
    root, paths = list_images(tiny_faces.train_root)
    images = torch.stack([preprocess_independently(root / p) for p in paths[:32]])
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()(images)
    return model.eval()


@pytest.fixture
def photo_folder(tiny_faces, tmp_path):
    """Nested folders of faces, plus a truncated JPEG, a zero-byte .png and a non-image file."""
    root = tmp_path / "photos"
    sources = sorted(tiny_faces.verification_root.rglob("*.jpg"))[:9]
    for k, source in enumerate(sources):
        target = root / f"person_{k % 3}" / ("nested" if k % 2 else "") / f"img_{k}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    data = sources[0].read_bytes()
    (root / "person_1" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "person_2" / "empty.png").write_bytes(b"")
    (root / "person_2" / "notes.txt").write_text("not an image")
    return root


def test_rows_are_the_backbones_embeddings_of_the_listed_images(backbone, photo_folder, tmp_path):
    root, paths = list_images(photo_folder)
    assert "person_2/notes.txt" not in paths and paths == sorted(paths)
    result = embed_images(
        backbone, ImageListDataset(root, paths, preprocessing(INFO)), tmp_path / "out",
        batch_size=4, num_workers=0, progress=False,
    )

    skipped = dict(result.skipped)
    assert set(skipped) == {"person_1/truncated.jpg", "person_2/empty.png"}
    assert "truncated" in skipped["person_1/truncated.jpg"]
    assert (tmp_path / "out" / "skipped.txt").read_text().count("\n") == 2
    index = (tmp_path / "out" / "index.txt").read_text().splitlines()
    assert index == [p for p in paths if p not in skipped] and len(index) == 9

    embeddings = np.load(tmp_path / "out" / "embeddings.npy")
    assert embeddings.dtype == np.float32 and embeddings.shape == (9, 32) == (result.count, 32)
    with torch.no_grad():
        expected = backbone(torch.stack([preprocess_independently(root / p) for p in index]))
    np.testing.assert_allclose(embeddings, F.normalize(expected, dim=1).numpy(), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "embeddings.npy", "index.txt", "skipped.txt"
    ], "no temporary file left"


def test_flip_fusion_without_normalisation(backbone, photo_folder, tmp_path):
    root, paths = list_images(photo_folder)
    paths = [p for p in paths if p.endswith("img_0.jpg") or p.endswith("img_1.jpg")]
    result = embed_images(
        backbone, ImageListDataset(root, paths, preprocessing(INFO)), tmp_path,
        flip=True, normalize=False, num_workers=0, channels_last=True, progress=False,
    )
    images = torch.stack([preprocess_independently(root / p) for p in paths])
    with torch.no_grad():
        expected = backbone(images) + backbone(images.flip(dims=[3]))
    np.testing.assert_allclose(np.load(result.embeddings), expected.numpy(), atol=1e-4)
    assert not (tmp_path / "skipped.txt").exists()


def test_list_file_keeps_its_order_and_reports_missing_files(backbone, photo_folder, tmp_path):
    absolute = photo_folder / "person_0" / "img_0.jpg"
    listing = photo_folder / "faces.txt"
    listing.write_text(
        f"# faces to index\nperson_1/nested/img_1.jpg\n\n{absolute}\nperson_0/gone.jpg\n"
    )
    root, paths = list_images(listing)
    assert paths == ["person_1/nested/img_1.jpg", str(absolute), "person_0/gone.jpg"]
    result = embed_images(
        backbone, ImageListDataset(root, paths, preprocessing(INFO)), tmp_path / "out",
        num_workers=0, progress=False,
    )
    assert result.skipped == [("person_0/gone.jpg", "missing")]
    assert result.index.read_text().splitlines() == paths[:2]
    with torch.no_grad():
        expected = backbone(torch.stack([preprocess_independently(root / p) for p in paths[:2]]))
    np.testing.assert_allclose(
        np.load(result.embeddings), F.normalize(expected, dim=1).numpy(), atol=1e-4
    )


def test_inputs_without_images_are_clear_errors(backbone, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images in"):
        list_images(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_text("text named .jpg")
    dataset = ImageListDataset(*list_images(tmp_path / "bad"), preprocessing(INFO))
    with pytest.raises(DatasetError, match="none of the 1 images"):
        embed_images(backbone, dataset, tmp_path / "out", num_workers=0, progress=False)
    assert not (tmp_path / "out" / "embeddings.npy").exists()


@pytest.mark.slow
def test_cli_embeds_with_the_checkpoints_input_size_and_normalisation(
    trained_run, photo_folder, tmp_path
):
    result = run_cli(
        "embed", f"checkpoint={trained_run}", f"images={photo_folder}",
        f"output={tmp_path / 'out'}", "num_workers=0", "batch_size=4", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "skipped 2 unreadable image(s)" in log and "9 x 128 float32, L2-normalised" in log

    backbone, info = load_backbone(trained_run)
    index = (tmp_path / "out" / "index.txt").read_text().splitlines()
    images = [read_rgb(photo_folder / p) for p in index]
    height, width = info["image_size"]
    mean, std = np.float32(info["mean"]), np.float32(info["std"])
    batch = torch.stack([
        torch.from_numpy(((cv2.resize(image, (width, height)) / np.float32(255) - mean) / std)
                         .transpose(2, 0, 1).astype(np.float32))
        for image in images
    ])
    with torch.no_grad():
        expected = F.normalize(backbone(batch), dim=1).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out" / "embeddings.npy"), expected, atol=1e-4)


@pytest.mark.slow
def test_cli_reports_a_missing_image_folder(trained_run, tmp_path):
    result = run_cli(
        "embed", f"checkpoint={trained_run}", f"images={tmp_path / 'nowhere'}",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "facetrain-embed: data error:" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr
