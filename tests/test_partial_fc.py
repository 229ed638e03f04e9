"""Partial-FC against the full class-center store: two CPU processes over gloo.

Starting a process costs seconds (it imports torch, and its first DistributedDataParallel
imports torch's compiler stack), so one ``mp.spawn`` (the module fixture ``ranks``) runs every
two-rank scenario and saves what each rank saw; each test compares that with an independent
single-process computation. Centers are split unequally (C=7 over two
ranks: rows 0–3 and 4–6), so an off-by-one in the shards shows.
"""

import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facetrain.classifiers import ClassifierError, FullClassCenters, PartialFC
from facetrain.heads import (
    AdaFace,
    ArcFace,
    CosFace,
    CurricularFace,
    L2Softmax,
    LSoftmax,
    NormFace,
    Softmax,
    SphereFace,
    SubCenterArcFace,
)

WORLD = 2
INPUT, D, C = 6, 8, 7
SHARDS = {0: slice(0, 4), 1: slice(4, 7)}  # C // W + (r < C % W) consecutive classes per rank
BATCH = 4  # per rank
LABELS = torch.tensor([0, 6, 3, 4, 1, 5, 6, 2])  # each rank's rows hit both shards
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}

# Small scales keep the softmax away from saturation, so every gradient carries signal.
# SphereFace with base=0, lambda_min=0 is the un-annealed psi target (the strongest margin).
MARGINS = {
    "arcface": lambda: ArcFace(scale=16.0),
    "cosface": lambda: CosFace(scale=16.0),
    "curricularface": lambda: CurricularFace(scale=16.0),
    "adaface": lambda: AdaFace(scale=16.0),
    "sphereface": lambda: SphereFace(base=0.0, lambda_min=0.0),
    "normface_learnt_scale": lambda: NormFace(scale=8.0, learn_scale=True),
}


def global_inputs() -> torch.Tensor:
    x = torch.randn(WORLD * BATCH, INPUT, generator=torch.Generator().manual_seed(1))
    x[BATCH:] *= 3.0  # rank 1's embeddings are longer: a per-rank norm statistic would differ
    return x


def initial_centers(rows: int = C, size: int = D) -> torch.Tensor:
    return torch.randn(rows, size, generator=torch.Generator().manual_seed(2)) * 0.5


class Replicated(nn.Module):
    """What DDP replicates: a tiny backbone and the margin (a learnt scale is a parameter).
    The Partial-FC shard is not in it: each rank's shard has its own gradient."""

    def __init__(self, margin: nn.Module):
        super().__init__()
        self.backbone = nn.Linear(INPUT, D)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(3)
            self.backbone.weight.copy_(torch.randn(D, INPUT, generator=generator) * 0.4)
            self.backbone.bias.copy_(torch.randn(D, generator=generator) * 0.1)
        self.margin = margin

    def forward(self, x):
        return self.backbone(x)


# -- what each rank runs ---------------------------------------------------------------------

def equivalence(rank: int) -> dict:
    """sample_rate=1: one training step of every margin on this rank's half of the batch."""
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    results = {}
    for name, make in MARGINS.items():
        margin = make()
        store = PartialFC(D, C, margin, sample_rate=1.0, rank=rank, world_size=WORLD)
        with torch.no_grad():
            store.weight.copy_(initial_centers()[SHARDS[rank]])
        model = DistributedDataParallel(Replicated(margin)).train()
        store.train()
        embeddings = model(global_inputs()[rows])
        embeddings.retain_grad()
        output = store(embeddings, LABELS[rows], margin, statistics=True)
        output.loss.backward()
        results[name] = {
            "loss": output.loss.detach(),
            "statistics": output.statistics,
            "embedding_grad": embeddings.grad,
            "replicated_grad": {n: p.grad for n, p in model.module.named_parameters()},
            "center_grad": store.weight.grad,
            "state": {k: v.detach().clone() for k, v in margin.state_dict().items()},
        }
    return results


SAMPLE_CLASSES, SAMPLE_BATCH, SAMPLE_STEPS = 41, 2, 4  # shards of 21 and 20 classes
SAMPLE_SHARDS = {0: range(0, 21), 1: range(21, 41)}
LR, MOMENTUM, DECAY = 0.1, 0.9, 5e-4


def sampling_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(10 + step)
    x = torch.randn(WORLD * SAMPLE_BATCH, D, generator=generator)
    return x, torch.randint(0, SAMPLE_CLASSES, (WORLD * SAMPLE_BATCH,), generator=generator)


