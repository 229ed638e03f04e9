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


class Labelled(torch.utils.data.Dataset):
    """Items are (index, label): what a rank loads comes back through the dataset itself, so
    the label counts below are the dataset's, not the sampler's idea of them."""

    def __init__(self, labels):
        self.labels = np.asarray(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return index, int(self.labels[index])


def loaded(sampler, dataset) -> list[tuple[list[int], list[int]]]:
    """(indices, labels) of every batch a DataLoader with ``sampler`` yields from ``dataset``."""
    loader = DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True)
    return [(indices.tolist(), labels.tolist()) for indices, labels in loader]


def assert_p_by_k(batches, p: int, k: int) -> None:
    for _, labels in batches:
        assert sorted(Counter(labels).values()) == [k] * p, labels


# 18 identities with exactly K=3 images each, batch 4 identities x 3: one epoch is one pass (every
# identity offers one group), so ranks must split the data like DistributedSampler(drop_last=True):
# disjoint shares of equal length whose union is the data except fewer than one batch per rank,
# dropped as whole identities.
ONE_PASS = np.repeat(np.arange(18), 3)
np.random.default_rng(1).shuffle(ONE_PASS)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_the_data_disjointly_and_cover_it(world_size):
    dataset, k, p = Labelled(ONE_PASS), 3, 4
    for epoch in range(3):
        shares = []
        for rank in range(world_size):
            sampler = IdentityBalancedSampler(
                ONE_PASS, p * k, k, seed=5, num_replicas=world_size, rank=rank
            )
            sampler.set_epoch(epoch)
            batches = loaded(sampler, dataset)
            assert_p_by_k(batches, p, k)
            shares.append([i for indices, _ in batches for i in indices])
        assert len({len(share) for share in shares}) == 1, "ranks must run equally many steps"
        seen = [i for share in shares for i in share]
        assert len(seen) == len(set(seen)), "an image was given twice (to one rank or two)"
        dropped = sorted(set(range(len(ONE_PASS))) - set(seen))
        # DistributedSampler rounds down to a multiple of the world size; here whole batches.
        batches_per_rank = len(ONE_PASS) // (p * k) // world_size
        assert len(seen) == batches_per_rank * world_size * p * k
        assert len(dropped) < p * k * world_size
        seen_identities = set(ONE_PASS[seen].tolist())
        assert not seen_identities & set(ONE_PASS[dropped].tolist()), "identity cut in two"


def test_set_epoch_reshuffles_every_rank_and_keeps_them_disjoint():
    dataset, k, p = Labelled(ONE_PASS), 3, 4
    ranks = [IdentityBalancedSampler(ONE_PASS, p * k, k, seed=2, num_replicas=2, rank=r)
             for r in range(2)]
    epochs = []
    for epoch in range(4):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        epochs.append([loaded(sampler, dataset) for sampler in ranks])
    orders = [tuple(i for share in shares for indices, _ in share for i in indices)
              for shares in epochs]
    assert len(set(orders)) == len(orders), "two epochs gave the same order"
    # Not just a permutation of the batches: which identities meet in a batch changes too.
    groupings = [frozenset(frozenset(labels) for share in shares for _, labels in share)
                 for shares in epochs]
    assert len(set(groupings)) == len(groupings)
    again = IdentityBalancedSampler(ONE_PASS, p * k, k, seed=2, num_replicas=2, rank=1)
    again.set_epoch(2)
    assert loaded(again, dataset) == epochs[2][1], "an epoch must be reproducible from the seed"


def test_two_ranks_on_uneven_identities_each_get_p_by_k_batches():
    """Identities of 1..12 images: several passes per epoch and identities below K, where the
    shares cannot be disjoint image by image; each rank still gets whole P x K batches, equally
    many, and no batch of one rank reappears on the other."""
    dataset = Labelled(LABELS)
    for batch_size, k in [(8, 2), (12, 4), (6, 1)]:
        shares = [loaded(IdentityBalancedSampler(LABELS, batch_size, k, seed=4, num_replicas=2,
                                                 rank=rank), dataset) for rank in range(2)]
        for share in shares:
            assert_p_by_k(share, batch_size // k, k)
        assert len(shares[0]) == len(shares[1]) == len(LABELS) // batch_size // 2
        first = {tuple(sorted(indices)) for indices, _ in shares[0]}
        assert not first & {tuple(sorted(indices)) for indices, _ in shares[1]}


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
    # 16 identities x K images: one epoch is one pass, so the ranks' shares must be disjoint.
    root = write_faces(tmp_path / "faces", identities=16, per_identity=2)
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
        assert len(seen[0][epoch]) == len(seen[1][epoch]) == 32 // 8 // 2
        for batch in seen[0][epoch] + seen[1][epoch]:
            assert sorted(Counter(batch).values()) == [2, 2, 2, 2]
        assert seen[0][epoch] != seen[1][epoch]  # each rank its own share
        # Lightning's rank and world size reached the sampler: together the ranks saw every
        # identity's two images once, and no identity on both ranks.
        identities = [{label for batch in seen[r][epoch] for label in batch} for r in range(2)]
        assert not identities[0] & identities[1]
        every_label = [label for r in range(2) for batch in seen[r][epoch] for label in batch]
        assert Counter(every_label) == dict.fromkeys(range(16), 2)
    assert seen[0]["0"] != seen[0]["1"]  # set_epoch reached the sampler
