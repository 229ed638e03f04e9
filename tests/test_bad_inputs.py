"""Rows of docs/errors.md ("When the input is wrong") that no other test covered: each test builds
the bad input, runs the code a user runs on it and checks the outcome the page promises."""

import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import hydra_main_config
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException, MissingConfigException
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint
from test_data_folder import make_folder, write_image
from test_eval import eval_config, write_checkpoint
from test_export import PooledLinear
from torch import nn

from facetrain.backbones import MobileFaceNet
from facetrain.checkpoint import AtomicCheckpointIO, CheckpointError, check_resume, describe_model
from facetrain.classifiers import FullClassCenters
from facetrain.data import (
    DatasetError,
    FaceDataModule,
    IdentityFolderDataset,
    RecordDataset,
    pack_identity_folder,
)
from facetrain.eval import evaluate
from facetrain.export import ExportError, export_backbone, export_from_config
from facetrain.heads import ArcFace
from facetrain.module import FaceRecognitionModule
from facetrain.resources import config_dir
from facetrain.train import train

# --- training data: identity folders ----------------------------------------------------------


def test_palette_image_is_converted_to_rgb(tmp_path):
    path = tmp_path / "faces" / "a" / "palette.png"
    path.parent.mkdir(parents=True)
    image = Image.new("P", (12, 10), 1)
    image.putpalette([0, 0, 0, 40, 150, 220] + [0, 0, 0] * 254)  # index 1 = (40, 150, 220)
    image.save(path)
    assert Image.open(path).mode == "P"
    pixels, label = IdentityFolderDataset(tmp_path / "faces", index_cache=None)[0]
    assert pixels.shape == (10, 12, 3) and pixels.dtype == np.uint8 and label == 0
    assert (pixels == (40, 150, 220)).all()


def test_file_cut_inside_its_header_is_skipped_and_counted_at_start_up(tmp_path, caplog):
    root = make_folder(tmp_path / "faces", {"a": 2})
    whole = write_image(tmp_path / "whole.jpg", size=(40, 30)).read_bytes()
    (root / "a" / "cut.jpg").write_bytes(whole[:100])  # ends before the frame header
    with caplog.at_level(logging.INFO, logger="facetrain.data.folder"):
        dataset = IdentityFolderDataset(root, index_cache=None)
    assert len(dataset) == 2 and all(dataset.path(i).name != "cut.jpg" for i in range(2))
    assert "skipped 1 image files (1 unreadable header)" in caplog.text
    assert f"{root / 'a' / 'cut.jpg'} (unreadable header)" in caplog.text


@pytest.mark.parametrize("heldout", [4, 0.99])
def test_heldout_identities_that_leave_none_for_training_stop_naming_the_key(tmp_path, heldout):
    root = make_folder(tmp_path / "faces", {f"id{i}": 3 for i in range(4)})
    with pytest.raises(DatasetError, match=rf"data\.heldout_identities={heldout} gives 4 held-out "
                                           r"identities out of 4; .*1 for training"):
        IdentityFolderDataset(root, heldout_identities=heldout, index_cache=None)


def test_missing_include_list_stops_naming_the_key(tmp_path):
    root = make_folder(tmp_path / "faces", {"a": 2})
    missing = tmp_path / "keep.txt"
    with pytest.raises(DatasetError, match=rf"data\.include_identities='{missing}' cannot be read"):
        IdentityFolderDataset(root, include_identities=missing, index_cache=None)


# --- RecordIO packs ---------------------------------------------------------------------------


@pytest.fixture
def pack(tmp_path) -> Path:
    """A pack of identities a (images 1, 2) and b (images 3, 4), in insightface's layout."""
    root = make_folder(tmp_path / "faces", {"a": 2, "b": 2})
    pack_identity_folder(root, tmp_path / "pack")
    return tmp_path / "pack"


