"""facetrain-eval end to end on a real training run, and safe, self-describing checkpoints."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import run_cli
from hydra import compose, initialize_config_dir
from PIL import Image

from facetrain.backbones import MobileFaceNet
from facetrain.checkpoint import CheckpointError, find_checkpoint, load_backbone
from facetrain.data.pairs import read_pair_list
from facetrain.data.transforms import build_transform
from facetrain.eval import evaluate
from facetrain.evaluation import kfold_verification
from facetrain.resources import config_dir


def eval_config(*overrides: str):
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("eval", overrides=["num_workers=0", *overrides])


def independent_metrics(checkpoint: Path, pairs_file: str):
    """The checkpoint's verification metrics without facetrain's loader or evaluation loop:
    MobileFaceNet built by hand, flip-test embeddings, cosine scores in numpy."""
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    backbone = MobileFaceNet(embedding_size=128, input_size=(64, 64))
    backbone.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})
    backbone.eval()
    paths, pairs, same = read_pair_list(pairs_file)
    transform = build_transform([], (64, 64), (0.5,) * 3, (0.5,) * 3)
    images = torch.stack([transform(image=np.asarray(Image.open(p).convert("RGB")))["image"]
                          for p in paths])
    with torch.no_grad():
        embeddings = (backbone(images) + backbone(images.flip(3))).numpy().astype(np.float64)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    scores = (unit[pairs[:, 0]] * unit[pairs[:, 1]]).sum(axis=1)
    positives, negatives = scores[same], scores[~same]
    auc = np.mean((positives[:, None] > negatives) + 0.5 * (positives[:, None] == negatives))
    return kfold_verification(scores, same), auc


def curve_pixels(image: np.ndarray, colour: str) -> int:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image[..., :3].astype(int) - rgb).sum(axis=-1) < 40).sum())


@pytest.mark.slow
def test_eval_cli_two_checkpoints_end_to_end(trained_run, tmp_path):
    first = trained_run / "checkpoints" / "best-epoch000.ckpt"
    last = trained_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    result = run_cli("eval", f"checkpoints=[{first},{last}]", f"hydra.run.dir={out}",
                     "num_workers=0", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert "TAR@0.01" in printed and "run/best-epoch000" in printed and "run/last" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["checkpoints"]) == ["run/best-epoch000", "run/last"]
    first_result, reported = (metrics["checkpoints"][label]["sets"]["synthetic"]
                              for label in ("run/best-epoch000", "run/last"))
    for result in (first_result, reported):
        assert result["num_pairs"] == 200 and result["num_images"] == 60
        # 200 pairs (~100 different): FAR 0.1 and 0.01 are measurable, 1e-3 and 1e-4 are not.
        assert result["tar_at_far"]["0.01"] is not None and result["tar_at_far"]["0.001"] is None
        assert result["pairs_per_second"] > 0
    assert first_result["auc"] != reported["auc"]  # two models, evaluated separately
    # After one epoch the embeddings are still nearly collinear (cosines within 1e-6 of 1), so
    # only the last checkpoint's numbers are stable enough to recompute independently.
    pairs_file = load_backbone(last)[1]["data"]["verification"]["synthetic"]
    expected, auc = independent_metrics(last, pairs_file)
    assert reported["auc"] == pytest.approx(auc, abs=1e-4)
    assert reported["accuracy"] == pytest.approx(expected.accuracy, abs=0.006)
    assert reported["eer"] == pytest.approx(expected.eer, abs=0.01)
    assert reported["tar_at_far"]["0.1"] == pytest.approx(expected.tar_at_far["0.1"], abs=0.011)
    # ... and they are what training's own validation reported for its last epoch.
    trained = json.loads((trained_run / "metrics.json").read_text())["verification"]["synthetic"]
    assert reported["auc"] == pytest.approx(trained["auc"], abs=1e-4)

    with Image.open(out / "roc.png") as image:
        assert image.format == "PNG" and image.size == (600, 450)
        pixels = np.asarray(image.convert("RGB"))
    assert curve_pixels(pixels, "#1f77b4") > 200 and curve_pixels(pixels, "#ff7f0e") > 200


@pytest.mark.slow
def test_load_backbone_rebuilds_the_trained_model(trained_run):
    backbone, info = load_backbone(trained_run)  # a run folder: its recorded best checkpoint
    recorded = json.loads((trained_run / "metrics.json").read_text())["best"]["checkpoint"]
    assert info["path"] == recorded == str(find_checkpoint(trained_run))
    assert info["backbone"] == {
        "_target_": "facetrain.backbones.MobileFaceNet", "embedding_size": 128,
        "input_size": [64, 64],
    }
    assert info["loss"]["_target_"] == "facetrain.heads.ArcFace" and info["loss"]["margin"] == 0.2
    assert (info["image_size"], info["mean"], info["std"]) == ([64, 64], [0.5] * 3, [0.5] * 3)
    assert (info["embedding_size"], info["num_classes"]) == (128, 40)
    assert Path(info["data"]["verification"]["synthetic"]).is_absolute()
    assert not backbone.training

    state = torch.load(recorded, weights_only=True)["state_dict"]
    reference = MobileFaceNet(embedding_size=128, input_size=(64, 64)).eval()
    reference.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")})
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), reference(images))

    # A config the user asserts is checked key by key (${data.image_size} from the checkpoint).
    load_backbone(trained_run, expected_backbone={"embedding_size": 128,
                                                  "input_size": "${data.image_size}"})
    with pytest.raises(CheckpointError, match=r"embedding_size: checkpoint 128, given 512"):
        evaluate(eval_config(f"checkpoint={trained_run}", "backbone=mobilefacenet",
                             "backbone.embedding_size=512", f"output={trained_run / 'x'}"))
    with pytest.raises(CheckpointError, match=r"_target_: checkpoint 'facetrain.heads.ArcFace', "
                                              r"given 'facetrain.heads.CosFace'"):
        load_backbone(trained_run, expected_loss={"_target_": "facetrain.heads.CosFace"})


@pytest.mark.slow
def test_unknown_or_missing_sets_are_clear_errors(trained_run, tmp_path):
    from facetrain.data.images import DatasetError

    with pytest.raises(DatasetError, match=r"unknown verification set\(s\) \['lfw'\].*synthetic"):
        evaluate(eval_config(f"checkpoint={trained_run}", "sets=[lfw]", f"output={tmp_path}"))
    missing = tmp_path / "no_pairs.txt"
    with pytest.raises(DatasetError, match="no_pairs.txt"):
        evaluate(eval_config(f"checkpoint={trained_run}", f"+verification.other={missing}",
                             f"output={tmp_path}"))


@pytest.mark.slow
def test_tensorboard_has_roc_figure_and_projector(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = trained_run / "tensorboard"
    accumulator = EventAccumulator(str(logs), size_guidance={"images": 0})
    accumulator.Reload()
    assert "val/synthetic/roc" in accumulator.Tags()["images"]
    assert len(accumulator.Images("val/synthetic/roc")) == 2  # one per validation (2 epochs)
    for tag in ("val/synthetic/eer", "val/synthetic/tar@far=0.1", "val/synthetic/auc"):
        assert tag in accumulator.Tags()["scalars"], tag

    config = (logs / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "synthetic' in config
    # Projector written after the last epoch: 40 embeddings, identity labels, 32x32 thumbnails.
    (folder,) = {p.parent for p in logs.glob("*/*/metadata.tsv")}
    labels = (folder / "metadata.tsv").read_text().split()
    assert len(labels) == 40 and all(label.startswith("id_") for label in labels)
    assert len(set(labels)) < 40  # whole identities: several images per label
    tensors = np.loadtxt(folder / "tensors.tsv")
    assert tensors.shape == (40, 128)
    with Image.open(folder / "sprite.png") as sprite:
        assert sprite.size == (32 * 7, 32 * 7)  # ceil(sqrt(40)) thumbnails per side


@pytest.mark.slow
def test_resume_with_a_different_backbone_is_one_clear_error(trained_run, tmp_path):
    same_data = [o for o in yaml.safe_load((trained_run / ".hydra" / "overrides.yaml").read_text())
                 if o.startswith("data.")]
    result = run_cli(
        "train.py", *same_data, "backbone.embedding_size=64",
        f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=300,
    )
    assert result.returncode != 0
    assert "facetrain: checkpoint error: cannot resume" in result.stderr
    assert "embedding_size: checkpoint 128, given 64" in result.stderr
    assert "Traceback" not in result.stderr


# Fast tests on hand-made checkpoints: what a checkpoint must not be able to do.


def write_checkpoint(path: Path, model: torch.nn.Module | None = None, **metadata) -> Path:
    """A checkpoint shaped like facetrain's: backbone weights and the description."""
    model = model or MobileFaceNet(embedding_size=128, input_size=(32, 32))
    description = {
        "version": 1,
        "backbone": {"_target_": "facetrain.backbones.MobileFaceNet", "embedding_size": 128,
                     "input_size": [32, 32]},
        "loss": {"_target_": "facetrain.heads.ArcFace"},
        "embedding_size": 128, "num_classes": 10,
        "data": {"image_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "verification": {}},
        **metadata,
    }
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "facetrain": description}, path)
    return path


