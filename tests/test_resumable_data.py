"""The training loader resumed in the middle of an epoch: the same batches, with the same
augmented images, as the epoch uninterrupted; at another world size the samples not yet read."""

import logging
import multiprocessing
import os
import random
import signal
import time

import albumentations as A
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from facetrain.data import DatasetError, FaceDataModule, IdentityFolderDataset
from facetrain.data.resumable import ResumableDataLoader
from facetrain.data.samplers import IdentityBalancedSampler, UniformShuffleSampler
from facetrain.data.transforms import build_transform

BATCH = 4
IDENTITIES, PER_IDENTITY = 5, 8  # 40 images: 10 batches of 4 on one process


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Random-noise images (a flip or a jitter changes every one of them) in identity folders."""
    root = tmp_path_factory.mktemp("resumable") / "faces"
    rng = np.random.default_rng(0)
    for i in range(IDENTITIES):
        (root / f"id{i}").mkdir(parents=True)
        for j in range(PER_IDENTITY):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"id{i}" / f"{j}.png")
    return root


def augmented(root) -> IdentityFolderDataset:
    transform = build_transform([A.HorizontalFlip(p=0.5), A.ColorJitter(p=0.8)], (16, 16),
                                (0.5,) * 3, (0.5,) * 3)
    return IdentityFolderDataset(root, transform, index_cache=None)


def make_sampler(kind: str, dataset, world: int = 1, rank: int = 0):
    if kind == "uniform":
        return UniformShuffleSampler(dataset, BATCH, seed=7, num_replicas=world, rank=rank)
    return IdentityBalancedSampler(dataset.labels, BATCH, images_per_identity=2, seed=7,
                                   num_replicas=world, rank=rank)


def loader_of(kind: str, dataset, world: int = 1, rank: int = 0, **options):
    return ResumableDataLoader(dataset, BATCH, make_sampler(kind, dataset, world, rank), **options)


class Indices(torch.utils.data.Dataset):
    """Sample i is i: a loader's batches say which samples it read, in which order."""

    def __init__(self, n: int):
        self.labels = np.arange(n) % IDENTITIES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> int:
        return index


def indices(loader) -> list[list[int]]:
    return [batch.tolist() for batch in loader]


def global_sequence(per_rank: list[list[list[int]]]) -> list[int]:
    """The epoch over all ranks: global batch b is rank 0's batch b, then rank 1's, ..."""
    return [i for batches in zip(*per_rank, strict=True) for batch in batches for i in batch]


def test_an_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    n = 42
    one = UniformShuffleSampler(range(n), BATCH, seed=3)
    epoch0 = list(one)
    assert len(epoch0) == len(set(epoch0)) == n // BATCH * BATCH and set(epoch0) <= set(range(n))
    assert list(UniformShuffleSampler(range(n), BATCH, seed=3)) == epoch0
    assert list(UniformShuffleSampler(range(n), BATCH, seed=4)) != epoch0
    one.set_epoch(1)
    assert list(one) != epoch0


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_slices_of_one_global_order(world):
    n = 42
    ranks = [UniformShuffleSampler(range(n), BATCH, seed=3, num_replicas=world, rank=r)
             for r in range(world)]
    for sampler in ranks:
        sampler.set_epoch(2)
    shares = [list(sampler) for sampler in ranks]
    assert len({len(share) for share in shares}) == 1
    everything = [i for share in shares for i in share]
    assert len(everything) == len(set(everything)) == n // (BATCH * world) * BATCH * world
    # Together the ranks read the one-process epoch's order, cut to this world's global batches.
    alone = UniformShuffleSampler(range(n), BATCH, seed=3)
    alone.set_epoch(2)
    per_rank = [np.reshape(share, (-1, BATCH)).tolist() for share in shares]
    assert global_sequence(per_rank) == list(alone)[: len(everything)]