def record_offsets(pack: Path) -> dict[int, int]:
    lines = (pack / "train.idx").read_text().splitlines()
    return dict(tuple(map(int, line.split("\t"))) for line in lines)


def test_image_record_whose_label_contradicts_its_identity_record_stops(pack):
    offset = record_offsets(pack)[3]  # b's first image: its identity record says identity 1
    with open(pack / "train.rec", "r+b") as rec:
        # magic, length word, then the IRHeader (flag uint32, label float32, id, id2 uint64)
        rec.seek(offset + 8)
        flag, label = struct.unpack("<If", rec.read(8))
        assert (flag, label) == (0, 1.0)
        rec.seek(offset + 12)
        rec.write(struct.pack("<f", 0.0))
    dataset = RecordDataset(pack)  # labels come from the identity records
    assert dataset.labels.tolist() == [0, 0, 1, 1]
    assert dataset[3][1] == 1  # the other records still read
    with pytest.raises(DatasetError, match=r"image record 3 is labelled 0 but its identity record "
                                           r"says 1; the pack is damaged"):
        dataset[2]


@pytest.mark.parametrize("text", ["5,8,8\n", "many,8,8\n"])
def test_property_that_disagrees_with_the_records_warns_and_the_records_win(pack, text, caplog):
    (pack / "property").write_text(text)
    with caplog.at_level(logging.WARNING, logger="facetrain.data.record"):
        dataset = RecordDataset(pack)
    assert dataset.num_classes == 2 and dataset.labels.tolist() == [0, 0, 1, 1]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(pack / "property") in warning and text.strip() in warning
    assert warning.endswith("hold 2 identities; using the records")


def test_property_that_agrees_gives_no_warning(pack, caplog):
    assert (pack / "property").read_text().startswith("2,")
    with caplog.at_level(logging.WARNING, logger="facetrain.data.record"):
        RecordDataset(pack)
    assert not caplog.records


def test_index_offset_past_the_end_of_the_rec_stops_at_start_up(pack):
    size = (pack / "train.rec").stat().st_size
    lines = (pack / "train.idx").read_text().splitlines()
    lines[2] = f"2\t{size + 400}"
    (pack / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"puts record 2 at offset {size + 400}, but .* is "
                                           rf"{size} bytes.*--reindex"):
        RecordDataset(pack)


def test_missing_rec_names_the_path_and_the_layout(tmp_path):
    with pytest.raises(DatasetError, match=rf"'{tmp_path / 'train.rec'}' does not exist; point "
                                           r"data\.train_root at a folder with train\.rec \+ "
                                           r"train\.idx or at a \.rec file"):
        RecordDataset(tmp_path)


@pytest.mark.parametrize("option", [
    {"min_images_per_identity": 2}, {"include_identities": "keep.txt"},
    {"exclude_identities": "drop.txt"}, {"heldout_identities": 0.1},
])
def test_every_folder_selection_option_is_refused_for_a_pack(pack, option):
    datamodule = FaceDataModule(str(pack), {}, batch_size=2, num_workers=0, **option)
    (key,) = option
    with pytest.raises(DatasetError, match=rf"data\.{key} select\(s\) identities of an identity "
                                           r"folder, but .* is a RecordIO pack; remove"):
        datamodule.setup("fit")


# --- backbones --------------------------------------------------------------------------------


def test_unknown_backbone_lists_the_available_ones():
    with initialize_config_dir(config_dir(), version_base="1.3"), \
            pytest.raises(MissingConfigException) as error:
        compose("train", overrides=["backbone=no_such"])
    message = str(error.value)
    assert "backbone/no_such" in message and "Available options in 'backbone'" in message
    listed = {line.strip() for line in message.splitlines()}
    shipped = {p.stem for p in Path(config_dir(), "backbone").glob("*.yaml")}
    assert {"mobilefacenet", "iresnet50", "sphereface20"} <= shipped <= listed


