"""Fine-tuning (facetrain.finetune) and the small-data recipes (configs/experiment/): the backbone
frozen for the first epochs, its learning rate scaled, its BatchNorm statistics kept, a resume
inside the freeze, and fine-tuning a trained backbone on new identities with 2-3 images each
beating training from scratch at the same budget."""

import functools
import math

import pytest
import torch
from helpers import hydra_main_config, tiny_overrides
from hydra.utils import instantiate
from torch import nn

from facetrain.checkpoint import load_backbone
from facetrain.cli import user_errors
from facetrain.data import SyntheticFaces
from facetrain.finetune import FineTuning, ScaledBackboneLR
from facetrain.module import TrainingError
from facetrain.optim import warmup_cosine
from facetrain.train import train

EPOCHS = 3  # one frozen (experiment=finetune_small), two training the backbone at 0.1 x lr
BUDGET = [f"trainer.max_epochs={EPOCHS}", "logger=none", "~callbacks.projector",
          "+callbacks.checkpoint.save_top_k=-1"]  # every epoch's checkpoint kept


@pytest.fixture(scope="module")
def new_faces(tmp_path_factory) -> SyntheticFaces:
    """Identities the session's trained_run never saw (another seed), 3 images each: the
    issue's small-data case; 20 held-out identities give 400 verification pairs."""
    return SyntheticFaces(
        root=str(tmp_path_factory.mktemp("new_faces") / "synthetic"),
        num_train_identities=30, images_per_train_identity=3,
        num_verification_identities=20, images_per_verification_identity=5, num_pairs=400,
        seed=11, workers=1,
    ).generate()


def run(faces, run_dir, *overrides) -> dict:
    with hydra_main_config("train", *tiny_overrides(faces, run_dir), *BUDGET, *overrides) as cfg:
        return train(cfg)


def finetune_overrides(trained_run) -> list[str]:
    return ["experiment=finetune_small", f"model.init_from={trained_run}"]


@pytest.fixture(scope="module")
def finetuned(new_faces, trained_run, tmp_path_factory):
    """experiment=finetune_small from the session's trained_run onto new_faces: (metrics, run
    folder)."""
    run_dir = tmp_path_factory.mktemp("finetune") / "run"
    return run(new_faces, run_dir, *finetune_overrides(trained_run)), run_dir


def checkpoint(run_dir, epoch: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"best-epoch{epoch:03d}.ckpt", weights_only=True)


def backbone_state(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("backbone."): v for k, v in ckpt["state_dict"].items()
            if k.startswith("backbone.")}


def validation_accuracy(ckpt: dict) -> float:
    """val/accuracy of the validation that ended the checkpoint's epoch (ModelCheckpoint's)."""
    state = next(v for k, v in ckpt["callbacks"].items() if "'monitor': 'val/accuracy'" in k)
    return float(state["current_score"])  # float32: accuracies here are multiples of 1/400


