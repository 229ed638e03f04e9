"""Exact DDP through real Lightning runs: ``python train.py trainer=ddp_cpu`` (two CPU processes
over gloo, the second started by Lightning re-running the command), Partial-FC's sharded class
centers, validation split over the ranks, checkpoints that resume at another world size.

One two-rank run (the module fixture ``ddp_run``, about a minute) is shared by the checks on it;
starting the processes costs most of it. It validates on the tiny faces' pairs (60 images) and
on a pair list of an odd number of images, so the ranks embed unequal shares.
"""

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import hydra_main_config, run_cli, tiny_overrides
from hydra.utils import instantiate
from pytorch_lightning.strategies import DDPStrategy

from facetrain.data import FaceDataModule
from facetrain.data.samplers import ShardedSequentialSampler
from facetrain.eval import evaluate
from facetrain.train import train

TESTS = Path(__file__).resolve().parent
EPOCHS, BATCH, WORLD = 3, 8, 2  # per-rank batch; global batch 16
RESUMED_STEPS = 4  # of the epoch after a resume
# AdaFace (norm statistics to keep equal on both ranks) at s=16 learns these faces in three
# epochs at 32x32: measured untrained 0.62, trained 0.77 on two ranks. sample_rate=0.5 of 20
# centers per rank grows to the 16 positives of a global batch (4 centers left out per step).
# A floor under the cosine schedule: the resumed runs' schedule (EPOCHS + 1 short epochs) ends
# before the step they resume at, where min_lr_ratio=0 would leave a learning rate of 0.
RECIPE = [
    "classifier=partial_fc", "classifier.sample_rate=0.5", "loss=adaface", "loss.scale=16",
    "data.image_size=[32,32]", f"data.batch_size={BATCH}", "optimizer.lr=5e-3",
    "scheduler.min_lr_ratio=0.1",
    "~callbacks.projector", "~callbacks.histograms",
]


def steps_per_epoch(faces, world: int) -> int:
    return faces.num_train_identities * faces.images_per_train_identity // (BATCH * world)


def odd_pair_list(faces, path: Path) -> Path:
    """The first pairs of the tiny faces' list that use an odd number of distinct images, as a
    pair list of absolute paths."""
    root = Path(faces.root)
    lines = (root / "verification_pairs.txt").read_text().split("\n")
    pairs = [line.split() for line in lines if line.strip()]
    for count in range(100, len(pairs) + 1):
        if len({image for pair in pairs[:count] for image in pair[:2]}) % 2:
            break
    else:
        raise AssertionError("no prefix of the pair list has an odd number of images")
    path.write_text("".join(f"{root / a} {root / b} {same}\n" for a, b, same in pairs[:count]))
    return path


@pytest.fixture(scope="module")
def ddp_run(tiny_faces, tmp_path_factory):
    """``python train.py trainer=ddp_cpu ...`` for EPOCHS epochs with the untrained baseline;
    each rank saves its replicated state before each validation (tests/rank_probe.py)."""
    root = tmp_path_factory.mktemp("ddp")
    run_dir, probes = root / "run", root / "probes"
    odd = odd_pair_list(tiny_faces, root / "odd_pairs.txt")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", str(TESTS), prepend=os.pathsep)  # rank_probe, in both ranks
        result = run_cli(
            "train.py", *tiny_overrides(tiny_faces, run_dir), *RECIPE, "trainer=ddp_cpu",
            f"trainer.max_epochs={EPOCHS}", "measure_baselines=true",
            f"+data.verification.odd={odd}",
            "+callbacks.rank_probe._target_=rank_probe.SaveRankState",
            f"+callbacks.rank_probe.folder={probes}", cwd=root,
        )
    assert result.returncode == 0, result.stderr[-5000:]
    return SimpleNamespace(
        dir=run_dir, probes=probes, odd=odd, output=result.stdout + result.stderr,
        metrics=json.loads((run_dir / "metrics.json").read_text()),
    )