def test_an_input_size_the_backbone_cannot_take_stops_before_any_data_is_read(tmp_path):
    missing = tmp_path / "no_such_folder"  # reading the data would fail with a DatasetError
    with hydra_main_config(
        "train", "data=folder", f"data.train_root={missing}", "backbone=iresnet50",
        "data.image_size=[100,100]", f"hydra.run.dir={tmp_path / 'run'}", "logger=none",
    ) as cfg, pytest.raises(InstantiationException) as error:
        train(cfg)  # Hydra's main prints this error's message, without a traceback
    assert "IResNet-50 needs an input size divisible by 16 (it downsamples 16x), got 100x100; " \
        "the paper uses 112x112" in str(error.value)
    assert "full_key: backbone" in str(error.value)


# --- training: non-finite loss ----------------------------------------------------------------


class NaNAfter(nn.Module):
    """A real little network whose loss turns NaN at one training forward, as a diverging run:
    the NaN gradients then make every weight NaN."""

    embedding_size = 8

    def __init__(self, bad_forward: int):
        super().__init__()
        self.linear = nn.Linear(3, self.embedding_size)
        self.bad_forward, self.forwards = bad_forward, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.linear(images.mean(dim=(2, 3)))
        if self.training:
            self.forwards += 1
            if self.forwards == self.bad_forward:
                out = out * float("nan")
        return out


def test_non_finite_loss_stops_naming_the_step_and_the_last_checkpoint_stays_good(tmp_path):
    """3 steps per epoch, validation and a checkpoint every epoch (configs/callbacks/checkpoint
    with save_top_k=-1, every epoch kept, so a checkpoint is due whatever the accuracy),
    Lightning's logging every 10 steps (configs/trainer): the loss turns NaN at step 4, in the
    second epoch, before any logging step. The run must stop naming step 4, and last.ckpt must
    still be the good checkpoint of epoch 0, not weights the NaN step produced."""
    root = make_folder(tmp_path / "faces", {f"id{i}": 4 for i in range(3)})
    pairs = tmp_path / "pairs.txt"  # 10 same and 10 different pairs: one of each per fold
    same = [f"faces/id{i % 3}/{j}.png faces/id{i % 3}/{j + 1}.png 1" for i in range(3)
            for j in range(3)][:10] + ["faces/id0/0.png faces/id0/3.png 1"]
    different = [f"faces/id{i}/{j}.png faces/id{(i + 1) % 3}/{j}.png 0" for i in range(3)
                 for j in range(4)][:10]
    pairs.write_text("\n".join(line for fold in zip(same, different, strict=False)
                               for line in fold) + "\n")
    datamodule = FaceDataModule(str(root), {"v": str(pairs)}, image_size=(8, 8), batch_size=4,
                                num_workers=0, index_cache=None)
    head = ArcFace()
    module = FaceRecognitionModule(
        NaNAfter(bad_forward=5), head, FullClassCenters(8, 3, head),
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1), nonfinite="stop",
    )
    checkpoints = tmp_path / "checkpoints"
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=4, log_every_n_steps=10, logger=False,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=checkpoints, filename="best-epoch{epoch:03d}",
                                   monitor="val/accuracy", mode="max", save_last=True,
                                   save_top_k=-1)],
    )
    with pytest.raises(FloatingPointError, match=r"not finite .* since step 4 .*lower "
                                                 r"optimizer\.lr.*ckpt_path="):
        trainer.fit(module, datamodule=datamodule)
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # the end of epoch 0
    for name, tensor in last["state_dict"].items():
        assert torch.isfinite(tensor).all(), name
    for path in checkpoints.iterdir():
        saved = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in saved.values()), path.name


# --- checkpoints: resuming, evaluating, exporting ---------------------------------------------