def test_a_hand_made_checkpoint_round_trips(tmp_path):
    original = MobileFaceNet(embedding_size=128, input_size=(32, 32)).eval()
    backbone, info = load_backbone(write_checkpoint(tmp_path / "model.ckpt", original))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), original(images))


def test_missing_checkpoint_and_no_checkpoint_are_clear_cli_errors(tmp_path):
    result = run_cli("eval", f"checkpoint={tmp_path / 'nothing.ckpt'}",
                     f"hydra.run.dir={tmp_path}", cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert "facetrain-eval: checkpoint error: checkpoint" in result.stderr
    assert "nothing.ckpt' does not exist" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(CheckpointError, match="no checkpoint given"):
        evaluate(eval_config(f"output={tmp_path}"))
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_backbone(tmp_path)  # a folder without checkpoints


def test_checkpoint_without_facetrain_description_is_refused(tmp_path):
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": MobileFaceNet(input_size=(32, 32)).state_dict()}, path)
    with pytest.raises(CheckpointError, match="not written by facetrain training"):
        load_backbone(path)


class RunsCode:
    """A pickled object whose unpickling calls Path.touch(marker): arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    path = write_checkpoint(tmp_path / "evil.ckpt", extra=RunsCode(marker))
    with pytest.raises(CheckpointError, match="refusing to load .*evil.ckpt"):
        load_backbone(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really is what it claims:
    assert marker.exists()  # unrestricted unpickling runs the code


def test_a_stored_target_that_is_not_a_network_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = write_checkpoint(
        tmp_path / "evil.ckpt", backbone={"_target_": "os.system", "_args_": [f"touch {marker}"]}
    )
    with pytest.raises(CheckpointError, match="'os.system' is not a torch.nn.Module class"):
        load_backbone(path)
    assert not marker.exists()


def test_weights_that_do_not_fit_the_stored_config_name_the_tensors(tmp_path):
    smaller = MobileFaceNet(embedding_size=64, input_size=(32, 32))
    path = write_checkpoint(tmp_path / "model.ckpt", smaller)  # the description says 128
    with pytest.raises(CheckpointError, match=r"shape: embedding\.1\.0\.weight \(checkpoint "
                                              r"\(64, 512, 1, 1\), model \(128, 512, 1, 1\)\)"):
        load_backbone(path)
