"""The datamodule: an identity-folder training set plus named verification pair lists."""

from collections.abc import Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from facetrain.data.folder import IdentityFolderDataset
from facetrain.data.images import DatasetError
from facetrain.data.pairs import PairListDataset
from facetrain.data.synthetic import SyntheticFaces
from facetrain.data.transforms import build_transform


class FaceDataModule(pl.LightningDataModule):
    """Training identities from ``train_root``; one validation loader per verification set.

    ``verification`` maps a set's name (used in metric names, ``val/<name>/accuracy``) to its
    pair list. With ``synthetic`` set, ``prepare_data`` first writes the built-in synthetic faces
    (once; cached on disk) — the rest of the pipeline is the one real data goes through.
    """

    def __init__(
        self,
        train_root: str,
        verification: Mapping[str, str],
        image_size: Sequence[int] = (112, 112),
        batch_size: int = 64,
        eval_batch_size: int = 128,
        num_workers: int = 2,
        train_augmentations: Sequence = (),
        eval_augmentations: Sequence = (),
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        synthetic: SyntheticFaces | None = None,
    ):
        super().__init__()
        self.train_root = train_root
        self.verification = dict(verification)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.synthetic = synthetic
        self.train_transform = build_transform(train_augmentations, image_size, mean, std)
        self.eval_transform = build_transform(eval_augmentations, image_size, mean, std)
        self.train_set: IdentityFolderDataset | None = None
        self.verification_sets: list[PairListDataset] = []

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            self.synthetic.generate()

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = IdentityFolderDataset(self.train_root, self.train_transform)
            if len(self.train_set) < self.batch_size:
                raise DatasetError(
                    f"the training set under {self.train_root!r} has {len(self.train_set)} "
                    f"images, fewer than one batch (data.batch_size={self.batch_size}); "
                    f"lower data.batch_size or add images"
                )
        if not self.verification_sets:
            self.verification_sets = [
                PairListDataset(path, name, self.eval_transform)
                for name, path in self.verification.items()
            ]

    @property
    def num_classes(self) -> int:
        if self.train_set is None:
            self.setup("fit")
        return self.train_set.num_classes

    def _loader(self, dataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,  # a tiny last batch gives noisy BatchNorm statistics
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(s, self.eval_batch_size, train=False) for s in self.verification_sets]