@pytest.mark.parametrize(("size", "world"), [(7, 2), (6, 2), (61, 2), (5, 3), (1, 2), (4, 1)])
def test_sharded_sampler_gives_every_image_to_exactly_one_rank(size, world):
    """Disjoint shares covering the set, nothing repeated to even them out (what
    DistributedSampler's padding does), shares at most one image apart."""
    shares = [list(ShardedSequentialSampler(range(size), world, rank)) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(size))
    assert [len(ShardedSequentialSampler(range(size), world, r)) for r in range(world)] == [
        len(share) for share in shares
    ]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_val_loaders_read_this_ranks_share_under_a_trainer(tiny_faces):
    datamodule = FaceDataModule(
        f"{tiny_faces.root}/train", {"synthetic": f"{tiny_faces.root}/verification_pairs.txt"},
        image_size=(32, 32), batch_size=16, eval_batch_size=7, num_workers=0,
    )
    datamodule.setup("fit")
    (whole,) = datamodule.val_dataloader()  # no trainer: one process, every image
    assert [int(i) for _, indices in whole for i in indices] == list(range(len(whole.dataset)))
    seen = []
    for rank in range(WORLD):
        datamodule.trainer = SimpleNamespace(world_size=WORLD, global_rank=rank)
        (loader,) = datamodule.val_dataloader()
        seen += [int(i) for _, indices in loader for i in indices]
    assert sorted(seen) == list(range(len(whole.dataset)))