@pytest.mark.parametrize("kind", ["uniform", "identity_balanced"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_repeats_the_uninterrupted_one_with_its_augmentations(
    faces, kind, workers
):
    dataset = augmented(faces)

    def loader():
        return loader_of(kind, dataset, num_workers=workers)

    # Uninterrupted: epoch 0 then epoch 1 (the workers' augmentation streams have moved on).
    reference = loader()
    list(reference)
    reference.sampler.set_epoch(1)
    epoch1 = list(reference)
    assert len(epoch1) == len(reference) == IDENTITIES * PER_IDENTITY // BATCH

    interrupted = loader()
    interrupted.sampler.set_epoch(1)
    batches = iter(interrupted)
    first = [next(batches) for _ in range(3)]
    state = interrupted.state_dict()
    assert (state["epoch"], state["samples_consumed"], state["batches_done"]) == (1, 3 * BATCH, 3)
    del batches

    resumed = loader()  # a new process: its sampler starts in epoch 0
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(epoch1) - 3
    assert len(resumed) == len(epoch1)  # the trainer (asking once iterating) counts the epoch
    for (images, labels), (want_images, want_labels) in zip(first + rest, epoch1, strict=True):
        assert torch.equal(labels, want_labels)
        assert torch.equal(images, want_images)
    # The augmentation is real: most samples differ from the same samples unaugmented.
    plain = IdentityFolderDataset(faces, build_transform([], (16, 16), (0.5,) * 3, (0.5,) * 3),
                                  index_cache=None)
    unaugmented = loader_of(kind, plain)
    unaugmented.sampler.set_epoch(1)
    pairs = [(image, raw) for (images, _), (raws, _) in zip(epoch1, unaugmented, strict=True)
             for image, raw in zip(images, raws, strict=True)]
    assert sum(not torch.equal(image, raw) for image, raw in pairs) > len(pairs) / 2


@pytest.mark.parametrize("kind", ["uniform", "identity_balanced"])
def test_load_state_dict_sets_the_epoch(kind):
    dataset = Indices(40)
    saved = loader_of(kind, dataset)
    saved.sampler.set_epoch(3)
    epoch3 = indices(saved)
    saved.sampler.set_epoch(0)
    epoch0 = indices(saved)
    resumed = loader_of(kind, dataset)
    resumed.load_state_dict({**saved.state_dict(), "epoch": 3, "samples_consumed": 2 * BATCH,
                             "batches_done": 2})
    assert resumed.sampler.epoch == 3  # before any set_epoch: Lightning iterates first
    rest = indices(resumed)
    assert rest == epoch3[2:] and rest != epoch0[2:]
    assert indices(resumed) == epoch3  # the next iteration of the epoch is whole again


@pytest.mark.parametrize("workers", [0, 2])
def test_iterating_leaves_the_global_random_state_alone(faces, workers):
    dataset = augmented(faces)
    torch.manual_seed(1)
    states = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    loader = loader_of("uniform", dataset, num_workers=workers)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        assert sum(len(labels) for _, labels in loader) == IDENTITIES * PER_IDENTITY
    assert torch.equal(torch.random.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


@pytest.mark.parametrize("kind", ["uniform", "identity_balanced"])
@pytest.mark.parametrize("new_world", [1, 3])
def test_another_world_size_continues_with_the_samples_not_yet_read(kind, new_world, caplog):
    dataset = Indices(100)
    alone = loader_of(kind, dataset)
    alone.sampler.set_epoch(1)
    order = [i for batch in indices(alone) for i in batch]  # the epoch's global order
    before = []
    for rank in range(2):
        loader = loader_of(kind, dataset, 2, rank)
        loader.sampler.set_epoch(1)
        batches = iter(loader)
        before.append([next(batches).tolist() for _ in range(3)])
    state = loader.state_dict()
    assert (state["samples_consumed"], state["world_size"]) == (3 * BATCH * 2, 2)
    after = []
    with caplog.at_level(logging.WARNING, logger="facetrain.data.resumable"):
        for rank in range(new_world):
            loader = loader_of(kind, dataset, new_world, rank)
            loader.load_state_dict(state)
            after.append(indices(loader))
    assert "saved with 2" in caplog.text and "\n" not in caplog.records[0].getMessage()
    read = global_sequence(before) + global_sequence(after)
    # The positions not yet read, in this world's global batches: nothing read twice or skipped
    # but the remainder short of a whole global batch (as at the end of any epoch).
    remaining = (len(dataset) // (BATCH * new_world) * BATCH * new_world - 24) // (
        BATCH * new_world) * BATCH * new_world
    assert read == order[: 24 + remaining]
    if kind == "uniform":
        assert len(set(read)) == len(read)


@pytest.mark.parametrize(
    ("key", "value", "setting"),
    [("batch_size", 8, "data.batch_size"), ("seed", 8, "seed"), ("sampler", "uniform",
     "data.sampler"), ("dataset_size", 41, "data.train_root")],
)
def test_a_state_of_another_order_is_refused_in_one_line(key, value, setting):
    dataset = Indices(40)
    loader = loader_of("identity_balanced", dataset)
    state = {**loader.state_dict(), key: value, "samples_consumed": BATCH, "batches_done": 1}
    with pytest.raises(DatasetError, match=f"has {key}={value!r}.*{setting}") as error:
        loader.load_state_dict(state)
    assert "\n" not in str(error.value)
    del state["epoch_samples"]
    with pytest.raises(DatasetError, match="has no 'epoch_samples'"):
        loader.load_state_dict(state)


def test_the_position_is_the_trainers_and_a_finished_epoch_resumes_with_the_next():
    dataset = Indices(40)
    processed = [0]
    loader = loader_of("uniform", dataset, progress=lambda: processed[0])
    batches = iter(loader)
    for done in range(4):  # the 4th batch is in training: handed out, not yet processed
        next(batches)
        processed[0] = done
    assert loader.state_dict()["samples_consumed"] == 3 * BATCH
    loader.sampler.set_epoch(1)  # the next epoch began; its iteration has not
    assert loader.state_dict()["samples_consumed"] == 0 and loader.state_dict()["epoch"] == 1
    # Saved after the last batch of epoch 1 (Lightning then goes on with epoch 2).
    whole = loader_of("uniform", dataset)
    whole.sampler.set_epoch(2)
    end = {**loader.state_dict(), "samples_consumed": 40, "batches_done": 10}
    resumed = loader_of("uniform", dataset)
    resumed.load_state_dict(end)
    assert resumed.sampler.epoch == 2 and indices(resumed) == indices(whole)


class RecordBatches(pl.LightningModule):
    """Trains nothing; keeps (epoch, labels, image sums) of every training batch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.seen.append((self.current_epoch, labels.tolist(), images.sum((1, 2, 3)).tolist()))
        return (self.weight * images.mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SaveAt(pl.Callback):
    """Saves a checkpoint in hook ``hook`` (a batch's start or end) at global step ``step``."""

    def __init__(self, hook: str, step: int, path):
        self.hook, self.step, self.path = hook, step, path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.hook == "start" and trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)  # the batch is fetched, not yet trained on

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.hook == "end" and trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.hook == "epoch end" and trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)  # Lightning loads no loader state from it


def fit(faces, ckpt_path=None, callbacks=(), workers: int = 0, **trainer_options) -> list:
    """What a 2-epoch run on ``faces`` trains on, batch by batch."""
    datamodule = FaceDataModule(
        str(faces), {}, image_size=(16, 16), batch_size=BATCH, num_workers=workers,
        index_cache=None, train_augmentations=[A.HorizontalFlip(p=0.5), A.ColorJitter()],
    )
    module = RecordBatches()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
        limit_val_batches=0, **trainer_options,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize(("hook", "step", "workers"),
                         [("end", 13, 0), ("start", 13, 0), ("epoch end", 10, 2)])
def test_lightning_resumes_with_the_same_batches(faces, tmp_path, recwarn, hook, step, workers):
    path = tmp_path / "mid.ckpt"
    # At global step 13: in epoch 1, after its 3rd of 10 batches ("end"), or once its 4th is
    # fetched but not trained on ("start": the loader has handed out one more than is done);
    # at the end of epoch 0, where workers draw epoch 1's indices before Lightning's set_epoch.
    uninterrupted = fit(faces, callbacks=[SaveAt(hook, step, path)], workers=workers)
    assert len(uninterrupted) == 20 and uninterrupted[:10] != uninterrupted[10:]
    resumed = fit(faces, ckpt_path=path, workers=workers)
    assert resumed == uninterrupted[step:]
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


def test_overfit_batches_still_trains_on_the_first_batches_in_order(faces):
    # Lightning rebuilds the loader around a SequentialSampler: a plain, non-resuming loader.
    seen = fit(faces, overfit_batches=2)
    labels = [batch for _, batch, _ in seen]
    assert labels == [[0] * BATCH, [0] * BATCH] * 2


def test_the_transforms_of_a_pipeline_draw_independently(faces):
    """Flip and jitter of equal p, each sample seeded: some samples get one without the other
    (``Compose.set_random_seed`` would give every transform the same draws)."""
    plain = IdentityFolderDataset(faces, build_transform([], (16, 16), (0.5,) * 3, (0.5,) * 3),
                                  index_cache=None)
    flip_jitter = IdentityFolderDataset(
        faces, build_transform([A.HorizontalFlip(p=0.5), A.ColorJitter(p=0.5)], (16, 16),
                               (0.5,) * 3, (0.5,) * 3), index_cache=None)
    raw_batches = list(loader_of("uniform", plain))
    augmented_batches = list(loader_of("uniform", flip_jitter))
    outcomes = set()
    for (raws, _), (images, _) in zip(raw_batches, augmented_batches, strict=True):
        for raw, image in zip(raws, images, strict=True):
            if torch.equal(image, raw):
                outcomes.add("neither")
            elif torch.equal(image, raw.flip(-1)):
                outcomes.add("flip only")
            else:
                outcomes.add("jitter")
    assert outcomes == {"neither", "flip only", "jitter"}


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGUSR2"])
def test_workers_outlive_ctrl_c_and_the_requeue_signal(faces, name):
    """Ctrl-C reaches every process of the terminal's group, SLURM's requeue signal every
    process of the job: the DataLoader workers must keep serving until the main process has
    finished its step and saved (facetrain.preemption), not die and fail its next fetch."""
    loader = loader_of("uniform", augmented(faces), num_workers=2)
    others = set(multiprocessing.active_children())  # other tests' processes, maybe ending
    batches = iter(loader)
    next(batches), next(batches)  # one batch from each worker: both have run their init
    workers = [p for p in multiprocessing.active_children() if p not in others]
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, getattr(signal, name))
    time.sleep(0.5)  # a worker killed by the signal is gone by now
    assert all(worker.is_alive() for worker in workers)
    assert len(list(batches)) == len(loader) - 2
