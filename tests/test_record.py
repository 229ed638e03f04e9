"""insightface RecordIO packs: the dmlc framing, insightface's header layout, a folder → pack →
dataset round trip, DataLoader workers and every way a pack on disk can be broken."""

import io
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from facetrain.cli.pack import main
from facetrain.data import (
    DatasetError,
    FaceDataModule,
    IdentityFolderDataset,
    RecordDataset,
    pack_identity_folder,
    scan_identity_folder,
)
from facetrain.data.images import read_rgb
from facetrain.data.record import read_record, unpack_payload
from facetrain.data.transforms import build_transform
from facetrain.data.writers import encode_record, pack_payload, write_index

M = struct.pack("<I", 0xCED7230A)


def lrec(cflag: int, length: int) -> bytes:
    return struct.pack("<I", cflag << 29 | length)


def raw_records(pack: Path) -> dict[int, tuple[int, bytes]]:
    """key -> (cflag of the first part, first part's bytes), parsed here independently of the
    reader from the spec: magic, lrec, payload."""
    rec = (pack / "train.rec").read_bytes()
    records = {}
    for line in (pack / "train.idx").read_text().splitlines():
        key, offset = map(int, line.split("\t"))
        magic, word = struct.unpack_from("<II", rec, offset)
        assert magic == 0xCED7230A
        records[key] = (word >> 29, rec[offset + 8 : offset + 8 + (word & (1 << 29) - 1)])
    return records


@pytest.fixture(scope="module")
def tiny_pack(tiny_faces, tmp_path_factory) -> Path:
    pack = tmp_path_factory.mktemp("pack")
    pack_identity_folder(tiny_faces.train_root, pack)
    return pack


def copy_pack(pack: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pack, tmp_path / "pack"))


# --- framing and payloads -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"abcdefg", M + lrec(0, 7) + b"abcdefg" + b"\0"),
        # The magic word at an unaligned offset is ordinary data.
        (b"a" + M + b"bcd", M + lrec(0, 8) + b"a" + M + b"bcd"),
        # At an aligned offset the payload is cut there and the word dropped: start, end parts.
        (b"abcd" + M + b"efg", M + lrec(1, 4) + b"abcd" + M + lrec(3, 3) + b"efg" + b"\0"),
        # At offset 0 and twice in a row: empty start and middle parts.
        (M + M + b"xy", M + lrec(1, 0) + M + lrec(2, 0) + M + lrec(3, 2) + b"xy" + b"\0\0"),
        (b"", M + lrec(0, 0)),
    ],
)
def test_records_are_framed_as_dmlc_writes_them(payload, expected):
    assert encode_record(payload) == expected
    framed = io.BytesIO(b"\0" * 8 + expected + M + lrec(0, 0))
    assert read_record(framed, 8, Path("x.rec")) == payload
    assert read_record(framed, 8, Path("x.rec"), limit=2)[:2] == payload[:2]


def test_payload_header_is_mxnet_irheader():
    assert pack_payload(7, 3.0, b"img") == struct.pack("<IfQQ", 0, 3.0, 7, 0) + b"img"
    vector = pack_payload(0, [401, 441])
    assert vector == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 401, 441)
    label, key, image = unpack_payload(pack_payload(5, [2.0, 1.0], b"jpeg"))
    assert label.tolist() == [2.0, 1.0] and key == 5 and image == b"jpeg"
    label, key, image = unpack_payload(pack_payload(9, 12.0, b"jpeg"))
    assert label.tolist() == [12.0] and key == 9 and image == b"jpeg"


# --- round trip -----------------------------------------------------------------------------------


