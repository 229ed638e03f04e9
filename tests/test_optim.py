"""Learning rates at a reference batch, learning-rate schedules, atomic checkpoint writes."""

import math

import fsspec
import pytest
import torch
from omegaconf import OmegaConf

from facetrain.checkpoint import AtomicCheckpointIO
from facetrain.optim import (
    OptimizerConfigError,
    optimizer_for_batch,
    warmup_cosine,
    warmup_multistep,
    warmup_poly,
)

BASE_LR = 0.1


def learning_rates(make_scheduler, steps: int) -> list[float]:
    """The learning rate used at each optimizer step 0..steps-1 (stepped per optimizer step)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = make_scheduler(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_cosine_matches_closed_form():
    total, warmup, min_ratio = 100, 10, 0.01
    rates = learning_rates(
        lambda opt: warmup_cosine(opt, total, warmup_fraction=0.1, min_lr_ratio=min_ratio),
        total + 5,
    )

    def closed_form(step: int) -> float:
        if step < warmup:
            return BASE_LR * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (total - warmup))
        return BASE_LR * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2)

    for step in (0, 4, 9, 10, 30, 55, 99, 100, 104):
        assert rates[step] == pytest.approx(closed_form(step), rel=1e-9, abs=1e-12)
    # A few values by hand: warm-up 0.01, 0.05; peak 0.1; half-way 0.1*(0.01+0.99/2); floor.
    assert rates[0] == pytest.approx(0.01)
    assert rates[4] == pytest.approx(0.05)
    assert rates[9] == rates[10] == pytest.approx(BASE_LR)
    assert rates[55] == pytest.approx(0.0505)
    assert rates[100] == rates[104] == pytest.approx(BASE_LR * min_ratio)
    after = rates[10:101]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))


def test_warmup_multistep_decays_by_gamma_at_milestones():
    rates = learning_rates(
        lambda opt: warmup_multistep(opt, 100, milestones=(0.5, 0.75, 0.9), gamma=0.1), 100
    )
    expected = [0.1] * 50 + [0.01] * 25 + [0.001] * 15 + [0.0001] * 10
    assert rates == pytest.approx(expected, rel=1e-9)


def test_warmup_multistep_with_warmup():
    rates = learning_rates(
        lambda opt: warmup_multistep(opt, 40, milestones=(0.5,), gamma=0.5, warmup_fraction=0.1),
        40,
    )
    assert rates[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert rates[4:20] == pytest.approx([0.1] * 16)
    assert rates[20:] == pytest.approx([0.05] * 20)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_warmup_poly_is_arcface_torch_polynomial_decay(power):
    # arcface_torch's PolynomialLRWarmup: linear warm-up, then base * (1 - t / T) ** power with
    # t, T counted after the warm-up.
    total, warmup = 50, 5
    rates = learning_rates(
        lambda opt: warmup_poly(opt, total, power=power, warmup_fraction=0.1), total)
    assert rates[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    for step in (5, 17, 30, 49):
        assert rates[step] == pytest.approx(BASE_LR * (1 - (step - warmup) / 45) ** power)


def optimizer_config(**keys):
    return OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1,
                             "momentum": 0.9, **keys})


@pytest.mark.parametrize(("rule", "batch", "expected"), [
    ("linear", 32, 0.1 * 32 / 256),  # the SphereFace run: 0.0125 learns, 0.1 is NaN
    ("linear", 1024, 0.4),
    ("sqrt", 64, 0.05),  # 0.1 * sqrt(64 / 256)
    ("none", 32, 0.1),
])
def test_learning_rate_is_scaled_from_the_reference_batch(rule, batch, expected):
    factory, rate, line = optimizer_for_batch(
        optimizer_config(reference_batch=256, batch_scaling=rule), batch)
    optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
    assert rate == optimizer.param_groups[0]["lr"]
    assert isinstance(optimizer, torch.optim.SGD)  # facetrain's keys did not reach it
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert optimizer.param_groups[0]["momentum"] == 0.9
    assert f"{batch}" in line


def test_learning_rate_without_reference_batch_is_as_given():
    factory, _, line = optimizer_for_batch(optimizer_config(reference_batch=None), 4096)
    assert factory([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"] == 0.1
    assert "as given" in line and "4096" in line


@pytest.mark.parametrize(("keys", "message"), [
    ({"reference_batch": 0}, "optimizer.reference_batch=0"),
    ({"reference_batch": 25.6}, "positive whole number"),
    ({"reference_batch": 256, "batch_scaling": "cubic"}, "optimizer.batch_scaling='cubic'"),
])
def test_bad_learning_rate_settings_are_refused(keys, message):
    with pytest.raises(OptimizerConfigError, match=message):
        optimizer_for_batch(optimizer_config(**keys), 32)


def test_atomic_checkpoint_writes_a_loadable_file_and_no_temporary(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "global_step": 7}
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)

    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 7
    torch.testing.assert_close(loaded["state_dict"]["w"], checkpoint["state_dict"]["w"])
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_atomic_checkpoint_failure_leaves_existing_checkpoint_untouched(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(100)}, path)
    before = path.read_bytes()

    def crashing_save(checkpoint, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(100)}, path)

    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_atomic_checkpoint_to_fsspec_url_is_written_there(tmp_path, monkeypatch):
    # Lightning accepts fsspec URLs (s3://, gs://, memory://) as checkpoint paths.
    monkeypatch.chdir(tmp_path)  # anything written "locally" by mistake lands here
    folder = f"/facetrain-{tmp_path.name}"  # the memory filesystem is process-wide
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, f"memory:/{folder}/last.ckpt")

    memory = fsspec.filesystem("memory")
    assert memory.exists(f"{folder}/last.ckpt")
    assert list(tmp_path.iterdir()) == []
