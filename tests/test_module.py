"""The LightningModule's wiring: parameter groups, non-finite loss, verification at epoch end."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from facetrain.classifiers import FullClassCenters
from facetrain.heads import ArcFace
from facetrain.module import FaceRecognitionModule


def arcface_module(backbone: nn.Module, num_classes: int = 3, **options) -> FaceRecognitionModule:
    head = ArcFace()
    centers = FullClassCenters(backbone.embedding_size, num_classes, head)
    return FaceRecognitionModule(
        backbone, head, centers, optimizer=lambda g: torch.optim.SGD(g, lr=0.1), **options
    )


class Constant(nn.Module):
    embedding_size = 4

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, images):
        return torch.full((images.shape[0], self.embedding_size), self.value) * self.scale


def test_parameter_groups_get_their_own_weight_decay():
    module = arcface_module(Constant(1.0), weight_decay={"backbone": 1e-4, "head": 0.0})
    optimizer = module.configure_optimizers()
    backbone_group, head_group = optimizer.param_groups
    assert backbone_group["weight_decay"] == 1e-4 and head_group["weight_decay"] == 0.0
    assert head_group["params"][0] is module.classifier.weight


def test_non_finite_loss_stops_with_advice():
    module = arcface_module(Constant(float("nan")), nonfinite="stop")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, log_every_n_steps=1,
                         max_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    data = torch.utils.data.TensorDataset(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(FloatingPointError, match="lower optimizer.lr"):
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))


def test_validation_embeddings_are_placed_by_image_index():
    """Batches arrive in any order; each embedding must land at its image's index."""
    flatten = nn.Flatten()
    flatten.embedding_size = 4
    module = arcface_module(flatten)
    rng = np.random.default_rng(0)
    images = torch.tensor(rng.normal(size=(6, 1, 2, 2)), dtype=torch.float32)
    module._val_embeddings[0] = [
        (torch.tensor([4, 5, 0]), images[[4, 5, 0]].flatten(1)),
        (torch.tensor([1, 3, 2]), images[[1, 3, 2]].flatten(1)),
    ]
    module.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    placed = module._gather_embeddings(0, num_images=6)
    torch.testing.assert_close(placed, images.flatten(1))


SYNCS = ("item", "__bool__", "__float__", "__int__", "cpu", "tolist", "numpy")