def test_pack_has_insightface_layout(tiny_faces, tiny_pack):
    classes = tiny_faces.num_train_identities
    images = classes * tiny_faces.images_per_train_identity
    records = raw_records(tiny_pack)
    assert sorted(records) == list(range(images + 1 + classes))
    flag, label, key, id2 = struct.unpack_from("<IfQQ", records[0][1])
    assert (flag, key, id2) == (2, 0, 0)
    assert struct.unpack_from("<2f", records[0][1], 24) == (images + 1, images + 1 + classes)
    per = tiny_faces.images_per_train_identity
    for identity in range(classes):  # identity records hold their image-key ranges
        header = records[images + 1 + identity][1]
        assert struct.unpack_from("<I", header)[0] == 2
        start = 1 + identity * per
        assert struct.unpack_from("<2f", header, 24) == (start, start + per)
    flag, label, key, _ = struct.unpack_from("<IfQQ", records[per + 1][1])
    assert (flag, label, key) == (0, 1.0, per + 1)  # an image record: scalar label = class id
    assert (tiny_pack / "property").read_text() == f"{classes},112,112\n"


def test_folder_pack_dataset_round_trip(tiny_faces, tiny_pack):
    classes, samples = scan_identity_folder(tiny_faces.train_root)
    dataset = RecordDataset(tiny_pack)
    assert dataset.num_classes == len(classes) == tiny_faces.num_train_identities
    assert len(dataset) == len(samples)
    np.testing.assert_array_equal(dataset.labels, [label for _, label in samples])
    for index in range(len(dataset)):
        image, label = dataset[index]
        path, expected_label = samples[index]
        assert label == expected_label
        # JPEG sources are packed byte for byte, so pixels match the source exactly.
        np.testing.assert_array_equal(image, read_rgb(path))
    assert not dataset.failed_loads


def test_non_jpeg_sources_are_encoded_as_jpeg(tmp_path):
    root = tmp_path / "faces"
    y, x = np.mgrid[0:48, 0:40]
    for identity in range(2):
        (root / f"person{identity}").mkdir(parents=True)
        for k in range(2):
            smooth = np.stack([x * 5 + 20 * k, y * 4 + 60 * identity, (x + y) * 2], -1)
            Image.fromarray(smooth.astype(np.uint8)).save(root / f"person{identity}/{k}.png")
    pack_identity_folder(root, tmp_path / "pack", quality=95)
    dataset = RecordDataset(tmp_path / "pack")
    records = raw_records(tmp_path / "pack")
    for index, path in enumerate(sorted(root.glob("*/*.png"))):
        image, label = dataset[index]
        assert label == index // 2
        jpeg = records[index + 1][1][24:]
        assert jpeg[:2] == b"\xff\xd8"  # stored as JPEG
        with Image.open(io.BytesIO(jpeg)) as decoded:
            np.testing.assert_array_equal(image, np.asarray(decoded.convert("RGB")))
        assert np.abs(image.astype(int) - read_rgb(path).astype(int)).mean() < 2.0
    assert (tmp_path / "pack" / "property").read_text() == "2,48,40\n"


def test_magic_word_inside_an_image_is_split_and_restored(tmp_path):
    """A JPEG comment holding the magic word at an aligned payload offset forces split parts."""
    root = tmp_path / "faces"
    (root / "a").mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for filler in range(4):  # the image follows the 24-byte IRHeader in the payload
        Image.fromarray(pixels).save(root / "a" / "0.jpg", comment=b"_" * filler + M + M)
        if (24 + (root / "a" / "0.jpg").read_bytes().find(M)) % 4 == 0:
            break
    Image.fromarray(pixels).save(root / "a" / "1.jpg")
    pack_identity_folder(root, tmp_path / "pack")
    assert raw_records(tmp_path / "pack")[1][0] == 1  # written as start/middle/end parts
    dataset = RecordDataset(tmp_path / "pack")
    np.testing.assert_array_equal(dataset[0][0], read_rgb(root / "a" / "0.jpg"))
    original = (tmp_path / "pack" / "train.idx").read_text()
    write_index(tmp_path / "pack" / "train.rec")  # walking the framing finds the same records
    assert (tmp_path / "pack" / "train.idx").read_text() == original


