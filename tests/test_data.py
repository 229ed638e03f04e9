"""Datasets read from folders and pair lists the way a user lays them out on disk."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facetrain.data import (
    DatasetError,
    FaceDataModule,
    PairListDataset,
    read_pair_list,
)
from facetrain.data.transforms import build_transform

RED = (200, 30, 60)


def write_image(path: Path, mode: str = "RGB", size=(12, 10), color=RED) -> Path:
    """A solid-colour image; the format follows the file extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


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
