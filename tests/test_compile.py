"""model.compile: the backbone's training forward through torch.compile (inductor) trains what
eager training trains, skips a non-finite step as eager does, and leaves checkpoints that are
the uncompiled model's (they load, evaluate and resume with compile on or off)."""

import json
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import run_cli, tiny_overrides
from test_module import StateAtStepStart, arcface_module, fit, nonfinite_module, same_state

from facetrain.checkpoint import load_backbone
from facetrain.module import TrainingError

TESTS = Path(__file__).resolve().parent


class DynamoGraphs(pl.Callback):
    """In a training process: at the end of training, how many graphs dynamo compiled and how
    many graph breaks it met, written to ``file`` as JSON."""

    def __init__(self, file: str):
        self.file = Path(file)

    def on_train_end(self, trainer, pl_module) -> None:
        from torch._dynamo.utils import counters

        self.file.write_text(json.dumps({
            "graphs": counters["stats"]["unique_graphs"],
            "breaks": sum(counters["graph_break"].values()),
        }))


def float_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    return {k: v.double() for k, v in state.items() if v.is_floating_point()}


def distance(a: dict, b: dict) -> float:
    """The L2 distance between two models' float tensors, all of them together."""
    assert a.keys() == b.keys()
    return sum(float((a[k] - b[k]).square().sum()) for k in a) ** 0.5


def test_compile_keeps_the_uncompiled_names_and_checks_its_value():
    """Building is lazy (nothing compiles before a step); the state_dict is the eager model's."""
    from facetrain.backbones import SphereNet

    torch.manual_seed(0)
    eager = arcface_module(SphereNet(4, embedding_size=8, input_size=(32, 32)))
    torch.manual_seed(0)
    compiled = arcface_module(SphereNet(4, embedding_size=8, input_size=(32, 32)), compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert same_state(compiled.state_dict(), eager.state_dict())
    with pytest.raises(TrainingError, match="model.compile must be true or false, got 'yes'"):
        arcface_module(SphereNet(4, embedding_size=8, input_size=(32, 32)), compile="yes")


@pytest.mark.slow
def test_compiled_training_matches_eager_and_its_checkpoint_resumes_uncompiled(
        tiny_faces, tmp_path, monkeypatch):
    """SphereFace-4 (the smallest backbone), 12 steps an epoch. An eager run of 2 epochs; a
    compiled run of 1 epoch, resumed uncompiled for the 2nd. The compiled run compiled one graph
    (no breaks) and the eager runs none; its checkpoint has the eager checkpoint's tensor names
    (no ``_orig_mod.``), weights within 1% of the eager run's (of what an epoch moves them),
    rebuilds through facetrain-eval's loader with embeddings as close, and resumes uncompiled
    to the eager run's end. One inductor compile: ~40 s on 2 cores."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS), prepend=os.pathsep)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same threads in every run: same float sums

    def train(run: Path, probe: str, *overrides: str) -> dict:
        graphs = tmp_path / f"{probe}.json"
        result = run_cli(
            "train.py", *tiny_overrides(tiny_faces, run), "backbone=sphereface4",
            "backbone.embedding_size=64", "data.image_size=[32,32]", "data.batch_size=32",
            "scheduler=none",
            "measure_baselines=false", "~callbacks.projector",
            "~callbacks.roc", "~callbacks.histograms", "+callbacks.checkpoint.save_top_k=-1",
            "+callbacks.graphs._target_=test_compile.DynamoGraphs",
            f"+callbacks.graphs.file={graphs}",
            *overrides, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(graphs.read_text())

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train(eager, "eager", "trainer.max_epochs=2")["graphs"] == 0
    assert train(compiled, "compiled", "trainer.max_epochs=1", "model.compile=true") == {
        "graphs": 1, "breaks": 0}
    assert train(compiled, "resumed", "trainer.max_epochs=2")["graphs"] == 0  # uncompiled

    names = [list(torch.load(run / "checkpoints" / "best-epoch000.ckpt", weights_only=True)
                  ["state_dict"]) for run in (eager, compiled)]
    assert names[0] == names[1] and not any("_orig_mod" in name for name in names[1])
    e0, e1 = (float_state(eager / "checkpoints" / f"best-epoch00{i}.ckpt") for i in (0, 1))
    c0 = float_state(compiled / "checkpoints" / "best-epoch000.ckpt")
    c1 = float_state(compiled / "checkpoints" / "best-epoch001.ckpt")
    moved = distance(e0, e1)
    assert moved > 0
    print(f"compiled-eager distance {distance(c0, e0):.3g} after 1 epoch, "
          f"{distance(c1, e1):.3g} after a 2nd uncompiled; an epoch moves {moved:.3g}")
    assert distance(c0, e0) < 0.01 * moved  # compiled steps = eager steps
    # An uncompiled resume continues them (the float differences grow with every step: ~0.5%
    # after the 2nd epoch; a resume without the optimizer's moments lands tens of % away).
    assert distance(c1, e1) < 0.05 * moved

    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # facetrain-eval's and export's loader: the uncompiled backbone
        eager0, eager1, compiled0 = (load_backbone(path)[0](images) for path in (
            eager / "checkpoints" / "best-epoch000.ckpt",
            eager / "checkpoints" / "best-epoch001.ckpt",
            compiled / "checkpoints" / "best-epoch000.ckpt",
        ))
    assert (compiled0 - eager0).norm() < 0.01 * (eager1 - eager0).norm()


@pytest.mark.slow
def test_a_compiled_step_that_is_not_finite_is_skipped_with_batchnorm_put_back():
    """The compiled forward updates BatchNorm's running statistics inside its graph; a NaN
    image at step 2 makes them NaN, and the skipped step puts them back as in eager mode: the
    state after step 2 equals the state before it, bit for bit. One small graph to compile."""
    from torch._dynamo.utils import counters

    counters.clear()
    module, states = nonfinite_module(compile=True), StateAtStepStart()
    trainer = fit(module, steps=4, nan_steps=[2], callbacks=[states])
    assert counters["stats"]["unique_graphs"] == 1  # it trained compiled
    assert trainer.global_step == 4 and module.nonfinite_skipped == 1
    assert same_state(states.states[2], states.states[3])
    assert not same_state(states.states[1], states.states[2])
    assert all(torch.isfinite(t).all() for t in module.state_dict().values())