@pytest.mark.slow
def test_two_rank_partial_fc_run_learns_and_rank_zero_alone_reports(ddp_run, tiny_faces):
    metrics = ddp_run.metrics
    assert metrics["steps"] == EPOCHS * steps_per_epoch(tiny_faces, WORLD)  # the global batch
    trained = metrics["verification"]["synthetic"]["accuracy"]
    untrained = metrics["baselines"]["untrained"]["synthetic"]
    assert trained > untrained + 0.08, f"trained {trained} vs untrained {untrained}"
    # One report and one line per validation, though both ranks computed them.
    assert ddp_run.output.count("final verification accuracy") == 1
    assert ddp_run.output.count(f"epoch {EPOCHS - 1}, synthetic: verification accuracy") == 1
    rank_one_log = (ddp_run.dir / "train_ddp_process_1.log").read_text()
    assert "final verification accuracy" not in rank_one_log
    # TensorBoard: events files (one per validate / fit) of a single process.
    events = list((ddp_run.dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and len({name.name.split(".")[-2] for name in events}) == 1
    last = torch.load(ddp_run.dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["state_dict"]["classifier.weight"].shape == (tiny_faces.num_train_identities, 128)


@pytest.mark.slow
def test_both_ranks_hold_the_same_replicated_state(ddp_run, tiny_faces):
    """DDP keeps the backbone replicas equal, and AdaFace's norm statistics come from the global
    batch on each rank (tests/test_partial_fc.py checks their values): after the last step both
    ranks hold the same parameters and margin state, and the checkpoint holds it."""
    ranks = [torch.load(ddp_run.probes / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [r["global_step"] for r in ranks] == [EPOCHS * steps_per_epoch(tiny_faces, WORLD)] * 2
    # The two processes share the CPUs rather than each claiming all of them (Lightning's rule,
    # configs/trainer/ddp_cpu.yaml), unless OMP_NUM_THREADS says otherwise.
    given = os.environ.get("OMP_NUM_THREADS")
    share = int(given) if given else max(1, len(os.sched_getaffinity(0)) // WORLD)
    assert [r["threads"] for r in ranks] == [share] * WORLD
    zero, one = (r["state"] for r in ranks)
    assert zero.keys() == one.keys() and {"head.norm_mean", "head.norm_std"} <= zero.keys()
    assert float(zero["head.norm_mean"]) != 20.0  # moved from its initial value
    for name in zero:
        if "running_" in name or "num_batches_tracked" in name:
            continue  # BatchNorm statistics are per rank (sync_batchnorm false); rank 0's are saved
        torch.testing.assert_close(one[name], zero[name], rtol=0, atol=0, msg=name)
    saved = torch.load(ddp_run.dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name in ("head.norm_mean", "head.norm_std"):
        torch.testing.assert_close(saved[name], zero[name], rtol=0, atol=0)


@pytest.mark.slow
def test_two_rank_validation_equals_one_process_evaluation(ddp_run, tmp_path):
    """The metrics the two ranks computed together (metrics.json: the last epoch's validation)
    are those of facetrain-eval on the same checkpoint in one process, for the set of an odd
    number of images too."""
    last = ddp_run.dir / "checkpoints" / "last.ckpt"
    with hydra_main_config("eval", f"checkpoint={last}", f"output={tmp_path}",
                           f"hydra.run.dir={tmp_path}", "num_workers=0") as cfg:
        evaluated = evaluate(cfg)
    (label,) = evaluated["checkpoints"]
    single = evaluated["checkpoints"][label]["sets"]
    assert single["odd"]["num_images"] % 2 == 1
    assert set(single) == set(ddp_run.metrics["verification"]) == {"synthetic", "odd"}
    for name, distributed in ddp_run.metrics["verification"].items():
        for key in ("accuracy", "accuracy_std", "threshold", "auc", "eer", "num_pairs"):
            assert distributed[key] == pytest.approx(single[name][key], abs=1e-6), (name, key)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["default", "ddp_cpu"])
def test_two_rank_checkpoint_resumes_at_world_size_one_and_two(ddp_run, tiny_faces, tmp_path,
                                                                trainer):
    """last.ckpt of the two-rank run trains one more (short) epoch on one process and on two:
    the step count continues, the centers (and their Adam moments) are cut to the new shards and
    saved whole again, the margin state carries on."""
    last = ddp_run.dir / "checkpoints" / "last.ckpt"
    before = torch.load(last, weights_only=True)
    run_dir = tmp_path / "resumed"
    result = run_cli(
        "train.py", *tiny_overrides(tiny_faces, run_dir), *RECIPE, f"trainer={trainer}",
        f"+data.verification.odd={ddp_run.odd}", f"trainer.max_epochs={EPOCHS + 1}",
        f"+trainer.limit_train_batches={RESUMED_STEPS}", "measure_baselines=false",
        f"ckpt_path={last}",
        "scheduler.extend_on_resume=true",  # more epochs, another world size: a longer schedule
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = before["global_step"] + RESUMED_STEPS
    assert (metrics["epochs"], metrics["steps"]) == (EPOCHS + 1, expected)
    after = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == expected
    weight, saved = (c["state_dict"]["classifier.weight"] for c in (after, before))
    assert weight.shape == saved.shape == (tiny_faces.num_train_identities, 128)
    assert not torch.equal(weight, saved)  # it trained on ...
    # ... from the saved centers, each row still its class's (a shard cut or gathered in the wrong
    # order, or centers drawn afresh, would not be nearest to their own saved row)
    similarity = torch.nn.functional.normalize(weight) @ torch.nn.functional.normalize(saved).T
    assert torch.equal(similarity.argmax(dim=1), torch.arange(len(weight)))
    moments = [s for s in after["optimizer_states"][0]["state"].values()
               if s.get("exp_avg") is not None and s["exp_avg"].shape == weight.shape]
    assert len(moments) == 1  # the centers' Adam state: whole, like the weight
    # AdaFace's norm mean moved on a little from the saved one, not from its initial 20
    mean, saved_mean = (float(c["state_dict"]["head.norm_mean"]) for c in (after, before))
    assert mean != saved_mean and abs(mean - saved_mean) < abs(mean - 20.0)


@pytest.mark.slow
def test_annealing_counts_optimizer_steps_under_gradient_accumulation(tiny_faces, tmp_path):
    """SphereFace's lambda follows optimizer steps: with two batches per step, six batches are
    three steps, and the counter (the step in progress, 1-based) ends at three, not six."""
    batches = 6
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_faces, run_dir), "loss=sphereface", "data.image_size=[32,32]",
                 "+trainer.accumulate_grad_batches=2", f"+trainer.limit_train_batches={batches}",
                 "trainer.max_epochs=1", "measure_baselines=false", "logger=none",
                 "~callbacks.projector", "~callbacks.histograms", "~callbacks.roc"]
    with hydra_main_config("train", *overrides) as cfg:
        metrics = train(cfg)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert metrics["steps"] == state["global_step"] == math.ceil(batches / 2)
    assert int(state["state_dict"]["head.iteration"]) == state["global_step"]


def test_ddp_trainer_configs_build_lightning_ddp():
    """Lightning accepts the configs' arguments: trainer=ddp_cpu builds a two-process gloo DDP
    trainer here; trainer=ddp (GPUs, so only its strategy here) NCCL DDP in 16-bit precision."""
    with hydra_main_config("train", "trainer=ddp_cpu") as cfg:
        trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.world_size == 2
    assert trainer.strategy.process_group_backend == "gloo"
    with hydra_main_config("train", "trainer=ddp") as cfg:
        strategy = instantiate(cfg.trainer.strategy)
        assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "16-mixed")
    assert isinstance(strategy, DDPStrategy) and strategy.process_group_backend == "nccl"