def is_batchnorm_statistic(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")


@pytest.mark.slow
def test_the_backbone_is_frozen_for_the_first_epoch_then_trains(finetuned, trained_run):
    """After the frozen epoch every backbone tensor (weights and BatchNorm statistics) is the
    pretrained one and the optimizer holds no state for the backbone (it never stepped it); the
    head did train. After the next epochs the weights moved but the BatchNorm statistics did not
    (freeze_batchnorm), while the BatchNorm layers' own weights trained."""
    metrics, run_dir = finetuned
    pretrained, _ = load_backbone(trained_run)  # the checkpoint init_from read
    initial = pretrained.state_dict()

    frozen = checkpoint(run_dir, 0)
    assert backbone_state(frozen).keys() == initial.keys()
    for name, value in backbone_state(frozen).items():
        assert torch.equal(value, initial[name]), f"{name} changed in the frozen epoch"
    stepped = frozen["optimizer_states"][0]["state"]  # parameter position -> moments
    backbone_parameters = len(list(pretrained.parameters()))  # the first group (module.py)
    assert stepped and min(stepped) >= backbone_parameters, "the backbone was stepped"

    trained = backbone_state(checkpoint(run_dir, EPOCHS - 1))
    statistics = [name for name in initial if is_batchnorm_statistic(name)]
    weights = [name for name, p in pretrained.named_parameters()]
    assert statistics and weights
    for name in statistics:
        assert torch.equal(trained[name], initial[name]), f"BatchNorm statistic {name} moved"
    still = [name for name in weights if torch.equal(trained[name], initial[name])]
    assert not still, f"not trained: {still[:5]}"  # BatchNorm weights and biases among them

    # The frozen epoch verified exactly as the pretrained network did before training (this
    # run's baseline): eval mode and unchanged weights give the same embeddings.
    before = metrics["baselines"]["untrained"]["synthetic"]
    assert validation_accuracy(frozen) == pytest.approx(before, abs=1e-6)


@pytest.mark.slow
def test_the_backbone_group_learns_at_the_scaled_rate(finetuned):
    """Read from the run's optimizer: the backbone's group starts at 0.1 x the configured lr
    and stays at 0.1 x the head's at every step of the schedule."""
    _, run_dir = finetuned
    for epoch in range(EPOCHS):
        groups = checkpoint(run_dir, epoch)["optimizer_states"][0]["param_groups"]
        backbone, head = groups[0], groups[1]
        assert backbone["initial_lr"] == pytest.approx(0.1 * 2e-3, rel=1e-12)  # optimizer.lr
        assert head["initial_lr"] == pytest.approx(2e-3, rel=1e-12)
        assert backbone["lr"] == pytest.approx(0.1 * head["lr"], rel=1e-9)


def test_scaled_backbone_lr_holds_through_warmup_and_decay():
    """The schedule (LambdaLR) scales each group's own base rate: compared step by step with
    the same schedule over an unscaled optimizer, the backbone's rate is 0.1 x, the head's the
    same."""
    backbone, head = nn.Linear(4, 4), nn.Linear(4, 2)

    def groups():
        return [{"params": list(backbone.parameters())}, {"params": list(head.parameters())}]

    factory = functools.partial(torch.optim.AdamW, lr=2e-3)
    scaled = ScaledBackboneLR(factory, backbone, 0.1)(groups())
    plain = factory(groups())
    schedules = [warmup_cosine(o, 20, warmup_fraction=0.2) for o in (scaled, plain)]
    for step in range(20):
        rates = [[g["lr"] for g in o.param_groups] for o in (scaled, plain)]
        expected = 2e-3 * (min(1, (step + 1) / 4) if step < 4
                           else 0.5 * (1 + math.cos(math.pi * (step - 4) / 16)))
        assert rates[1] == pytest.approx([expected, expected], rel=1e-9)
        assert rates[0] == pytest.approx([0.1 * expected, expected], rel=1e-9)
        for schedule in schedules:
            schedule.step()


@pytest.mark.slow
def test_a_run_resumed_inside_the_freeze_ends_as_the_uninterrupted_one(
        finetuned, new_faces, trained_run, tmp_path):
    """SIGUSR2 (a requeue) at step 2, inside the frozen first epoch: the run saves and stops;
    the same command resumes it from that step (no epoch start: the freeze must come from the
    restored epoch counter) and ends with the uninterrupted run's weights, BatchNorm
    statistics, optimizer state and schedule."""
    _, whole = finetuned
    broken = tmp_path / "run"
    stop = ["+callbacks.kill._target_=step_probe.SignalAtStep", "+callbacks.kill.step=2",
            "+callbacks.kill.signal=SIGUSR2"]
    stopped = run(new_faces, broken, *finetune_overrides(trained_run), *stop)
    assert stopped["status"] == "requeued" and stopped["steps"] == 2
    resumed = run(new_faces, broken, *finetune_overrides(trained_run))
    assert resumed["status"] == "finished" and resumed["resumed_from"].endswith("last.ckpt")
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"]
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    for position, state in a["optimizer_states"][0]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer_states"][0]["state"][position][key])
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.mark.slow
def test_finetuning_beats_training_from_scratch_at_the_same_budget(finetuned, new_faces,
                                                                     tmp_path):
    """The issue's test: the same data, epochs and batches; scratch = experiment=small_data,
    the recipe for training from scratch on few identities. And fine-tuning keeps what the
    pretrained backbone knew (its accuracy before training, this run's baseline), where
    training it at the base rate from the start loses it (insightface #1455)."""
    metrics, _ = finetuned
    scratch = run(new_faces, tmp_path / "scratch", "experiment=small_data")
    fine = metrics["verification"]["synthetic"]["accuracy"]
    alone = scratch["verification"]["synthetic"]["accuracy"]
    before = metrics["baselines"]["untrained"]["synthetic"]  # the pretrained network
    assert fine >= alone + 0.05, f"fine-tuned {fine:.3f}, from scratch {alone:.3f}"
    assert fine >= before - 0.03, f"fine-tuned {fine:.3f}, pretrained {before:.3f}"


# -- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["small_data", "finetune_small"])
def test_each_experiment_composes_and_its_parts_build(name, tmp_path):
    """Every part the recipe configures can be built; its values win over the groups' and over
    train.yaml's own (it is applied after _self_), and the command line wins over it."""
    def compose(*overrides):
        return hydra_main_config("train", f"experiment={name}", f"hydra.run.dir={tmp_path}",
                                 "model.init_from=some/run", *overrides)

    with compose() as cfg:
        fine_tuning = FineTuning.from_config(cfg)
        instantiate(cfg.backbone)
        instantiate(cfg.loss, _partial_=True)()  # the margin head itself
        instantiate(cfg.scheduler)
        sampler = instantiate(cfg.data.sampler) if cfg.data.get("sampler") else None
        augmentations = [instantiate(t) for t in cfg.data.train_augmentations]
        assert augmentations and all(map(callable, augmentations))
        assert cfg.loss.scale == 16 and cfg.trainer.max_epochs > 2  # arcface's 64, trainer's 2
    if name == "finetune_small":
        assert fine_tuning.backbone_lr_scale == 0.1 and fine_tuning.freeze_batchnorm  # not 1.0
        assert fine_tuning.freeze_backbone_epochs == 1 and sampler is not None
        with compose("model.backbone_lr_scale=0.5", "~data/sampler") as cfg:
            assert FineTuning.from_config(cfg).backbone_lr_scale == 0.5
            assert not cfg.data.get("sampler")
    else:
        assert fine_tuning == FineTuning() and sampler is None
    with compose("loss.scale=30", "data/augmentation=none") as cfg:
        assert cfg.loss.scale == 30 and not cfg.data.train_augmentations


def test_finetune_small_requires_init_from(tmp_path):
    with (hydra_main_config("train", "experiment=finetune_small",
                            f"hydra.run.dir={tmp_path}") as cfg,
          pytest.raises(SystemExit) as error,
          user_errors("facetrain", training=TrainingError)):  # as the command line reports it
        FineTuning.from_config(cfg)
    assert str(error.value) == (
        "facetrain: training error: model.init_from must be given (experiment=finetune_small "
        "needs it): add model.init_from=PATH (a facetrain run folder or .ckpt, an arcface_torch "
        "backbone.pth, or timm:NAME)")


@pytest.mark.parametrize("override, message", [
    ("model.freeze_backbone_epochs=-1",
     "model.freeze_backbone_epochs must be a whole number of epochs >= 0, got -1"),
    ("model.freeze_backbone_epochs=2",  # trainer.max_epochs=2
     "model.freeze_backbone_epochs=2 freezes the backbone for all trainer.max_epochs=2 epochs, "
     "and verification uses the backbone only: make it smaller than trainer.max_epochs"),
    ("model.backbone_lr_scale=0",
     "model.backbone_lr_scale must be a number > 0 (e.g. 0.1), got 0; to keep the backbone "
     "fixed for some epochs use model.freeze_backbone_epochs"),
    ("model.freeze_batchnorm=sometimes",
     "model.freeze_batchnorm must be true or false, got 'sometimes'"),
])
def test_a_bad_fine_tuning_setting_is_one_line(override, message, tmp_path):
    with (hydra_main_config("train", override, f"hydra.run.dir={tmp_path}") as cfg,
          pytest.raises(TrainingError) as error):
        FineTuning.from_config(cfg)
    assert str(error.value) == message