class SyncCounter:
    """Counts the tensor calls that make the host wait for the device (on a GPU) while on."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.on = False
        for name in SYNCS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                if self.on:
                    self.calls.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("margin", ["ArcFace", "CurricularFace", "AdaFace", "SphereFace"])
def test_training_step_without_logging_never_waits_for_the_device(margin, monkeypatch):
    """On steps that do not log, nothing in the training step reads a tensor back to the host
    (on a GPU each read is a device-to-host wait): the non-finite check, the head's state
    metrics and its statistics stay on the device."""
    from facetrain import heads

    counter = SyncCounter(monkeypatch)
    head = getattr(heads, margin)()

    class Counted(FaceRecognitionModule):
        def training_step(self, batch, batch_idx):
            counter.on = not self._is_logging_step()
            try:
                return super().training_step(batch, batch_idx)
            finally:
                counter.on = False

    backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, 8))
    backbone.embedding_size = 8
    module = Counted(backbone, head, FullClassCenters(8, 5, head),
                     optimizer=lambda g: torch.optim.SGD(g, lr=0.1))
    data = torch.utils.data.TensorDataset(torch.randn(24, 3, 4, 4), torch.arange(24) % 5)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=6, log_every_n_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert trainer.global_step == 6
    assert counter.calls == [], f"host syncs in a non-logging training step: {counter.calls}"


def test_checkpoints_from_before_the_class_center_split_still_load():
    """Runs saved when the head owned the class centers (``head.weight``, ``head.bias``) resume:
    the keys move to the classifier and every tensor lands where it belongs."""
    from facetrain.heads import Softmax

    head = Softmax(bias=True)
    module = FaceRecognitionModule(
        Constant(1.0), head, FullClassCenters(4, 3, head),
        optimizer=lambda g: torch.optim.SGD(g, lr=0.1),
    )
    old = {key.replace("classifier.", "head."): torch.randn_like(value)
           for key, value in module.state_dict().items()}
    assert {"head.weight", "head.bias"} <= set(old)
    checkpoint = {"state_dict": dict(old)}
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(module.classifier.weight, old["head.weight"])
    assert torch.equal(module.classifier.bias, old["head.bias"])


# --- no step trains through a NaN (model.nonfinite) -------------------------------------------


class SmallNet(nn.Module):
    """Linear + BatchNorm: a forward on a NaN image makes the running statistics NaN."""

    embedding_size = 8

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.BatchNorm1d(8))

    def forward(self, images):
        return self.layers(images)


def nonfinite_module(head=None, backbone=None, **options) -> FaceRecognitionModule:
    """A module with every kind of state a step moves: BatchNorm statistics, AdaFace's norm
    statistics, SGD momentum and weight decay."""
    from facetrain.heads import AdaFace

    torch.manual_seed(0)
    head = head or AdaFace()
    return FaceRecognitionModule(
        backbone or SmallNet(), head, FullClassCenters(8, 5, head),
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9), **options,
    )


def fit(module, steps: int, nan_steps=(), callbacks=(), labels=None, **trainer_options):
    """Train ``module`` for ``steps`` steps of 4 fixed samples each; the batches of
    ``nan_steps`` get a NaN image (tests/nonfinite_probe.py)."""
    from nonfinite_probe import BadBatches

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4 * steps, 3, 4, 4, generator=generator)
    labels = torch.arange(4 * steps) % 5 if labels is None else labels
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, log_every_n_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[BadBatches(nan_steps), *callbacks], **trainer_options,
    )
    data = torch.utils.data.TensorDataset(images, labels)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return trainer


class StateAtStepStart(pl.Callback):
    """Copies of every parameter, buffer and optimizer state tensor at the start of each step
    (before the module's own batch-start hook)."""

    def __init__(self):
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = {f"model.{k}": v.clone() for k, v in pl_module.state_dict().items()}
        for index, values in trainer.optimizers[0].state_dict()["state"].items():
            state.update({f"optimizer.{index}.{k}": torch.as_tensor(v).clone()
                          for k, v in values.items()})
        self.states[trainer.global_step] = state


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_step_is_skipped_and_changes_nothing(caplog):
    """Step 2 meets a NaN image: its forward has already moved BatchNorm's running statistics
    and AdaFace's norm statistics to NaN. The run goes on; the state after step 2 equals the
    state before it, bit for bit (parameters, buffers, momentum); normal steps change it."""
    module, states = nonfinite_module(), StateAtStepStart()
    with caplog.at_level("WARNING", logger="facetrain.module"):
        trainer = fit(module, steps=5, nan_steps=[2], callbacks=[states])
    assert trainer.global_step == 5
    assert same_state(states.states[2], states.states[3])
    assert not same_state(states.states[1], states.states[2])
    assert not same_state(states.states[3], states.states[4])
    assert module.nonfinite_skipped == 1
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 1
    assert all(torch.isfinite(t).all() for t in module.state_dict().values())
    [warning] = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert warning.startswith("step 2 (epoch 0): training loss is not finite (nan or inf); "
                              "4 of the batch's 4 embeddings not finite; skipped")
    assert "head_norm_mean=nan" in warning and "theta_y_deg=" in warning


class NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NaNGradientAt(SmallNet):
    """Finite forwards; the backward of optimizer step ``step`` gives NaN gradients."""

    def __init__(self, step: int):
        super().__init__()
        self.step, self.poison = step, False

    def forward(self, images):
        out = super().forward(images)
        return NaNGradient.apply(out) if self.poison else out


class PoisonStep(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.backbone.poison = trainer.global_step == pl_module.backbone.step


def test_non_finite_gradients_with_a_finite_loss_are_skipped():
    """A NaN that appears in the backward only (the loss is finite) is caught too."""
    module, states = nonfinite_module(backbone=NaNGradientAt(1)), StateAtStepStart()
    trainer = fit(module, steps=3, callbacks=[PoisonStep(), states])
    assert module.nonfinite_skipped == 1 and trainer.global_step == 3
    assert same_state(states.states[1], states.states[2])


def test_after_a_stop_nothing_is_saved_even_with_finite_weights():
    """model.nonfinite=stop on NaN gradients: the weights stay finite (no update was made),
    yet an exception handler's checkpoint must not be written after the stop."""
    from facetrain.module import NonFiniteError

    module = nonfinite_module(backbone=NaNGradientAt(1), nonfinite="stop")
    with pytest.raises(NonFiniteError, match=r"^training gradients are not finite \(nan or inf\) "
                                             r"since step 1 \(epoch 0; model.nonfinite=stop\)"):
        fit(module, steps=3, callbacks=[PoisonStep()])
    assert all(torch.isfinite(t).all() for t in module.state_dict().values())
    with pytest.raises(NonFiniteError, match="since step 1"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})


def test_non_finite_steps_in_a_row_stop_the_run_and_nothing_is_saved_after():
    from facetrain.module import NonFiniteError

    module = nonfinite_module(max_nonfinite_in_a_row=3)
    with pytest.raises(NonFiniteError) as error:
        fit(module, steps=8, nan_steps=[2, 3, 4])
    assert str(error.value) == (
        "training loss is not finite (nan or inf) since step 2 (epoch 0) on 3 steps in a row, "
        "each skipped but the last (model.max_nonfinite_in_a_row=3): the run is diverging; "
        "lower optimizer.lr or add warm-up, then resume from the last good checkpoint in the "
        "run's checkpoints/ folder with ckpt_path=..."
    )
    assert module.nonfinite_skipped == 2
    with pytest.raises(NonFiniteError):
        module.on_save_checkpoint({"state_dict": module.state_dict()})


def test_skipped_steps_not_in_a_row_do_not_stop():
    module = nonfinite_module(max_nonfinite_in_a_row=2)
    trainer = fit(module, steps=6, nan_steps=[1, 3, 5])
    assert module.nonfinite_skipped == 3 and trainer.global_step == 6


def test_nonfinite_stop_stops_at_the_first():
    from facetrain.module import NonFiniteError

    module, states = nonfinite_module(nonfinite="stop"), StateAtStepStart()
    with pytest.raises(NonFiniteError, match=r"^training loss is not finite \(nan or inf\) since "
                                             r"step 2 \(epoch 0; model.nonfinite=stop\); lower"):
        fit(module, steps=5, nan_steps=[2], callbacks=[states])
    assert max(states.states) == 2 and module.nonfinite_skipped == 0


def test_bad_nonfinite_options_are_config_errors():
    from facetrain.module import TrainingError

    with pytest.raises(TrainingError, match="model.nonfinite must be skip or stop, got 'warn'"):
        nonfinite_module(nonfinite="warn")
    with pytest.raises(TrainingError, match="model.max_nonfinite_in_a_row must be at least 1"):
        nonfinite_module(max_nonfinite_in_a_row=0)


def test_no_checkpoint_of_weights_that_are_not_finite():
    from facetrain.module import NonFiniteError

    module = nonfinite_module()
    module.trainer = pl.Trainer(accelerator="cpu", logger=False)
    module.on_save_checkpoint({"state_dict": module.state_dict()})  # finite: saved
    with torch.no_grad():
        module.classifier.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"^not saving a checkpoint at step 0: the model's "
                                             r"weights are not finite \(classifier.weight\)"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})


