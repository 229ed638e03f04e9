"""Identity folders as users have them: scan, index cache, identity selection, held-out
verification identities, and every kind of bad file a scraped dataset holds."""

import io
import json
import logging
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from facetrain.data import DatasetError, FaceDataModule, IdentityFolderDataset, scan_identity_folder
from facetrain.data import folder as folder_module
from facetrain.data.folder import INDEX_FILE_NAME, scan_folder
from facetrain.data.pairs import HeldOutPairs
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


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    for identity, count in counts.items():
        for k in range(count):
            write_image(root / identity / f"{k}.png", color=(k, 0, 0))
    return root


@pytest.fixture
def identity_root(tmp_path) -> Path:
    """root/<identity>/<image> with every kind of file a scraped dataset ends up holding.

    Created out of sorted order on purpose. Readable: alice 3 (jpg, L png, truncated jpg whose
    header parses), bob 2 (bmp, RGBA png), carol 2 (pgm, upper-case PNG). Skipped: a zero-byte
    .jpg and a text file named .jpg in alice, dave's only file (text named .jpg). Ignored: other
    extensions, hidden files (a macOS ._ resource fork), a sub-folder, a file beside the folders.
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
    (root / "alice" / "._a1.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_image(root / "bob" / "extra" / "x.jpg")  # images are not searched recursively
    (root / "dave").mkdir()
    (root / "dave" / "only.jpg").write_text("corrupt")
    write_image(root / "stray.jpg")  # not inside an identity folder
    return root


def test_scan_identity_folder_classes_and_labels(identity_root):
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


def test_scan_reports_counts_in_one_line_and_names_skipped_files(identity_root, caplog):
    with caplog.at_level(logging.INFO, logger="facetrain.data.folder"):
        IdentityFolderDataset(identity_root, index_cache=None)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 1
    assert info[0] == (
        f"scanned {identity_root}: 3 identities, 7 images; skipped 3 image files (1 empty file, "
        f"2 not an image), ignored 4 other entries; dropped identities: 1 without a readable image"
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    unreadable = [m for m in warnings if m.startswith("skipped 3 unreadable image file")]
    assert len(unreadable) == 1
    for name, why in [("alice/a3.jpg", "empty file"), ("alice/a4.jpg", "not an image"),
                      ("dave/only.jpg", "not an image")]:
        assert f"{identity_root / name} ({why})" in unreadable[0]
    assert "notes.txt" not in unreadable[0] and "._a1" not in unreadable[0]
    empty = [m for m in warnings if m.startswith("skipped 1 identity folder")]
    assert len(empty) == 1 and empty[0].endswith(": dave")


def test_images_come_back_as_rgb_uint8_with_their_labels(identity_root):
    dataset = IdentityFolderDataset(identity_root)
    assert len(dataset) == 7 and dataset.num_classes == 3
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    for index in [0, 1, 3, 4, 5, 6]:  # index 2 is the truncated JPEG
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
    assert dataset.path(2) == truncated and dataset.labels[2] == 0  # it passed the header check
    with caplog.at_level(logging.WARNING, logger="facetrain.data.folder"):
        image, label = dataset[2]
    assert label == 1  # bob's b1.bmp, the next sample, keeps bob's label
    assert (image == RED).all()
    assert dataset.failed_loads == {truncated: 1}
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


# ---- index cache ----------------------------------------------------------------------------


def forbid_scanning(monkeypatch):
    def fail(directory):
        raise AssertionError(f"{directory} was scanned although the index cache is current")

    monkeypatch.setattr(folder_module, "_scan_identity", fail)


def test_index_is_cached_as_json_and_reused_while_the_folder_is_unchanged(
    identity_root, monkeypatch, caplog
):
    first = IdentityFolderDataset(identity_root)
    index_file = identity_root / INDEX_FILE_NAME
    stored = json.loads(index_file.read_text())  # plain JSON: nothing is unpickled
    assert stored["identities"]["bob"] == ["b1.bmp", "b2.png"]
    assert stored["identities"]["dave"] == []
    assert ["alice/a3.jpg", "empty file"] in stored["skipped"]

    forbid_scanning(monkeypatch)
    with caplog.at_level(logging.INFO, logger="facetrain.data.folder"):
        again = IdentityFolderDataset(identity_root, min_images_per_identity=3)  # no rescan
    assert again.classes == ["alice"] and [again.path(i) for i in range(3)] == [
        first.path(i) for i in range(3)
    ]
    assert any(r.getMessage().startswith(f"index of {identity_root}:") for r in caplog.records)
    assert not list(identity_root.glob(f"{INDEX_FILE_NAME}.tmp-*"))  # written atomically


@pytest.mark.parametrize("change", ["add image", "remove image", "add identity", "rename identity"])
def test_index_is_rebuilt_when_files_or_identities_change(identity_root, change):
    IdentityFolderDataset(identity_root)
    if change == "add image":
        write_image(identity_root / "carol" / "c3.png")
    elif change == "remove image":
        (identity_root / "carol" / "c2.PNG").unlink()
    elif change == "add identity":
        write_image(identity_root / "erin" / "e1.png")
    else:
        (identity_root / "carol").rename(identity_root / "caroline")
    expected = {
        "add image": (["alice", "bob", "carol"], 8),
        "remove image": (["alice", "bob", "carol"], 6),
        "add identity": (["alice", "bob", "carol", "erin"], 8),
        "rename identity": (["alice", "bob", "caroline"], 7),
    }[change]
    dataset = IdentityFolderDataset(identity_root)
    assert (dataset.classes, len(dataset)) == expected


def test_corrupt_index_file_is_ignored_and_replaced(identity_root, caplog):
    (identity_root / INDEX_FILE_NAME).write_text('{"fingerprint": ')  # e.g. a killed writer
    with caplog.at_level(logging.WARNING, logger="facetrain.data.folder"):
        dataset = IdentityFolderDataset(identity_root)
    assert len(dataset) == 7
    assert any("ignoring unreadable index cache" in r.getMessage() for r in caplog.records)
    assert json.loads((identity_root / INDEX_FILE_NAME).read_text())["identities"]


def test_index_cache_location_options(identity_root, tmp_path, monkeypatch):
    IdentityFolderDataset(identity_root, index_cache=None)
    assert not (identity_root / INDEX_FILE_NAME).exists()

    chosen = tmp_path / "indexes" / "casia.json"
    IdentityFolderDataset(identity_root, index_cache=str(chosen))
    assert chosen.is_file() and not (identity_root / INDEX_FILE_NAME).exists()

    # A read-only root (e.g. a shared dataset): the index goes to the user's cache folder.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(folder_module.os, "access", lambda path, mode: False)
    IdentityFolderDataset(identity_root)
    cached = list((tmp_path / "xdg" / "facetrain" / "folder-index").glob("*.json"))
    assert len(cached) == 1 and not (identity_root / INDEX_FILE_NAME).exists()
    forbid_scanning(monkeypatch)
    assert scan_folder(identity_root).cached


# ---- identity selection and held-out verification identities -------------------------------


def test_min_images_and_identity_lists_select_and_count(tmp_path, caplog):
    root = make_folder(tmp_path / "faces", {"a": 1, "b": 2, "c": 3, "d": 3, "e": 4})
    include = tmp_path / "include.txt"
    include.write_text("# identities to train on\na\nb\nc\ne\n\nzed\n")
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("e\n")
    with caplog.at_level(logging.INFO, logger="facetrain.data.folder"):
        dataset = IdentityFolderDataset(
            root, min_images_per_identity=2, include_identities=include,
            exclude_identities=exclude, index_cache=None,
        )
    assert dataset.classes == ["b", "c"] and dataset.labels.tolist() == [0, 0, 1, 1, 1]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("1 identities in") and m.endswith(": zed") for m in messages)
    assert messages[-1].endswith(
        "dropped identities: 1 not in the include list, 1 in the exclude list, "
        "1 with fewer than 2 images"
    )


def test_unreadable_identity_list_raises_naming_the_key(tmp_path):
    root = make_folder(tmp_path / "faces", {"a": 2})
    with pytest.raises(DatasetError, match="data.exclude_identities=.*missing.txt"):
        IdentityFolderDataset(root, exclude_identities=tmp_path / "missing.txt")


def test_heldout_identities_leave_training_and_form_a_verification_set(tmp_path):
    counts = {f"id{i:02d}": 2 + i % 5 for i in range(30)}
    root = make_folder(tmp_path / "faces", counts)
    dataset = IdentityFolderDataset(root, heldout_identities=10, heldout_seed=1)
    assert len(dataset.heldout) == 10 and not set(dataset.heldout) & set(dataset.classes)
    assert sorted([*dataset.heldout, *dataset.classes]) == sorted(counts)
    assert len(dataset) == sum(counts[name] for name in dataset.classes)
    assert dataset.labels.max() == dataset.num_classes - 1 == 19  # labels stay contiguous
    assert IdentityFolderDataset(root, heldout_identities=10, heldout_seed=1).heldout == (
        dataset.heldout
    )
    assert IdentityFolderDataset(root, heldout_identities=1 / 3).heldout.keys() != (
        dataset.heldout.keys()  # another seed (0), same count (a third of 30)
    )

    pairs = HeldOutPairs(dataset.heldout, num_pairs=60, seed=0)
    assert pairs.pairs.shape == (60, 2) and pairs.same.sum() == 30
    identity = [path.parent.name for path in pairs.paths]
    for (a, b), same in zip(pairs.pairs, pairs.same, strict=True):
        assert a != b and (identity[a] == identity[b]) == same
    assert len({tuple(p) for p in pairs.pairs}) == 60  # no pair twice
    fold = pairs.same[:6]  # LFW order: each fold's same pairs, then its different pairs
    assert fold[:3].all() and not fold[3:].any()
    image, index = pairs[5]
    assert index == 5 and image.shape == (10, 12, 3)


def test_heldout_set_with_too_few_pairs_shrinks_or_refuses(tmp_path, caplog):
    root = make_folder(tmp_path / "faces", {"a": 3, "b": 3, "c": 3, "d": 3, "e": 1})
    heldout = {name: sorted((root / name).iterdir()) for name in "abcd"}
    with caplog.at_level(logging.WARNING, logger="facetrain.data.folder"):
        pairs = HeldOutPairs(heldout, num_pairs=1000)  # 12 distinct same pairs exist
    assert len(pairs.pairs) == 20 and "20 pairs instead of data.heldout_pairs=1000" in caplog.text
    with pytest.raises(DatasetError, match="data.heldout_identities"):
        HeldOutPairs({name: heldout[name] for name in "ab"}, num_pairs=100)
    with pytest.raises(DatasetError, match="data.heldout_identities=1"):
        IdentityFolderDataset(root, heldout_identities=1)


def test_datamodule_adds_the_heldout_verification_set(tmp_path):
    root = make_folder(tmp_path / "faces", {f"id{i}": 4 for i in range(12)})
    datamodule = FaceDataModule(
        str(root), {}, image_size=(8, 8), batch_size=4, num_workers=0,
        heldout_identities=4, heldout_pairs=40, min_images_per_identity=2,
    )
    assert datamodule.num_classes == 8
    (loader,) = datamodule.val_dataloader()
    assert loader.dataset.name == "heldout" and len(loader.dataset.pairs) == 40
    images, indices = next(iter(loader))
    assert images.shape == (16, 3, 8, 8) and indices.tolist() == list(range(16))


# ---- the bad-input matrix -------------------------------------------------------------------


def test_sixteen_bit_png_and_pgm_keep_their_values(tmp_path):
    root = tmp_path / "faces"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.full((6, 5), 200 * 257, np.uint16)).save(root / "a" / "gray16.png")
    cv2.imwrite(str(root / "a" / "gray16.pgm"), np.full((6, 5), 70 * 257, np.uint16))
    bgr = np.zeros((6, 5, 3), np.uint16)
    bgr[...] = (250 * 257, 100 * 257, 10 * 257)
    cv2.imwrite(str(root / "a" / "rgb16.png"), bgr)
    dataset = IdentityFolderDataset(root)
    images = {dataset.path(i).name: dataset[i][0] for i in range(len(dataset))}
    assert Image.open(root / "a" / "gray16.png").mode == "I;16"  # PIL would clip this to white
    assert images["gray16.png"].dtype == np.uint8 and (images["gray16.png"] == 200).all()
    assert (images["gray16.pgm"] == 70).all()
    assert (images["rgb16.png"] == (10, 100, 250)).all()


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    path = write_image(tmp_path / "faces" / "a" / "cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0))
    assert Image.open(path).mode == "CMYK"
    image, _ = IdentityFolderDataset(tmp_path / "faces")[0]
    assert image.shape == (10, 12, 3) and np.abs(image.astype(int) - (255, 0, 0)).max() <= 3


def test_huge_image_is_loaded_and_resized_by_the_transform(tmp_path):
    write_image(tmp_path / "faces" / "a" / "huge.jpg", size=(6000, 6000))
    transform = build_transform([], (112, 112), mean=(0.5,) * 3, std=(0.5,) * 3)
    image, label = IdentityFolderDataset(tmp_path / "faces", transform)[0]
    assert image.shape == (3, 112, 112) and label == 0
    expected = (torch.tensor(RED) / 127.5 - 1).view(3, 1, 1)
    assert (image - expected).abs().max() < 0.03


def test_image_over_the_decompression_bomb_limit_is_skipped(tmp_path, monkeypatch, caplog):
    write_image(tmp_path / "faces" / "a" / "small.png", size=(20, 20))
    write_image(tmp_path / "faces" / "a" / "bomb.png", size=(50, 50))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses above 2x this
    with caplog.at_level(logging.WARNING, logger="facetrain.data.folder"):
        dataset = IdentityFolderDataset(tmp_path / "faces")
    assert len(dataset) == 1 and dataset.path(0).name == "small.png"
    assert "bomb.png (more than 2000 pixels)" in caplog.text


def test_identity_with_one_image_is_a_class(tmp_path):
    root = make_folder(tmp_path / "faces", {"a": 1, "b": 3})
    assert IdentityFolderDataset(root).classes == ["a", "b"]
    assert IdentityFolderDataset(root, min_images_per_identity=2).classes == ["b"]


def test_file_and_folder_names_that_are_not_utf8_load_and_survive_the_cache(
    tmp_path, monkeypatch, caplog
):
    root = tmp_path / "faces"
    write_image(root / "plain" / "a.png")
    identity, name = b"Jos\xe9", b"caf\xe9\xff.png"  # Latin-1 bytes, invalid in UTF-8
    os.makedirs(os.fsencode(root) + b"/" + identity)
    with open(os.fsencode(root) + b"/" + identity + b"/" + name, "wb") as file:
        Image.new("RGB", (12, 10), (1, 2, 3)).save(file, format="PNG")
    with open(os.fsencode(root) + b"/" + identity + b"/bad\xff.jpg", "wb") as file:
        file.write(b"")
    with caplog.at_level(logging.INFO, logger="facetrain.data.folder"):
        dataset = IdentityFolderDataset(root)
    assert dataset.classes == [os.fsdecode(identity), "plain"]
    assert os.fsencode(dataset.path(0)) == os.fsencode(root) + b"/" + identity + b"/" + name
    assert (dataset[0][0] == (1, 2, 3)).all()
    assert "Jos\\xe9/bad\\xff.jpg (empty file)" in caplog.text  # printable in logs
    forbid_scanning(monkeypatch)
    cached = IdentityFolderDataset(root)
    assert cached.classes == dataset.classes and (cached[0][0] == (1, 2, 3)).all()


# ---- transforms from config -----------------------------------------------------------------


def compose_data(*overrides: str):
    from hydra import compose, initialize_config_dir

    configs = Path(__file__).resolve().parent.parent / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        return compose("train", overrides=["data=folder", "data.train_root=/unused", *overrides])


@pytest.mark.parametrize("choice", ["default", "strong", "none"])
def test_augmentation_choices_build_pipelines_at_the_configured_size(choice):
    from hydra.utils import instantiate

    data = compose_data(f"data/augmentation={choice}", "data.image_size=[96,80]").data
    augmentations = instantiate(data.train_augmentations)
    transform = build_transform(augmentations, data.image_size, data.mean, data.std)
    image = np.random.default_rng(0).integers(0, 256, (150, 130, 3), dtype=np.uint8)
    assert transform(image=image)["image"].shape == (3, 96, 80)
    assert instantiate(data.eval_augmentations) == []
    names = [type(a).__name__ for a in augmentations]
    assert names == {
        "default": ["HorizontalFlip", "ColorJitter"],
        "strong": ["HorizontalFlip", "RandomResizedCrop", "ColorJitter", "GaussianBlur",
                   "ImageCompression", "CoarseDropout"],
        "none": [],
    }[choice]


def test_each_strong_augmentation_changes_the_image_when_applied():
    from hydra.utils import instantiate

    data = compose_data("data/augmentation=strong").data
    image = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    image = cv2.GaussianBlur(image, (0, 0), 2)  # some structure for blur/JPEG to alter
    for augmentation in instantiate(data.train_augmentations):
        augmentation.p = 1.0
        out = augmentation(image=image)["image"]
        assert out.shape == image.shape and not np.array_equal(out, image), augmentation
