"""Verification sets from config: insightface .bin files (read with a restricted unpickler), LFW
pairs.txt in both line forms, pair lists, and several sets at once."""

import io
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_failures import truncate_jpeg

from facetrain.cli.pack import main as pack_main
from facetrain.data import (
    BinDataset,
    DatasetError,
    FaceDataModule,
    LFWPairsDataset,
    PairListDataset,
    open_verification_set,
    read_bin,
    write_bin,
)
from facetrain.data.images import read_rgb
from facetrain.data.pairs import detect_format
from facetrain.data.writers import write_bin_from_set


def jpeg(colour, size=(20, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


# --- .bin -----------------------------------------------------------------------------------------


def test_bin_round_trip_from_a_pair_list(tiny_faces, tmp_path):
    pair_list = PairListDataset(tiny_faces.pairs_file, "pairs")
    path = write_bin_from_set(tiny_faces.pairs_file, tmp_path / "tiny.bin")
    # What insightface's load_bin does: a plain pickle of (list of image bytes, list of bools).
    with open(path, "rb") as file:
        images, same = pickle.load(file, encoding="bytes")
    assert isinstance(images, list) and all(isinstance(image, bytes) for image in images)
    assert same == pair_list.same.tolist()

    dataset = BinDataset(path, "tiny")
    assert dataset.name == "tiny" and dataset.identities is None
    assert len(dataset) == 2 * tiny_faces.num_pairs
    np.testing.assert_array_equal(dataset.pairs, np.arange(len(dataset)).reshape(-1, 2))
    np.testing.assert_array_equal(dataset.same, pair_list.same)
    for i in (0, 1, 57, len(pair_list.pairs) - 1):  # pair i = images 2i, 2i+1
        for side in (0, 1):
            image, index = dataset[2 * i + side]
            assert index == 2 * i + side
            expected = read_rgb(pair_list.paths[pair_list.pairs[i, side]])
            np.testing.assert_array_equal(image, expected)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_bin_with_numpy_arrays_loads_under_every_protocol(tmp_path, protocol):
    """Arrays, numpy bools and protocol-2 bytes (``_codecs.encode``) are what real bins hold."""
    gray = np.full((6, 5), 90, dtype=np.uint8)
    rgb = np.zeros((6, 5, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    content = ([jpeg((255, 0, 0)), rgb, gray, jpeg((0, 0, 255))], np.array([True, False]))
    path = tmp_path / "arrays.bin"
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    dataset = BinDataset(path, "arrays")
    assert dataset.same.tolist() == [True, False]
    np.testing.assert_array_equal(dataset[1][0], rgb)
    np.testing.assert_array_equal(dataset[2][0], np.stack([gray] * 3, axis=-1))
    assert dataset[0][0].shape == (24, 20, 3)


class RunsCode:
    """Unpickling calls ``function(argument)``: what a malicious .bin does."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "builtins.exec", "nested"])
def test_crafted_bin_is_refused_and_nothing_runs(tmp_path, attack, protocol):
    marker = tmp_path / "executed"
    command = f"touch {marker}"
    python = f"open({str(marker)!r}, 'w').write('x')"
    payload = {
        "os.system": RunsCode(os.system, command),
        "builtins.eval": RunsCode(eval, python),
        "builtins.exec": RunsCode(exec, python),
        # Hidden where an image belongs, inside a well-formed (images, same) tuple.
        "nested": ([jpeg((1, 2, 3)), RunsCode(os.system, command)], [True]),
    }[attack]
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    refused = {"builtins.eval": "eval", "builtins.exec": "exec"}.get(attack, "posix.system")
    with pytest.raises(DatasetError, match=rf"refused to load .*evil\.bin: .*asks for .*{refused}"):
        read_bin(path)
    assert not marker.exists(), "the crafted .bin ran code"
    with pytest.raises(DatasetError, match="refused"):
        open_verification_set("evil", str(path))
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ({"images": [], "same": []}, "holds a dict, not a 2-tuple"),
        (([], [], []), "holds a tuple, not a 2-tuple"),
        (("images", [True]), r"holds \(str, list\)"),
        (([jpeg((0, 0, 0))] * 3, [True, False]), "holds 3 images for 2 pairs"),
        (([jpeg((0, 0, 0))] * 4, ["yes", "no"]), "not all booleans"),
        (([jpeg((0, 0, 0)), 7, jpeg((1, 1, 1)), b"not an image"], [True, False]),
         r"2 unusable image\(s\): image 1: a int, not image bytes; image 3: undecodable"),
        (([np.zeros((4, 4), np.float32)] * 2 + [jpeg((0, 0, 0))] * 2, [True, False]),
         "dtype float32"),
        (([jpeg((0, 0, 0))] * 4, [True, True]), "both same and different"),
    ],
)
def test_bin_of_the_wrong_structure_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "wrong.bin"
    path.write_bytes(pickle.dumps(content, protocol=4))
    with pytest.raises(DatasetError, match=message):
        read_bin(path)


def test_bin_that_is_not_a_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "lfw.bin"
    path.write_bytes(jpeg((0, 0, 0)))
    with pytest.raises(DatasetError, match=r"lfw\.bin is not a readable pickle"):
        read_bin(path)
    path.write_bytes(pickle.dumps(([jpeg((0, 0, 0))] * 4, [True, False]))[:-20])
    with pytest.raises(DatasetError, match="not a readable pickle"):
        read_bin(path)


def test_write_bin_rejects_a_pair_count_mismatch(tmp_path):
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        write_bin(tmp_path / "x.bin", [b"a", b"b", b"c"], [True])


def test_a_bin_image_that_does_not_decode_stops_naming_it(tmp_path):
    cut = truncate_jpeg(tmp_path / "cut.jpg").read_bytes()  # its header passes read_bin's check
    path = write_bin(tmp_path / "lfw.bin", [jpeg((0, 0, 0))] * 3 + [cut], [True, False])
    dataset = BinDataset(path, "lfw")
    assert dataset[2][1] == 2
    with pytest.raises(DatasetError, match=rf"verification set 'lfw': image 3 of "
                                           rf"{re.escape(str(path))} has a readable header but "
                                           rf"does not decode"):
        dataset[3]


# --- LFW pairs.txt --------------------------------------------------------------------------------


@pytest.fixture
def lfw(tmp_path) -> Path:
    """An LFW download: lfw/<name>/<name>_<i:04d>.jpg and pairs.txt beside the folder."""
    people = {"Aaron_Peirsol": 3, "Abel_Pacheco": 2, "Zico": 2, "Ana_Guevara": 1}
    for k, (name, count) in enumerate(people.items()):
        for i in range(1, count + 1):
            folder = tmp_path / "lfw" / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}_{i:04d}.jpg").write_bytes(jpeg((40 * k, 20 * i, 100)))
    return tmp_path


# Two folds of one same and one different pair each, as LFW's pairs.txt is laid out.
LFW_PAIRS = """2\t1
Aaron_Peirsol\t1\t2
Aaron_Peirsol\t3\tAna_Guevara\t1
Abel_Pacheco\t1\t2
Zico\t2\tAaron_Peirsol\t1
"""


def test_lfw_pairs_both_line_forms(lfw):
    (lfw / "pairs.txt").write_text(LFW_PAIRS)
    dataset = open_verification_set("lfw", str(lfw / "pairs.txt"))
    assert isinstance(dataset, LFWPairsDataset) and dataset.name == "lfw"
    assert dataset.same.tolist() == [True, False, True, False]  # file order: folds stay intact
    named = [[dataset.paths[i].relative_to(lfw).as_posix() for i in pair] for pair in dataset.pairs]
    assert named == [
        ["lfw/Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "lfw/Aaron_Peirsol/Aaron_Peirsol_0002.jpg"],
        ["lfw/Aaron_Peirsol/Aaron_Peirsol_0003.jpg", "lfw/Ana_Guevara/Ana_Guevara_0001.jpg"],
        ["lfw/Abel_Pacheco/Abel_Pacheco_0001.jpg", "lfw/Abel_Pacheco/Abel_Pacheco_0002.jpg"],
        ["lfw/Zico/Zico_0002.jpg", "lfw/Aaron_Peirsol/Aaron_Peirsol_0001.jpg"],
    ]
    assert len(dataset) == 7  # Aaron_Peirsol_0001 is used twice but embedded once
    assert dataset.identities[dataset.pairs[3, 0]] == "Zico"
    image, index = dataset[dataset.pairs[3, 0]]
    np.testing.assert_array_equal(image, read_rgb(lfw / "lfw/Zico/Zico_0002.jpg"))


def test_lfw_single_number_header_and_explicit_images_folder(lfw, tmp_path):
    """pairsDevTrain.txt style: a header 'n', then n same and n different lines; the images
    given explicitly because they are not beside the file."""
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "pairsDevTest.txt").write_text(
        "1\nZico 1 2\nAbel_Pacheco 2 Ana_Guevara 1\n"
    )
    with pytest.raises(DatasetError, match=r"cannot find the LFW images.*images: /path/to/lfw"):
        open_verification_set("dev", str(lists / "pairsDevTest.txt"))
    spec = {"format": "lfw", "pairs": str(lists / "pairsDevTest.txt"), "images": str(lfw / "lfw")}
    dataset = open_verification_set("dev", spec)
    assert dataset.same.tolist() == [True, False] and len(dataset) == 4


@pytest.mark.parametrize(
    "text, message",
    [
        (LFW_PAIRS.replace("2\t1", "3\t1"), "announces 6 pairs in its header but lists 4"),
        (LFW_PAIRS.replace("Zico\t2\t", "Zico\ttwo\t"), r"pairs\.txt:5: expected 'name i j'"),
        (LFW_PAIRS.replace("Zico\t2\t", "Zico\t9\t"), r"unreadable image\(s\).*Zico_0009\.jpg"),
    ],
)
def test_lfw_pairs_errors(lfw, text, message):
    (lfw / "pairs.txt").write_text(text)
    with pytest.raises(DatasetError, match=message):
        open_verification_set("lfw", str(lfw / "pairs.txt"))


def test_a_pair_image_that_does_not_decode_stops_naming_the_file(lfw):
    """No stand-in image for one side of a pair: the set would no longer be the published one."""
    (lfw / "pairs.txt").write_text(LFW_PAIRS)
    broken = truncate_jpeg(lfw / "lfw" / "Zico" / "Zico_0002.jpg")
    dataset = open_verification_set("lfw", str(lfw / "pairs.txt"))  # its header is readable
    with pytest.raises(DatasetError, match=rf"verification set 'lfw': {re.escape(str(broken))} "
                                           rf"has a readable header but does not decode"):
        dataset[dataset.pairs[3, 0]]


# --- choosing and configuring sets ----------------------------------------------------------------


def test_format_detection(lfw, tiny_faces):
    (lfw / "pairs.txt").write_text(LFW_PAIRS)
    assert detect_format(lfw / "pairs.txt") == "lfw"
    assert detect_format(Path(tiny_faces.pairs_file)) == "pairs"
    assert detect_format(lfw / "agedb_30.bin") == "bin"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/no/such/lfw.bin", r"data\.verification\.v: /no/such/lfw\.bin does not exist.*"
                             r"~data\.verification\.v"),
        ({"format": "megaface", "path": "x"}, r"data\.verification\.v\.format must be one of"),
        ({"format": "bin", "path": "x", "images": "y"}, r"unknown key\(s\) \['images'\]"),
        ({"format": "lfw"}, r"needs the set's file \('pairs'\)"),
        (3, "must be a path or a mapping"),
    ],
)
def test_bad_verification_spec_names_the_key(spec, message):
    with pytest.raises(DatasetError, match=message):
        open_verification_set("v", spec)


def test_several_sets_at_once_each_under_its_own_name(tiny_faces, lfw, tmp_path):
    (lfw / "pairs.txt").write_text(LFW_PAIRS)
    pack_main(["--bin", str(tiny_faces.pairs_file), str(tmp_path / "tiny.bin")])
    datamodule = FaceDataModule(
        train_root=str(tiny_faces.train_root),
        verification={
            "tiny_bin": str(tmp_path / "tiny.bin"),
            "tiny_pairs": str(tiny_faces.pairs_file),
            "lfw": {"format": "lfw", "pairs": str(lfw / "pairs.txt")},
        },
        image_size=(32, 32),
        num_workers=0,
    )
    datamodule.setup("validate")
    sets = {s.name: s for s in datamodule.verification_sets}
    assert list(sets) == ["tiny_bin", "tiny_pairs", "lfw"]
    assert type(sets["tiny_bin"]) is BinDataset and type(sets["lfw"]) is LFWPairsDataset
    assert [len(s.pairs) for s in sets.values()] == [tiny_faces.num_pairs] * 2 + [4]
    loaders = datamodule.val_dataloader()
    assert [loader.dataset.name for loader in loaders] == list(sets)
    images, indices = next(iter(loaders[0]))
    assert images.shape[1:] == (3, 32, 32) and indices[0] == 0
