"""Datasets read from folders and pair lists the way a user lays them out on disk."""

import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facetrain.data import (
    DatasetError,
    FaceDataModule,
    IdentityFolderDataset,
    PairListDataset,
    read_pair_list,
    scan_identity_folder,
)
from facetrain.data.transforms import build_transform

RED = (200, 30, 60)


def write_image(path: Path, mode: str = "RGB", size=(12, 10), color=RED) -> Path:
    """A solid-colour image; the format follows the file extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def noise_jpeg_bytes(size: int = 64) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def identity_root(tmp_path) -> Path:
    """root/<identity>/<image> with every kind of file a scraped dataset ends up holding.

    Created out of sorted order on purpose. Readable: alice 3 (jpg, L png, truncated jpg whose
    header parses), bob 2 (bmp, RGBA png), carol 2 (pgm, upper-case PNG). Skipped: a zero-byte
    .jpg and a text file named .jpg in alice, dave's only file (text named .jpg), non-image
    extensions.
    """
    root = tmp_path / "faces"
    write_image(root / "carol" / "c1.pgm", mode="L", color=77)
    write_image(root / "carol" / "c2.PNG", color=(5, 6, 7))  # extensions are case-insensitive
    write_image(root / "bob" / "b1.bmp")
    write_image(root / "bob" / "b2.png", mode="RGBA", color=(10, 20, 30, 40))
    write_image(root / "alice" / "a1.jpg")
    write_image(root / "alice" / "a2.png", mode="L", color=100)
    (root / "alice" / "a3.jpg").write_bytes(b"")
    (root / "alice" / "a4.jpg").write_text("this is not an image\n")
    body = noise_jpeg_bytes()
    (root / "alice" / "a5.jpg").write_bytes(body[: len(body) // 2])
    (root / "alice" / "notes.txt").write_text("ignored")
    (root / "alice" / "a6.gif.bak").write_bytes(b"ignored")
    (root / "dave").mkdir()
    (root / "dave" / "only.jpg").write_text("corrupt")
    write_image(root / "stray.jpg")  # not inside an identity folder
    return root


def test_scan_identity_folder_classes_and_labels(identity_root, caplog):
    with caplog.at_level(logging.WARNING, logger="facetrain.data.folder"):
        classes, samples = scan_identity_folder(identity_root)
    assert classes == ["alice", "bob", "carol"]
    relative = [(str(path.relative_to(identity_root)), label) for path, label in samples]
    assert relative == [
        ("alice/a1.jpg", 0),
        ("alice/a2.png", 0),
        ("alice/a5.jpg", 0),
        ("bob/b1.bmp", 1),
        ("bob/b2.png", 1),
        ("carol/c1.pgm", 2),
        ("carol/c2.PNG", 2),
    ]


def test_unreadable_files_are_skipped_and_reported_with_their_paths(identity_root, caplog):
    with caplog.at_level(logging.WARNING, logger="facetrain.data.folder"):
        scan_identity_folder(identity_root)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    unreadable = [m for m in messages if m.startswith("skipped 3 unreadable image file")]
    assert len(unreadable) == 1
    for name in ("alice/a3.jpg", "alice/a4.jpg", "dave/only.jpg"):
        assert str(identity_root / name) in unreadable[0]
    assert "notes.txt" not in unreadable[0]
    empty = [m for m in messages if m.startswith("skipped 1 identity folder")]
    assert len(empty) == 1 and empty[0].endswith(": dave")


def test_images_come_back_as_rgb_uint8_with_their_labels(identity_root):
    dataset = IdentityFolderDataset(identity_root)
    assert len(dataset) == 7 and dataset.num_classes == 3
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    readable = [0, 1, 3, 4, 5, 6]  # index 2 is the truncated JPEG
    for index in readable:
        image, label = dataset[index]
        assert image.shape == (10, 12, 3) and image.dtype == np.uint8
        assert label == dataset.labels[index]
    assert (dataset[1][0] == 100).all()  # grayscale 'L' spread to 3 channels
    assert (dataset[4][0] == (10, 20, 30)).all()  # RGBA: alpha dropped
    assert (dataset[3][0] == RED).all()  # BMP is lossless
    assert (dataset[5][0] == 77).all()  # PGM
    assert (dataset[6][0] == (5, 6, 7)).all()
    assert np.abs(dataset[0][0].astype(int) - RED).max() <= 3  # JPEG, near-lossless solid colour


def test_truncated_jpeg_is_replaced_by_the_next_sample_with_its_own_label(identity_root, caplog):
    dataset = IdentityFolderDataset(identity_root)
    truncated = identity_root / "alice" / "a5.jpg"
    assert dataset.samples[2] == (truncated, 0)  # it passed the header check
    with caplog.at_level(logging.WARNING, logger="facetrain.data.folder"):
        image, label = dataset[2]
    assert label == 1  # bob's b1.bmp, the next sample, keeps bob's label
    assert (image == RED).all()
    assert dataset.failed_loads[truncated] == 1
    assert sum(dataset.failed_loads.values()) == 1
    assert any(str(truncated) in r.getMessage() for r in caplog.records)


def test_missing_root_raises_naming_the_path(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(DatasetError, match=re.escape(str(missing))):
        IdentityFolderDataset(missing)


def test_root_without_images_raises(tmp_path):
    (tmp_path / "empty_identity").mkdir()
    (tmp_path / "person").mkdir()
    (tmp_path / "person" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="no readable images") as error:
        scan_identity_folder(tmp_path)
    assert str(tmp_path) in str(error.value)


@pytest.fixture
def pair_images(tmp_path) -> dict[str, Path]:
    return {
        "a": write_image(tmp_path / "lists" / "img" / "a.png"),
        "b": write_image(tmp_path / "lists" / "img" / "b.png", color=(1, 2, 3)),
        "c": write_image(tmp_path / "other" / "c.jpg"),
    }


def test_read_pair_list_resolves_relative_to_the_file_and_dedups(
    tmp_path, pair_images, monkeypatch
):
    pairs_file = tmp_path / "lists" / "pairs.txt"
    pairs_file.write_text(
        "# path1 path2 same\n"
        "\n"
        "img/a.png img/b.png 1\n"
        "   \n"
        f"img/b.png {pair_images['c']} 0\n"  # an absolute path works too
        "  # an indented comment\n"
        "./img/a.png ../other/c.jpg 0\n"
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must not depend on the working directory

    paths, pairs, same = read_pair_list(pairs_file)
    assert paths == [pair_images[name].resolve() for name in "abc"]
    assert pairs.tolist() == [[0, 1], [1, 2], [0, 2]]
    assert same.dtype == bool and same.tolist() == [True, False, False]

    dataset = PairListDataset(pairs_file, "mine")
    assert len(dataset) == 3  # each distinct image once
    image, index = dataset[1]
    assert index == 1 and (image == (1, 2, 3)).all()


@pytest.mark.parametrize(
    "bad_line",
    ["img/a.png img/b.png", "img/a.png img/b.png 2", "img/a.png img/b.png yes", "a b 1 extra"],
)
def test_malformed_line_raises_with_file_and_line_number(tmp_path, pair_images, bad_line):
    pairs_file = tmp_path / "lists" / "pairs.txt"
    pairs_file.write_text(f"# header\nimg/a.png img/b.png 1\n\n{bad_line}\nimg/a.png img/b.png 0\n")
    with pytest.raises(DatasetError, match=re.escape(f"{pairs_file}:4")):
        read_pair_list(pairs_file)


def test_missing_image_raises_naming_it(tmp_path, pair_images):
    pairs_file = tmp_path / "lists" / "pairs.txt"
    pairs_file.write_text("img/a.png img/b.png 1\nimg/a.png img/gone.png 0\n")
    with pytest.raises(DatasetError, match="gone.png") as error:
        PairListDataset(pairs_file, "lfw")
    assert str((tmp_path / "lists" / "img" / "gone.png").resolve()) in str(error.value)


def test_unreadable_image_in_pair_list_raises_naming_it(tmp_path, pair_images):
    (tmp_path / "lists" / "img" / "bad.jpg").write_bytes(b"")
    pairs_file = tmp_path / "lists" / "pairs.txt"
    pairs_file.write_text("img/a.png img/b.png 1\nimg/a.png img/bad.jpg 0\n")
    with pytest.raises(DatasetError, match="bad.jpg"):
        PairListDataset(pairs_file, "lfw")


@pytest.mark.parametrize("flag", ["1", "0"])
def test_pair_list_with_one_kind_of_pair_raises(tmp_path, pair_images, flag):
    pairs_file = tmp_path / "lists" / "pairs.txt"
    pairs_file.write_text(f"img/a.png img/b.png {flag}\nimg/b.png img/a.png {flag}\n")
    with pytest.raises(DatasetError, match="both same"):
        read_pair_list(pairs_file)


def test_pair_list_without_pairs_or_file_raises(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(DatasetError, match="no pairs"):
        read_pair_list(empty)
    with pytest.raises(DatasetError, match="missing.txt"):
        read_pair_list(tmp_path / "missing.txt")


def test_build_transform_makes_normalised_chw_float_tensor():
    image = np.zeros((40, 24, 3), dtype=np.uint8)
    image[..., 0] = 255  # red channel white
    image[..., 2] = 51
    transform = build_transform([], (16, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    tensor = transform(image=image)["image"]
    assert isinstance(tensor, torch.Tensor)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 16, 8)
    # (255 - 127.5) / 127.5 = 1, (0 - 127.5) / 127.5 = -1, (51 - 127.5) / 127.5 = -0.6
    for channel, value in enumerate([1.0, -1.0, -0.6]):
        torch.testing.assert_close(tensor[channel], torch.full((16, 8), value), atol=1e-5, rtol=0)


def build_face_folder(root: Path, identities: int = 3, per_identity: int = 3) -> Path:
    rng = np.random.default_rng(5)
    for i in range(identities):
        for j in range(per_identity):
            pixels = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
            path = root / "train" / f"id{i}" / f"{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root / "train"


@pytest.fixture
def face_folders(tmp_path):
    train = build_face_folder(tmp_path)
    first = tmp_path / "first.txt"
    first.write_text("train/id0/0.png train/id0/1.png 1\ntrain/id0/0.png train/id1/0.png 0\n")
    second = tmp_path / "second.txt"
    second.write_text("train/id2/0.png train/id2/2.png 1\ntrain/id1/1.png train/id2/1.png 0\n")
    return train, {"first": str(first), "second": str(second)}


def test_datamodule_batches_and_verification_loaders(face_folders):
    train, verification = face_folders
    datamodule = FaceDataModule(
        str(train), verification, image_size=(16, 16), batch_size=4, num_workers=0
    )
    assert datamodule.num_classes == 3  # sets itself up when asked
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (4,) and set(labels.tolist()) <= {0, 1, 2}
    assert images.min() >= -1.0 and images.max() <= 1.0

    loaders = datamodule.val_dataloader()
    assert [loader.dataset.name for loader in loaders] == ["first", "second"]
    images, indices = next(iter(loaders[0]))
    assert images.shape == (3, 3, 16, 16)
    assert indices.tolist() == [0, 1, 2]


def test_datamodule_batch_larger_than_dataset_raises(face_folders):
    train, verification = face_folders
    datamodule = FaceDataModule(
        str(train), verification, image_size=(16, 16), batch_size=10, num_workers=0
    )
    with pytest.raises(DatasetError, match="batch_size=10"):
        datamodule.setup("fit")