def test_fp16_loss_scaling_overflows_are_counted_apart_from_non_finite_steps():
    """16-mixed on CPU (Lightning's MixedPrecision with a GradScaler) from a scale far too
    large: the scaler skips the overflowed steps and halves its scale each time. Those are
    amp_overflow_steps, not failures; the NaN batch of step 14 is the one skipped step."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    from facetrain.heads import ArcFace

    scales = []

    class Scale(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            scales.append(trainer.precision_plugin.scaler.get_scale())

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    module = nonfinite_module(head=ArcFace())
    trainer = fit(module, steps=16, nan_steps=[14], callbacks=[Scale()], gradient_clip_val=5,
                  plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    lowered = sum(b < a for a, b in zip([2.0**24, *scales], scales, strict=False))
    assert module.nonfinite_skipped == 1
    assert module.amp_overflow_steps == lowered - 1 > 0  # the NaN step lowered the scale too
    assert trainer.callback_metrics["train/amp_overflow_steps"] == module.amp_overflow_steps


def test_first_batch_labels_must_be_integer_class_indices():
    from facetrain.data.images import DatasetError

    with pytest.raises(DatasetError, match=r"^training label 9 is not a class index in \[0, 5\): "
                                           r"the classifier has 5 classes"):
        fit(nonfinite_module(), steps=2, labels=torch.tensor([0, 1, 9, 2, 3, 4, 0, 1]))
    with pytest.raises(DatasetError, match=r"^training label -1 is not a class index"):
        fit(nonfinite_module(), steps=2, labels=torch.tensor([0, 1, 2, -1, 3, 4, 0, 1]))
    with pytest.raises(DatasetError, match=r"^training labels must be integer class indices, got "
                                           r"torch.float32 labels \(the first is 0.0\)"):
        fit(nonfinite_module(), steps=2, labels=(torch.arange(8) % 5).float())
    trainer = fit(nonfinite_module(), steps=2, labels=(torch.arange(8) % 5).int())  # any integer
    assert trainer.global_step == 2


@pytest.mark.parametrize("sharded", [False, True])
def test_gradient_clipping_clips_the_backbone_only(sharded):
    """As arcface_torch: the backbone's gradient to norm 5; centers and margin untouched
    (Partial-FC's per-rank shard too)."""
    from facetrain.classifiers import PartialFC
    from facetrain.heads import NormFace

    head = NormFace(learn_scale=True)
    centers = PartialFC(8, 5, head, sample_rate=1.0) if sharded else FullClassCenters(8, 5, head)
    module = FaceRecognitionModule(SmallNet(), head, centers, optimizer=torch.optim.SGD)
    assert module.classifier.sharded == sharded
    for parameter in module.parameters():
        parameter.grad = torch.full_like(parameter, 3.0)
    module.configure_gradient_clipping(None, 5.0, "norm")
    backbone = torch.cat([p.grad.flatten() for p in module.backbone.parameters()])
    torch.testing.assert_close(torch.linalg.vector_norm(backbone), torch.tensor(5.0))
    assert torch.all(backbone > 0)  # scaled, not cut
    for parameter in [*module.classifier.parameters(), *module.head.parameters()]:
        assert torch.all(parameter.grad == 3.0)
    module.configure_gradient_clipping(None, 0.5, "value")
    assert torch.all(torch.cat([p.grad.flatten() for p in module.backbone.parameters()]) <= 0.5)
    assert torch.all(module.classifier.weight.grad == 3.0)


@pytest.mark.parametrize("clip", [5, None])
def test_fp16_scaling_refuses_a_fused_optimizer(clip):
    from pytorch_lightning.plugins.precision import MixedPrecision

    from facetrain.heads import ArcFace
    from facetrain.module import TrainingError

    head = ArcFace()
    module = FaceRecognitionModule(
        SmallNet(), head, FullClassCenters(8, 5, head),
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3, fused=True),
    )
    with pytest.raises(TrainingError, match=r"AdamW\(fused=True\) unscales inside its step "
                                            r"under trainer.precision=16-mixed"):
        fit(module, steps=1, gradient_clip_val=clip,
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])


def test_fp16_overflows_that_persist_below_scale_one_stop_the_run():
    """Gradients that stay non-finite under 16-mixed: while the GradScaler's scale is above 1
    its skips are calibration; once it is below 1 (gradients overflow even scaled down) they
    count as non-finite steps, and max_nonfinite_in_a_row of them stop the run."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    from facetrain.heads import ArcFace
    from facetrain.module import NonFiniteError

    class InfiniteGradients(pl.Callback):
        def on_after_backward(self, trainer, pl_module):
            next(pl_module.backbone.parameters()).grad.fill_(float("inf"))

    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)  # below 1 after two halvings
    module = nonfinite_module(head=ArcFace(), max_nonfinite_in_a_row=3)
    with pytest.raises(NonFiniteError, match="on 3 steps in a row.*try trainer.precision=bf16"):
        fit(module, steps=20, callbacks=[InfiniteGradients()],
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert module.amp_overflow_steps == 6  # scales 4, 2, 1 settle; 0.5, 0.25, 0.125 fail