def recording_samples(store: PartialFC) -> list:
    """Wrap ``store._sample`` so the indices it draws each step are kept."""
    drawn, sample = [], store._sample

    def record(*args):
        indices = sample(*args)
        drawn.append(indices.clone())
        return indices

    store._sample = record
    return drawn


def sampling(rank: int) -> dict:
    """sample_rate=0.3 for a few SGD steps; and one step of a rate whose count the batch beats."""
    torch.manual_seed(20 + rank)  # the draw: every rank samples its own shard
    rows = slice(rank * SAMPLE_BATCH, (rank + 1) * SAMPLE_BATCH)
    margin = CurricularFace(scale=16.0)
    store = PartialFC(D, SAMPLE_CLASSES, margin, sample_rate=0.3, rank=rank, world_size=WORLD)
    with torch.no_grad():
        store.weight.copy_(initial_centers(SAMPLE_CLASSES)[list(SAMPLE_SHARDS[rank])])
    drawn = recording_samples(store)
    optimizer = torch.optim.SGD([store.weight], lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    steps = []
    for step in range(SAMPLE_STEPS):
        x, labels = sampling_batch(step)
        before = store.weight.detach().clone()
        optimizer.zero_grad(set_to_none=True)
        loss = store(x[rows], labels[rows], margin).loss
        loss.backward()
        steps.append({"before": before, "loss": loss.detach(), "grad": store.weight.grad.clone(),
                      "sampled": drawn[-1], "t": margin.t.clone()})
        optimizer.step()
    small_margin = ArcFace()
    small = PartialFC(D, SAMPLE_CLASSES, small_margin, sample_rate=0.1, rank=rank,
                      world_size=WORLD)
    small_drawn = recording_samples(small.train())
    x, labels = sampling_batch(0)
    small(x[rows], labels[rows], small_margin)
    return {"steps": steps, "after": store.weight.detach().clone(),
            "num_sample": store.num_sample, "small_num_sample": small.num_sample,
            "small_sampled": small_drawn[-1]}


def checkpoint(rank: int) -> dict:
    full = torch.arange(C * D, dtype=torch.float32).view(C, D)
    store = PartialFC(D, C, ArcFace(), rank=rank, world_size=WORLD)
    with torch.no_grad():
        store.weight.copy_(full[SHARDS[rank]])
    state = store.state_dict()
    fresh = PartialFC(D, C, ArcFace(), rank=rank, world_size=WORLD)
    fresh.load_state_dict(state)
    momentum = -full[SHARDS[rank]]  # an optimizer-state-like tensor per center of the shard
    counts = torch.arange(C)[SHARDS[rank]] * 10  # and one with a single value per center
    return {
        "state": state, "loaded": fresh.weight.detach().clone(),
        "momentum_full": store.full_rows(momentum),
        "counts_full": store.full_rows(counts),
        "momentum_back": store.own_rows(store.full_rows(momentum)),
    }


def bad_input(rank: int) -> dict:
    """Unequal batches on the first step, a batch that changes size later, and a label
    outside the classes on one rank only: each must fail on every rank, none may hang."""
    errors = {}
    margin = ArcFace()
    store = PartialFC(D, C, margin, rank=rank, world_size=WORLD).train()
    try:
        store(torch.randn(3 + rank, D), torch.zeros(3 + rank, dtype=torch.long), margin)
    except ClassifierError as error:
        errors["first"] = str(error)
    store = PartialFC(D, C, margin, rank=rank, world_size=WORLD).train()
    store(torch.randn(4, D), torch.zeros(4, dtype=torch.long), margin)
    try:
        store(torch.randn(3, D), torch.zeros(3, dtype=torch.long), margin)
    except ClassifierError as error:
        errors["later"] = str(error)
    store = PartialFC(D, C, margin, rank=rank, world_size=WORLD).train()
    try:
        store(torch.randn(2, D), torch.tensor([0, C if rank == 1 else 1]), margin)
    except RuntimeError as error:
        errors["label"] = str(error)
    dist.barrier()  # both ranks are here, none left waiting in the all-gather
    return errors


SCENARIOS = {"equivalence": equivalence, "sampling": sampling, "checkpoint": checkpoint,
             "bad_input": bad_input}


def run_rank(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    # A collective that one rank never reaches fails after a minute instead of hanging CI.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        for name, scenario in SCENARIOS.items():
            try:
                result = scenario(rank)
            except Exception:
                result = {"error": traceback.format_exc()}
            torch.save(result, f"{out}/{name}.{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``ranks(name)``: the two ranks' results of scenario ``name``."""
    folder = tmp_path_factory.mktemp("partial_fc")
    mp.spawn(run_rank, args=(str(folder / "init"), str(folder)), nprocs=WORLD, join=True)

    def results(name: str) -> list:
        per_rank = [torch.load(folder / f"{name}.{rank}.pt", weights_only=False)
                    for rank in range(WORLD)]
        for rank, result in enumerate(per_rank):
            if "error" in result:
                pytest.fail(f"rank {rank} failed in {name}:\n{result['error']}")
        return per_rank

    return results


# -- the tests -------------------------------------------------------------------------------

def full_step(name: str) -> dict:
    """The reference: one process, the whole batch, every center in one matrix."""
    margin = MARGINS[name]()
    model = Replicated(margin).train()
    store = FullClassCenters(D, C, margin).train()
    with torch.no_grad():
        store.weight.copy_(initial_centers())
    embeddings = model(global_inputs())
    embeddings.retain_grad()
    output = store(embeddings, LABELS, margin, statistics=True)
    output.loss.backward()
    return {
        "loss": output.loss.detach(), "statistics": output.statistics,
        "embedding_grad": embeddings.grad,
        "replicated_grad": {n: p.grad for n, p in model.named_parameters()},
        "center_grad": store.weight.grad,
        "state": margin.state_dict(),
    }


@pytest.mark.parametrize("name", list(MARGINS))
def test_sample_rate_one_equals_the_full_store(ranks, name):
    expected = full_step(name)
    for rank, result in enumerate(ranks("equivalence")):
        got = result[name]
        torch.testing.assert_close(got["loss"], expected["loss"], **TOLERANCE)
        # DDP averages over the ranks, so each rank's embedding gradient is W times its rows'
        # share of the global-batch loss (as under DDP with the full store) ...
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        torch.testing.assert_close(got["embedding_grad"],
                                   WORLD * expected["embedding_grad"][rows], **TOLERANCE)
        # ... and the averaged backbone (and learnt scale) gradient is the global one.
        assert got["replicated_grad"].keys() == expected["replicated_grad"].keys()
        for key, grad in expected["replicated_grad"].items():
            torch.testing.assert_close(got["replicated_grad"][key], grad, **TOLERANCE)
        torch.testing.assert_close(got["center_grad"], expected["center_grad"][SHARDS[rank]],
                                   **TOLERANCE)
        # batch statistics and margin state come from the global batch on every rank
        for key, value in expected["state"].items():
            torch.testing.assert_close(got["state"][key], value, **TOLERANCE)
        for key, value in expected["statistics"].items():
            torch.testing.assert_close(got["statistics"][key], value, **TOLERANCE)


def test_every_positive_is_sampled_and_the_count_is_as_configured(ranks):
    results = ranks("sampling")
    for rank, result in enumerate(results):
        shard = SAMPLE_SHARDS[rank]
        assert result["num_sample"] == int(0.3 * len(shard)) == 6
        draws = []
        for step, record in enumerate(result["steps"]):
            sampled = record["sampled"].tolist()
            assert len(sampled) == 6 and sampled == sorted(set(sampled))
            labels = sampling_batch(step)[1].tolist()
            positives = {label - shard.start for label in labels if label in shard}
            assert positives <= set(sampled), (rank, step, positives, sampled)
            draws.append(tuple(sampled))
        assert len(set(draws)) == len(draws), "the negatives are redrawn every step"
        # rate 0.1 keeps int(0.1 * shard) = 2 centers, fewer than the 4 rows of the global
        # batch: the count grows to the global batch so that every positive fits
        assert result["small_num_sample"] == 2
        small = result["small_sampled"].tolist()
        assert len(small) == WORLD * SAMPLE_BATCH == len(set(small))
        labels = sampling_batch(0)[1].tolist()
        assert {label - shard.start for label in labels if label in shard} <= set(small)


def test_the_sampled_loss_is_the_cross_entropy_over_the_sampled_centers(ranks):
    results = ranks("sampling")
    margin = CurricularFace(scale=16.0).train()  # its t must follow the ranks' t
    for step in range(SAMPLE_STEPS):
        records = [result["steps"][step] for result in results]
        classes = [SAMPLE_SHARDS[rank][i] for rank, record in enumerate(records)
                   for i in record["sampled"].tolist()]
        store = FullClassCenters(D, len(classes), margin)
        with torch.no_grad():
            store.weight.copy_(torch.cat([r["before"][r["sampled"]] for r in records]))
        x, labels = sampling_batch(step)
        loss = store(x, torch.tensor([classes.index(label) for label in labels.tolist()]),
                     margin).loss
        loss.backward()
        grads = store.weight.grad.split([len(r["sampled"]) for r in records])
        for rank, record in enumerate(records):
            torch.testing.assert_close(record["loss"], loss.detach(), **TOLERANCE)
            torch.testing.assert_close(record["t"], margin.t, **TOLERANCE)
            torch.testing.assert_close(record["grad"][record["sampled"]], grads[rank],
                                       **TOLERANCE)
            unsampled = torch.ones(len(SAMPLE_SHARDS[rank]), dtype=torch.bool)
            unsampled[record["sampled"]] = False
            assert torch.all(record["grad"][unsampled] == 0)


def test_unsampled_centers_still_follow_momentum_and_weight_decay(ranks):
    """The documented policy (one dense parameter, as arcface_torch v2): SGD's update
    ``b ← momentum·b + g + decay·w; w ← w − lr·b`` runs on every center, g = 0 if unsampled."""
    for rank, result in enumerate(ranks("sampling")):
        steps = result["steps"]
        weights = [record["before"] for record in steps] + [result["after"]]
        buffer = None
        moved_by_momentum_only = 0
        for step, record in enumerate(steps):
            w = weights[step]
            direction = record["grad"] + DECAY * w
            buffer = direction if buffer is None else MOMENTUM * buffer + direction
            expected = w - LR * buffer
            torch.testing.assert_close(weights[step + 1], expected, **TOLERANCE)
            unsampled = torch.ones(len(w), dtype=torch.bool)
            unsampled[record["sampled"]] = False
            # an unsampled center moves, by far more than the decay alone would move it
            shift = (weights[step + 1] - w)[unsampled].norm(dim=1)
            decay_only = LR * DECAY * w[unsampled].norm(dim=1)
            assert torch.all(shift > 0)
            moved_by_momentum_only += int((shift > 10 * decay_only).sum())
        assert moved_by_momentum_only > 0, rank


def test_checkpoints_hold_the_whole_matrix_and_load_at_any_world_size(ranks):
    full = torch.arange(C * D, dtype=torch.float32).view(C, D)
    results = ranks("checkpoint")
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["state"]["weight"], full, rtol=0, atol=0)
        torch.testing.assert_close(result["loaded"], full[SHARDS[rank]], rtol=0, atol=0)
        torch.testing.assert_close(result["momentum_full"], -full, rtol=0, atol=0)
        torch.testing.assert_close(result["counts_full"], torch.arange(C) * 10, rtol=0, atol=0)
        torch.testing.assert_close(result["momentum_back"], -full[SHARDS[rank]], rtol=0, atol=0)
    state = results[0]["state"]
    single = PartialFC(D, C, ArcFace())  # the run resumed on one process
    single.load_state_dict(state)
    torch.testing.assert_close(single.weight.detach(), full, rtol=0, atol=0)
    three = [PartialFC(D, C, ArcFace(), rank=rank, world_size=3) for rank in range(3)]
    for shard in three:  # or on three: rows 0-2, 3-4, 5-6
        shard.load_state_dict(state)
    assert [shard.weight.shape[0] for shard in three] == [3, 2, 2]
    torch.testing.assert_close(torch.cat([s.weight.detach() for s in three]), full, rtol=0,
                               atol=0)


def test_bad_batches_fail_on_every_rank(ranks):
    for rank, errors in enumerate(ranks("bad_input")):
        assert "same batch size on every rank, got [3, 4]" in errors.get("first", ""), rank
        assert "drop_last=true" in errors["first"]
        assert "fixed per-rank batch size (first 4, now 3)" in errors.get("later", ""), rank
        # rank 1's bad label stops rank 0 too (the check runs on the gathered labels)
        assert "a label is outside [0, 7)" in errors.get("label", ""), rank


def test_a_label_outside_the_classes_is_named():
    margin = ArcFace()
    store = PartialFC(D, C, margin, sample_rate=1.0)
    for bad in (C, -1):
        with pytest.raises(RuntimeError, match=r"a label is outside \[0, 7\)"):
            store(torch.randn(2, D), torch.tensor([0, bad]), margin)


@pytest.mark.parametrize("margin", [
    Softmax(), LSoftmax(), L2Softmax(), SubCenterArcFace(), NormFace(agent_loss="triplet"),
], ids=lambda m: type(m).__name__)
def test_margins_that_need_every_center_are_refused(margin):
    with pytest.raises(ClassifierError, match="runs on classifier=full only, not "
                                              "classifier=partial_fc"):
        PartialFC(D, C, margin)


@pytest.mark.parametrize("rate", [0.0, 1.5, -0.1])
def test_sample_rate_outside_zero_one_is_refused(rate):
    with pytest.raises(ClassifierError, match=r"classifier.sample_rate must be in \(0, 1\]"):
        PartialFC(D, C, ArcFace(), sample_rate=rate)
