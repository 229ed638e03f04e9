"""P×K identity-balanced sampling, alone, in a DataLoader, and under Lightning DDP."""

import json
from collections import Counter
from functools import partial

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from facetrain.data import DatasetError, FaceDataModule
from facetrain.data.samplers import IdentityBalancedSampler

# 12 identities with 1..12 images: some below K, most above, never a multiple pattern.
LABELS = np.repeat(np.arange(12), np.arange(1, 13))
np.random.default_rng(0).shuffle(LABELS)  # the sampler must not rely on sorted labels
SIZES = Counter(LABELS.tolist())


def batches_of(sampler) -> np.ndarray:
    return np.array(list(sampler)).reshape(-1, sampler.batch_size)


@pytest.mark.parametrize(("batch_size", "k"), [(8, 2), (12, 4), (6, 1)])
def test_every_batch_is_p_identities_times_k_images(batch_size, k):
    sampler = IdentityBalancedSampler(LABELS, batch_size, images_per_identity=k, seed=0)
    batches = batches_of(sampler)
    assert len(sampler) == len(LABELS) // batch_size * batch_size == batches.size
    for batch in batches:
        counts = Counter(LABELS[batch].tolist())
        assert len(counts) == batch_size // k and set(counts.values()) == {k}
        for identity in counts:  # images repeat only for identities with fewer than K
            members = batch[LABELS[batch] == identity]
            if SIZES[identity] >= k:
                assert len(set(members.tolist())) == k


def test_identities_with_fewer_than_k_images_are_sampled_with_replacement():
    labels = np.array([0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3])  # identity 0: one image
    sampler = IdentityBalancedSampler(labels, batch_size=8, images_per_identity=4, seed=0)
    seen = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        for batch in batches_of(sampler):
            if 0 in labels[batch]:
                seen.append(batch[labels[batch] == 0].tolist())
            if 1 in labels[batch]:
                assert set(batch[labels[batch] == 1].tolist()) == {1, 2}
    assert seen and all(group == [0, 0, 0, 0] for group in seen)


def test_epochs_differ_and_are_reproducible():
    sampler = IdentityBalancedSampler(LABELS, 8, images_per_identity=2, seed=3)
    first = list(sampler)
    assert list(sampler) == first  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != first
    other = IdentityBalancedSampler(LABELS, 8, images_per_identity=2, seed=3)
    other.set_epoch(1)
    assert list(other) == list(sampler)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_batches_of_equal_count(world_size):
    ranks = [
        IdentityBalancedSampler(LABELS, 6, 2, seed=1, num_replicas=world_size, rank=r)
        for r in range(world_size)
    ]
    per_rank = [batches_of(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) >= 1
    assert sum(len(b) for b in per_rank) == len(LABELS) // 6 // world_size * world_size
    everything = ranks[0].batches()  # what every rank draws before keeping its share
    for rank, batches in enumerate(per_rank):
        np.testing.assert_array_equal(batches, everything[rank::world_size])


def test_too_few_identities_or_bad_batch_size_raise():
    with pytest.raises(DatasetError, match="needs 7 identities per batch"):
        IdentityBalancedSampler(np.repeat(np.arange(6), 4), 14, images_per_identity=2)
    with pytest.raises(ValueError, match="batch_size=10 must be a multiple of"):
        IdentityBalancedSampler(LABELS, 10, images_per_identity=4)


def test_dataloader_yields_pk_batches_and_lightning_keeps_the_sampler():
    dataset = TensorDataset(torch.zeros(len(LABELS), 1), torch.as_tensor(LABELS))
    sampler = IdentityBalancedSampler(LABELS, 8, images_per_identity=4, seed=0)
    loader = DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True)
    for _, labels in loader:
        assert sorted(Counter(labels.tolist()).values()) == [4, 4]
    # Lightning re-wraps a loader's sampler under DDP unless it is a DistributedSampler.
    assert isinstance(sampler, torch.utils.data.DistributedSampler)


def write_faces(root, identities: int, per_identity: int):
    for i in range(identities):
        for j in range(per_identity):
            path = root / f"id{i:02d}" / f"{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i, j, 0)).save(path)
    return root


def test_datamodule_uses_the_configured_sampler(tmp_path):
    root = write_faces(tmp_path / "faces", identities=6, per_identity=5)
    datamodule = FaceDataModule(
        str(root), {}, image_size=(8, 8), batch_size=6, num_workers=0, index_cache=None,
        sampler=partial(IdentityBalancedSampler, images_per_identity=3, seed=0),
    )
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert len(loader) == 30 // 6
    for images, labels in loader:
        assert images.shape == (6, 3, 8, 8)
        assert sorted(Counter(labels.tolist()).values()) == [3, 3]


class RecordLabels(pl.LightningModule):
    """Trains nothing; writes the labels of every training batch this rank saw, per epoch."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append(batch[1].tolist())
        return (self.weight * batch[0].mean()).sum()

    def on_train_end(self):
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_lightning_ddp_gives_each_rank_its_own_pk_batches_every_epoch(tmp_path):
    root = write_faces(tmp_path / "faces", identities=8, per_identity=6)
    datamodule = FaceDataModule(
        str(root), {}, image_size=(8, 8), batch_size=8, num_workers=0, index_cache=None,
        sampler=partial(IdentityBalancedSampler, images_per_identity=2),
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(RecordLabels(tmp_path), datamodule=datamodule)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in ("0", "1"):
        assert len(seen[0][epoch]) == len(seen[1][epoch]) == 48 // 8 // 2
        for batch in seen[0][epoch] + seen[1][epoch]:
            assert sorted(Counter(batch).values()) == [2, 2, 2, 2]
        assert seen[0][epoch] != seen[1][epoch]  # each rank its own share
    assert seen[0]["0"] != seen[0]["1"]  # set_epoch reached the sampler
