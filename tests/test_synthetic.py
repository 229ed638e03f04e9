"""The built-in synthetic faces: layout, pair protocol, determinism, caching, difficulty."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from facetrain.data import PairListDataset, SyntheticFaces, scan_identity_folder
from facetrain.data.transforms import build_transform
from facetrain.evaluation import evaluate_pairs


def test_layout_and_images(tiny_faces):
    classes, samples = scan_identity_folder(tiny_faces.train_root)
    assert len(classes) == tiny_faces.num_train_identities
    assert len(samples) == tiny_faces.num_train_identities * tiny_faces.images_per_train_identity
    with Image.open(samples[0][0]) as image:
        assert image.size == (112, 112) and image.mode == "RGB"
    verification = sorted(p for p in tiny_faces.verification_root.iterdir() if p.is_dir())
    assert len(verification) == tiny_faces.num_verification_identities


def test_pair_list_follows_the_lfw_fold_layout(tiny_faces):
    lines = [line.split() for line in tiny_faces.pairs_file.read_text().splitlines()]
    assert len(lines) == tiny_faces.num_pairs
    per_fold = tiny_faces.num_pairs // 20
    for fold in range(10):
        block = lines[fold * 2 * per_fold : (fold + 1) * 2 * per_fold]
        assert [flag for *_, flag in block] == ["1"] * per_fold + ["0"] * per_fold
    for first, second, flag in lines:
        same_identity = Path(first).parent == Path(second).parent
        assert same_identity == (flag == "1")
        assert first != second
        assert (tiny_faces.pairs_file.parent / first).is_file()
    assert len({frozenset(pair[:2]) for pair in lines}) == len(lines), "a pair is repeated"


def small(root: Path, **overrides) -> SyntheticFaces:
    settings = dict(
        num_train_identities=3, images_per_train_identity=2, num_verification_identities=2,
        images_per_verification_identity=4, num_pairs=20, workers=1,
    )
    return SyntheticFaces(root=str(root), **{**settings, **overrides})


def test_same_seed_same_bytes_whatever_the_number_of_workers(tmp_path):
    one = small(tmp_path / "one", workers=1).generate()
    two = small(tmp_path / "two", workers=2).generate()
    files = sorted(p.relative_to(one.root) for p in Path(one.root).rglob("*") if p.is_file())
    assert files
    for relative in files:
        assert (Path(one.root) / relative).read_bytes() == (Path(two.root) / relative).read_bytes()


def faces_of(folder: Path, image: str = "0000.jpg") -> np.ndarray:
    """One image of every identity folder as (identities, pixels) floats, averaged over 4x4
    blocks (112 -> 28: the comparisons below stay fast, a duplicate stays at 0)."""
    identities = sorted(p for p in folder.iterdir() if p.is_dir())
    pixels = np.stack([np.asarray(Image.open(d / image), float) for d in identities])
    return pixels.reshape(len(pixels), 28, 4, 28, 4, 3).mean(axis=(2, 4)).reshape(len(pixels), -1)


def test_verification_identities_are_not_training_identities(tmp_path):
    """No held-out identity is a near-duplicate of any training identity. At variation 0 every
    image of an identity is its canonical face (traits only, pixel for pixel the same), so an
    identity drawn twice, whatever its index, would be a pixel-space nearest neighbour at ~0,
    while distinct identities stay several grey levels apart on average."""
    faces = small(
        tmp_path / "faces", variation=0.0, num_train_identities=40, images_per_train_identity=1,
        num_verification_identities=10, images_per_verification_identity=2,
    ).generate()
    train, held_out = faces_of(faces.train_root), faces_of(faces.verification_root)
    assert np.abs(train[0] - held_out[0]).mean() > 5
    second = faces_of(faces.verification_root, "0001.jpg")
    assert np.abs(second - held_out).max() == 0, "variation 0 is not canonical"

    among_train = np.abs(train[:, None] - train[None]).mean(axis=2)  # mean |diff|, pairwise
    np.fill_diagonal(among_train, np.inf)
    typical = np.median(among_train.min(axis=1))  # how close two distinct identities come
    assert typical > 2
    closest = np.abs(held_out[:, None] - train[None]).mean(axis=2).min(axis=1)
    leaked = np.flatnonzero(closest <= typical / 4)
    assert not len(leaked), f"held-out identities {leaked} are training identities: {closest}"
    # And the pair protocol only ever shows held-out faces.
    for line in faces.pairs_file.read_text().splitlines():
        path_a, path_b, _ = line.split()
        assert Path(path_a).parts[0] == Path(path_b).parts[0] == faces.verification_root.name


def test_cached_until_the_settings_change(tmp_path):
    faces = small(tmp_path / "faces").generate()
    image = faces.train_root / "id_00000" / "0000.jpg"
    stamp = image.stat().st_mtime_ns
    faces.generate()
    assert image.stat().st_mtime_ns == stamp, "an up-to-date dataset was rewritten"

    changed = small(tmp_path / "faces", seed=1).generate()
    assert json.loads((Path(changed.root) / "manifest.json").read_text())["seed"] == 1
    assert not list(tmp_path.glob("faces.*")), "a staging folder was left behind"


def test_never_replaces_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "mine" / "notes.txt"
    precious.parent.mkdir()
    precious.write_text("keep me")
    with pytest.raises(FileExistsError, match="manifest"):
        small(tmp_path / "mine").generate()
    assert precious.read_text() == "keep me"


def test_raw_pixels_verify_poorly(tiny_faces):
    """The task must need learning: raw-pixel cosine similarity stays far from solving it."""
    transform = build_transform([], (112, 112), (0.5,) * 3, (0.5,) * 3)
    dataset = PairListDataset(tiny_faces.pairs_file, "synthetic", transform)
    result = evaluate_pairs(nn.Flatten(), DataLoader(dataset, batch_size=64))
    assert result.accuracy < 0.75


def test_impossible_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="multiple of 20"):
        small(tmp_path, num_pairs=30)
    with pytest.raises(ValueError, match="distinct same"):
        small(tmp_path, num_pairs=200)
