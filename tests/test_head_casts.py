"""Every head of configs/loss/ on every class-center store it runs on survives the model cast
as a whole, and mixed precision keeps the head math in float32.

A cast (``.half()``, ``.bfloat16()``, ``.double()``; Lightning's ``16-true``, ``bf16-true``,
``64-true``, which cast the whole LightningModule) turns the margins' state buffers (AdaFace's
norm statistics, CurricularFace's t) into the model's dtype; updating them from float32 batch
statistics must cast at the update, and the loss and every gradient must stay finite. On CPU:
every op involved has a float16 kernel (the stores compute in float32 anyway)."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import margin_configs
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from facetrain.module import FaceRecognitionModule

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LOSSES = margin_configs()  # every margin head of configs/loss/
STORES = sorted((CONFIGS / "classifier").glob("*.yaml"))
D, C, N = 8, 5, 6


def build(loss: Path, store: Path):
    """The margin and the store as train.py builds them (the store outside instantiate)."""
    margin = instantiate(OmegaConf.load(loss))
    centers = instantiate(OmegaConf.load(store), _partial_=True)(
        embedding_size=D, num_classes=C, margin=margin
    )
    return margin, centers


def head_cases():
    for loss in LOSSES:
        for store in STORES:
            if store.stem in instantiate(OmegaConf.load(loss)).stores:
                yield pytest.param(loss, store, id=f"{loss.stem}-{store.stem}")


def batch(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N, 12, generator=generator).to(dtype), torch.arange(N) % C


def floating_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b for name, b in module.named_buffers() if b.is_floating_point()}


@pytest.mark.parametrize(("loss", "store"), head_cases())
@pytest.mark.parametrize(("cast", "dtype"), [("half", torch.float16),
                                             ("bfloat16", torch.bfloat16),
                                             ("double", torch.float64)])
def test_head_survives_a_model_cast(loss, store, cast, dtype):
    torch.manual_seed(0)
    margin, centers = build(loss, store)
    backbone = nn.Linear(12, D)
    model = getattr(nn.ModuleList([backbone, margin, centers]), cast)()
    integer_buffers = {n: b.dtype for n, b in model.named_buffers() if not b.is_floating_point()}
    for step in range(2):  # the second step reads the state the first one wrote
        model.zero_grad()
        margin.set_step(step)
        images, labels = batch(dtype, seed=step)
        loss_value = centers(backbone(images), labels, margin).loss
        extra = margin.extra_loss()
        if extra is not None:
            loss_value = loss_value + extra
        assert torch.isfinite(loss_value), f"{loss.stem} after .{cast}(): loss {loss_value}"
        loss_value.backward()
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                assert parameter.grad is not None and parameter.grad.dtype == dtype, name
                assert torch.isfinite(parameter.grad).all(), f"{name}: non-finite gradient"
    for name, buffer in floating_buffers(model).items():
        assert buffer.dtype == dtype, f"{name} is {buffer.dtype} after .{cast}()"
        assert torch.isfinite(buffer).all(), name
    assert {n: b.dtype for n, b in model.named_buffers() if not b.is_floating_point()} == \
        integer_buffers  # counters stay integers


@pytest.mark.parametrize(("loss", "store"), head_cases())
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_leaves_the_head_math_in_float32(loss, store, autocast_dtype):
    """Under autocast (bf16-mixed; 16-mixed's float16 on CPU too) the backbone's embeddings
    are 16-bit, the logits, loss and statistics float32."""
    margin, centers = build(loss, store)
    backbone = nn.Linear(12, D)
    images, labels = batch()
    with torch.autocast("cpu", dtype=autocast_dtype):
        embeddings = backbone(images)
        output = centers(embeddings, labels, margin, statistics=True)
        logits = centers.logits(embeddings, labels, margin) if store.stem == "full" else None
    assert embeddings.dtype == autocast_dtype  # autocast was on
    assert output.loss.dtype == torch.float32 and torch.isfinite(output.loss)
    assert all(v.dtype == torch.float32 for v in output.statistics.values())
    if logits is not None:
        assert logits.dtype == torch.float32


class SmallNet(nn.Module):
    embedding_size = D

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(12, D), nn.BatchNorm1d(D))

    def forward(self, images):
        return self.layers(images)


class FiniteGradients(pl.Callback):
    """Records whether each step had gradients and all were finite (before the module's own
    non-finite guard sees them: callbacks' hooks run first)."""

    def __init__(self):
        self.steps: list[bool] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        gradients = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.steps.append(bool(gradients) and all(bool(torch.isfinite(g).all()) for g in gradients))


@pytest.mark.parametrize("loss", LOSSES, ids=lambda p: p.stem)
@pytest.mark.parametrize(("precision", "dtype"), [("16-true", torch.float16),
                                                  ("bf16-true", torch.bfloat16),
                                                  ("64-true", torch.float64)])
def test_head_trains_under_lightning_true_precision(loss, precision, dtype):
    """Lightning casts the whole module and creates tensors in ``dtype`` inside the forward;
    three real optimizer steps on the full store."""
    torch.manual_seed(0)
    margin, centers = build(loss, CONFIGS / "classifier" / "full.yaml")
    module = FaceRecognitionModule(
        SmallNet(), margin, centers, optimizer=lambda groups: torch.optim.SGD(groups, lr=0.01)
    )
    losses = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].detach())

    finite = FiniteGradients()
    data = torch.utils.data.TensorDataset(torch.randn(3 * N, 12, generator=torch.Generator()
                                                      .manual_seed(1)), torch.arange(3 * N) % C)
    trainer = pl.Trainer(
        accelerator="cpu", precision=precision, max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[finite, Losses()], log_every_n_steps=1,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=N))
    assert trainer.global_step == 3
    assert finite.steps == [True] * 3, f"{loss.stem} under {precision}: {finite.steps}"
    assert all(torch.isfinite(value) for value in losses)
    assert module.nonfinite_skipped == 0
    for name, tensor in [*module.named_parameters(), *floating_buffers(module).items()]:
        assert tensor.dtype == dtype, f"{name} is {tensor.dtype} under {precision}"
        assert torch.isfinite(tensor).all(), name