def test_plain_pack_without_header_reads_each_records_label(tmp_path):
    """mxnet im2rec / face2rec image items: keys from 0, labels as (label, aligned) vectors."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="JPEG")
    image = buffer.getvalue()
    image += b"\0" * ((1 - len(image)) % 4)  # odd length: every record ends in padding
    labels = [2, 0, 1, 1, 2]
    rec, index = tmp_path / "list.rec", []
    with open(rec, "wb") as file:
        for key, label in enumerate(labels):
            index.append(f"{key}\t{file.tell()}\n")
            file.write(encode_record(pack_payload(key, [label, 1.0], image)))
    (tmp_path / "list.idx").write_text("".join(index))
    dataset = RecordDataset(rec)
    assert dataset.labels.tolist() == labels and dataset.num_classes == 3
    assert [dataset[i][1] for i in range(5)] == labels
    write_index(rec)
    assert (tmp_path / "list.idx").read_text() == "".join(index)


def test_dataloader_workers_each_open_their_own_file(tiny_pack):
    dataset = RecordDataset(tiny_pack, build_transform([], (32, 32), (0.5,) * 3, (0.5,) * 3))
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])  # opens a handle here
    pickle.loads(pickle.dumps(dataset))  # spawn-started workers get a copy without the handle
    loader = DataLoader(dataset, batch_size=37, num_workers=2, shuffle=False)
    images, labels = zip(*loader, strict=True)
    torch.testing.assert_close(torch.cat(images), expected, rtol=0, atol=0)
    np.testing.assert_array_equal(torch.cat(labels).numpy(), dataset.labels)


# --- bad input ------------------------------------------------------------------------------------


def test_missing_index_is_refused_and_reindex_repairs_it(tiny_pack, tmp_path, capsys):
    pack = copy_pack(tiny_pack, tmp_path)
    (pack / "train.idx").unlink()
    with pytest.raises(DatasetError, match=r"has no index train\.idx.*--reindex"):
        RecordDataset(pack)
    main(["--reindex", str(pack / "train.rec")])
    assert (pack / "train.idx").read_text() == (tiny_pack / "train.idx").read_text()
    assert len(RecordDataset(pack)) == len(RecordDataset(tiny_pack))


def test_missing_pack_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        RecordDataset(tmp_path / "nothing.rec")


def test_index_pointing_between_records_is_refused(tiny_pack, tmp_path):
    pack = copy_pack(tiny_pack, tmp_path)
    lines = (pack / "train.idx").read_text().splitlines()
    key, offset = lines[1].split("\t")
    lines[1] = f"{key}\t{int(offset) + 4}"  # inside record 1's payload, not at a magic word
    (pack / "train.idx").write_text("\n".join(lines) + "\n")
    dataset = RecordDataset(pack)  # only a spread of offsets is checked up front
    with pytest.raises(DatasetError, match=r"no RecordIO record starts at offset .*--reindex"):
        dataset[0]


def test_index_of_another_pack_is_refused(tiny_pack, tmp_path):
    pack = copy_pack(tiny_pack, tmp_path)
    other = tmp_path / "other"
    (other / "x").mkdir(parents=True)
    for k in range(3):
        Image.new("RGB", (300, 300), (k, 2 * k, 3 * k)).save(other / "x" / f"{k}.png")
    pack_identity_folder(other, tmp_path / "other_pack")
    shutil.copy(tmp_path / "other_pack" / "train.idx", pack / "train.idx")
    with pytest.raises(DatasetError, match=r"no RecordIO record starts at offset|another pack"):
        RecordDataset(pack)


def test_garbled_index_line_is_refused(tiny_pack, tmp_path):
    pack = copy_pack(tiny_pack, tmp_path)
    (pack / "train.idx").write_text("0\t0\nnot an index line\n")
    with pytest.raises(DatasetError, match=r"train\.idx:2: expected 'key<TAB>offset'"):
        RecordDataset(pack)


def test_index_missing_an_image_record_is_refused(tiny_pack, tmp_path):
    pack = copy_pack(tiny_pack, tmp_path)
    lines = (pack / "train.idx").read_text().splitlines(keepends=True)
    (pack / "train.idx").write_text("".join(lines[:5] + lines[6:]))  # drop image record 5
    with pytest.raises(DatasetError, match=r"lacks 1 of the image records 1\.\.400 .*first: 5"):
        RecordDataset(pack)


def test_truncated_rec_is_refused(tiny_pack, tmp_path):
    pack = copy_pack(tiny_pack, tmp_path)
    data = (pack / "train.rec").read_bytes()
    (pack / "train.rec").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="truncated"):
        RecordDataset(pack)
    (pack / "train.rec").write_bytes(data[:-6])  # only the last record is cut short
    with pytest.raises(DatasetError, match="truncated"):
        RecordDataset(pack)


def test_undecodable_record_is_counted_and_replaced_by_the_next(tiny_pack, tmp_path, caplog):
    pack = copy_pack(tiny_pack, tmp_path)
    key, offset = map(int, (pack / "train.idx").read_text().splitlines()[3].split("\t"))
    assert key == 3
    with open(pack / "train.rec", "r+b") as rec:
        rec.seek(offset + 8 + 24)  # the JPEG's first bytes, after the frame and IRHeader
        rec.write(b"XXXX")
    dataset = RecordDataset(pack)
    image, label = dataset[2]  # record key 3
    np.testing.assert_array_equal(image, dataset[3][0])
    assert label == dataset.labels[3]
    assert dataset.failed_loads == {3: 1}
    assert "could not decode record 3" in caplog.text


def test_folder_selection_options_are_refused_for_a_pack(tiny_pack):
    datamodule = FaceDataModule(str(tiny_pack), {}, batch_size=4, heldout_identities=3)
    with pytest.raises(DatasetError, match=r"data.heldout_identities .*is a RecordIO pack"):
        datamodule.setup("fit")


def test_pack_cli_writes_a_readable_pack(tiny_faces, tmp_path, capsys):
    main([str(tiny_faces.train_root), str(tmp_path / "out")])
    assert "train.rec" in capsys.readouterr().out
    assert len(RecordDataset(tmp_path / "out")) == len(IdentityFolderDataset(tiny_faces.train_root))
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(tmp_path / "missing"), str(tmp_path / "out2")])


# --- end to end -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_on_a_pack_with_bin_verification(tiny_faces, tiny_pack, tmp_path):
    """``python train.py data=rec`` as a user runs it on a downloaded insightface folder: the pack
    with lfw.bin beside it, plus a pair list; each set is reported under its own name."""
    import json
    import subprocess
    import sys

    from facetrain.data.writers import write_bin_from_set

    pack = copy_pack(tiny_pack, tmp_path)
    write_bin_from_set(tiny_faces.pairs_file, pack / "lfw.bin")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable, str(Path(__file__).resolve().parent.parent / "train.py"),
            "data=rec", f"data.train_root={pack}",
            "~data.verification.cfp_fp", "~data.verification.agedb_30",
            f"+data.verification.pairs={tiny_faces.pairs_file}",
            "data.image_size=[64,64]", "data.batch_size=16", "data.num_workers=0",
            "trainer.max_epochs=1", "+trainer.limit_train_batches=4", "measure_baselines=false",
            "model.flip_test=false",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_classes"] == tiny_faces.num_train_identities
    assert metrics["num_train_images"] == len(RecordDataset(pack))
    lfw, pairs = metrics["verification"]["lfw"], metrics["verification"]["pairs"]
    assert lfw["num_pairs"] == pairs["num_pairs"] == tiny_faces.num_pairs
    # The .bin holds the pair list's own JPEG bytes in pair order: the same verdicts.
    assert lfw["accuracy"] == pytest.approx(pairs["accuracy"], abs=1e-6)
    assert lfw["auc"] == pytest.approx(pairs["auc"], abs=1e-4)