def resumable(num_classes: int, margin: float) -> tuple[FaceRecognitionModule, dict]:
    """A module as train.py builds it, with the description its checkpoints carry."""
    cfg = OmegaConf.create({
        "backbone": {"_target_": "facetrain.backbones.MobileFaceNet", "embedding_size": 16,
                     "input_size": [32, 32]},
        "loss": {"_target_": "facetrain.heads.ArcFace", "scale": 64.0, "margin": margin},
        "data": {"image_size": [32, 32]},
    })
    head = ArcFace(scale=64.0, margin=margin)
    module = FaceRecognitionModule(
        MobileFaceNet(embedding_size=16, input_size=(32, 32)), head,
        FullClassCenters(16, num_classes, head), optimizer=torch.optim.SGD,
        description=describe_model(cfg, 16, num_classes),
    )
    return module, module.description


def saved(module: FaceRecognitionModule) -> dict:
    """What a training checkpoint holds for check_resume: the weights and the description."""
    return {"state_dict": module.state_dict(), "facetrain": module.description}


def test_resume_with_a_changed_margin_only_warns(caplog):
    checkpoint = saved(resumable(num_classes=5, margin=0.5)[0])
    module, description = resumable(num_classes=5, margin=0.3)
    with caplog.at_level(logging.WARNING, logger="facetrain.checkpoint"):
        check_resume(checkpoint, description, module)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning == ("resuming with a changed config (checkpoint vs this run): "
                       "loss.margin: checkpoint 0.5, given 0.3")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="facetrain.checkpoint"):
        check_resume(checkpoint, resumable(num_classes=5, margin=0.5)[1], module)
    assert not caplog.records, "an unchanged config warns about nothing"


def test_resume_with_another_number_of_classes_stops_naming_key_and_tensor():
    checkpoint = saved(resumable(num_classes=5, margin=0.5)[0])
    module, description = resumable(num_classes=7, margin=0.5)
    with pytest.raises(CheckpointError, match=r"cannot resume: .*num_classes: checkpoint 5, given "
                                              r"7.*shape: classifier\.weight \(checkpoint \(5, "
                                              r"16\), model \(7, 16\)\)"):
        check_resume(checkpoint, description, module)


def test_evaluating_a_run_that_stored_no_verification_sets_asks_for_one(tmp_path):
    path = write_checkpoint(tmp_path / "model.ckpt")  # "verification": {}
    with pytest.raises(DatasetError, match=r"model\.ckpt stores no verification sets; name one "
                                           r"with \+verification\.NAME=path"):
        evaluate(eval_config(f"checkpoint={path}", f"output={tmp_path / 'out'}"))


def test_export_format_is_refused_before_the_checkpoint_is_read(tmp_path):
    cfg = OmegaConf.create({"checkpoint": str(tmp_path / "nothing.ckpt"), "format": "tflite"})
    with pytest.raises(ExportError, match="format='tflite' is not one of: onnx, torchscript"):
        export_from_config(cfg)


class DataDependentBranch(PooledLinear):
    """Python control flow on a tensor's value: no exporter can trace it to one graph."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.pool(images).flatten(1)
        return self.fc(features) if features.sum() > 0 else -self.fc(features)


@pytest.mark.parametrize(("model", "opset", "message"), [
    (PooledLinear, 40, r"neither ONNX exporter could write PooledLinear at opset 40 "
                       r"\(.*40.*\); choose opset>=17"),
    (PooledLinear, 6, r"onnxruntime cannot run the exported PooledLinear at opset 6 \(.*\); "
                      r"choose opset>=17"),
    (DataDependentBranch, 18, r"torch\.onnx\.export failed for DataDependentBranch at opset 18"),
], ids=["opset-no-exporter-writes", "opset-onnxruntime-cannot-run", "untraceable"])
def test_an_export_that_cannot_be_made_stops_with_an_export_error(model, opset, message, tmp_path):
    images = torch.rand(3, 3, 16, 16)
    output = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match=message):
        export_backbone(model().eval(), output, images, {}, opset=opset)
    assert not list(tmp_path.iterdir()), "nothing written, no temporary left"
