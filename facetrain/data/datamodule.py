"""The datamodule: an identity-folder or RecordIO training set plus named verification sets, and
the once-per-epoch report of training images that failed to decode."""

import logging
from collections.abc import Callable, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from facetrain.data.folder import SCAN_WORKERS, IdentityFolderDataset
from facetrain.data.gpu_decode import DevicePipeline, EncodedBatch, check_decode, collate_encoded
from facetrain.data.images import DatasetError
from facetrain.data.pairs import HeldOutPairs, open_verification_set
from facetrain.data.record import RecordDataset, is_record_pack
from facetrain.data.resumable import ResumableDataLoader
from facetrain.data.samplers import (
    IdentityBalancedSampler,
    ShardedSequentialSampler,
    UniformShuffleSampler,
)
from facetrain.data.synthetic import SyntheticFaces
from facetrain.data.transforms import build_transform

log = logging.getLogger(__name__)


class FaceDataModule(pl.LightningDataModule):
    """Training identities from ``train_root`` (an identity folder, or an insightface RecordIO
    pack: a folder with ``train.rec`` or a ``.rec`` file); one validation loader per verification
    set.

    ``verification`` maps a set's name (used in metric names, ``val/<name>/accuracy``) to its
    spec: a pair list, LFW ``pairs.txt`` or ``.bin`` path, or a mapping with ``format`` (see
    ``open_verification_set``). With ``synthetic`` set, ``prepare_data`` first writes the
    built-in synthetic faces (once; cached on disk) — the rest of the pipeline is the one real
    data goes through.

    Identity-folder options (``min_images_per_identity``, ``include_identities``,
    ``exclude_identities``, ``heldout_identities``, ``index_cache``, ``scan_workers``) are those of
    ``IdentityFolderDataset``; held-out identities become a verification set named ``heldout``
    of ``heldout_pairs`` pairs. ``sampler`` (a partial ``IdentityBalancedSampler``, given
    ``labels`` and ``batch_size`` here) replaces the uniform shuffle (``UniformShuffleSampler``).
    The training loader (``ResumableDataLoader``) resumes in the middle of an epoch with the same
    batches and augmentations; its position is the trainer's count of processed batches.

    Training images that fail to decode (each replaced by the next image) are counted in every
    DataLoader worker; ``load_failures`` reports them to this process and ``LoadFailureReport``
    once per epoch.

    ``decode="gpu"`` decodes and augments the training images on the training device
    (``facetrain.data.gpu_decode``): the workers only read JPEG bytes, and
    ``transfer_batch_to_device`` turns the batch into what the CPU path gives. It needs CUDA;
    ``gpu_decode_on_cpu`` runs the same device code on a CPU trainer (tests, debugging).
    """

    def __init__(
        self,
        train_root: str,
        verification: Mapping[str, str | Mapping],
        image_size: Sequence[int] = (112, 112),
        batch_size: int = 64,
        eval_batch_size: int = 128,
        num_workers: int = 2,
        train_augmentations: Sequence = (),
        eval_augmentations: Sequence = (),
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        synthetic: SyntheticFaces | None = None,
        min_images_per_identity: int = 1,
        include_identities: str | None = None,
        exclude_identities: str | None = None,
        heldout_identities: float = 0,
        heldout_pairs: int = 2000,
        heldout_seed: int = 0,
        index_cache: str | None = "auto",
        scan_workers: int = SCAN_WORKERS,
        sampler: Callable[..., IdentityBalancedSampler] | None = None,
        decode: str = "cpu",
        gpu_decode_on_cpu: bool = False,
    ):
        super().__init__()
        self.decode, self.gpu_decode_on_cpu = decode, gpu_decode_on_cpu
        self.train_root = train_root
        self.verification = dict(verification)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.synthetic = synthetic
        self.folder_options = dict(
            min_images_per_identity=min_images_per_identity,
            include_identities=include_identities,
            exclude_identities=exclude_identities,
            heldout_identities=heldout_identities,
            heldout_seed=heldout_seed,
            index_cache=index_cache,
            scan_workers=scan_workers,
        )
        self.heldout_pairs, self.heldout_seed = heldout_pairs, heldout_seed
        self.sampler = sampler
        # decode=gpu's transform is built by _check_decode (prepare_data, setup): its refusals
        # then reach the command line as they are, not wrapped by Hydra's instantiate.
        self._device_pipeline = (train_augmentations, image_size, mean, std)
        self.train_transform = (build_transform(train_augmentations, image_size, mean, std)
                                if decode == "cpu" else None)
        self.eval_transform = build_transform(eval_augmentations, image_size, mean, std)
        self.train_set: IdentityFolderDataset | RecordDataset | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._loader_state_to_load: dict | None = None  # from a checkpoint, for the next loader
        self.verification_sets: list = []

    def prepare_data(self) -> None:
        self._check_decode()
        if self.synthetic is not None:
            self.synthetic.generate()

    def setup(self, stage: str | None = None) -> None:
        self._check_decode()
        if stage in (None, "fit") and self.train_set is None:
            if is_record_pack(self.train_root):
                self._refuse_folder_selection()
                self.train_set = RecordDataset(self.train_root, self.train_transform,
                                               encoded=self.decode == "gpu")
            else:
                self.train_set = IdentityFolderDataset(
                    self.train_root, self.train_transform, **self.folder_options,
                    encoded=self.decode == "gpu",
                )
            if len(self.train_set) < self.batch_size:
                raise DatasetError(
                    f"the training set under {self.train_root!r} has {len(self.train_set)} "
                    f"images, fewer than one batch (data.batch_size={self.batch_size}); "
                    f"lower data.batch_size or add images"
                )
        if not self.verification_sets:
            self.verification_sets = [
                open_verification_set(name, spec, self.eval_transform)
                for name, spec in self.verification.items()
            ]
            if heldout := getattr(self.train_set, "heldout", None):
                self.verification_sets.append(
                    HeldOutPairs(heldout, self.heldout_pairs, self.heldout_seed,
                                 "heldout", self.eval_transform)
                )

    def _check_decode(self) -> None:
        """``data.decode`` before any data is read: a known value, CUDA for gpu, and
        augmentations the device runs."""
        check_decode(self.decode, on_cpu_device=self.gpu_decode_on_cpu)
        if self.decode == "gpu" and self.train_transform is None:
            self.train_transform = DevicePipeline(*self._device_pipeline)

    def _refuse_folder_selection(self) -> None:
        """Identity selection works on a scanned folder; a pack's identities are fixed."""
        defaults = {"min_images_per_identity": 1, "include_identities": None,
                    "exclude_identities": None, "heldout_identities": 0}
        changed = [f"data.{key}" for key, value in defaults.items()
                   if self.folder_options[key] != value]
        if changed:
            raise DatasetError(
                f"{', '.join(changed)} select(s) identities of an identity folder, but "
                f"data.train_root={self.train_root!r} is a RecordIO pack; remove the setting, or "
                f"train on the identity folder the pack was made from"
            )

    @property
    def num_classes(self) -> int:
        if self.train_set is None:
            self.setup("fit")
        return self.train_set.num_classes

    def load_failures(self) -> dict:
        """Training images that failed to decode so far in this run, in any process:
        ``{"count": n, "first": [the first files or records, by name]}``."""
        if self.train_set is None:
            return {"count": 0, "first": []}
        return self._named(*self.train_set.load_failures.run())

    def take_epoch_load_failures(self) -> dict:
        """As ``load_failures``, for the failures since the previous call (one epoch's)."""
        if self.train_set is None:
            return {"count": 0, "first": []}
        return self._named(*self.train_set.load_failures.take_epoch())

    def _named(self, count: int, first: list[int]) -> dict:
        return {"count": count, "first": [self.train_set.sample_name(i) for i in first]}

    def _worker_options(self) -> dict:
        return dict(
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _loader(self, dataset, batch_size: int, sampler) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **self._worker_options())

    def train_dataloader(self) -> ResumableDataLoader:
        """Full batches (a tiny last batch gives noisy BatchNorm statistics) of the uniform
        shuffle or the configured sampler; under a Trainer this rank's share in its world."""
        world, progress = {}, None  # no Trainer: torch.distributed's world, if initialised
        if self.trainer is not None:
            world = dict(num_replicas=self.trainer.world_size, rank=self.trainer.global_rank)
            progress = self._train_batches_processed
        if self.sampler is not None:
            sampler = self.sampler(self.train_set.labels, batch_size=self.batch_size, **world)
        else:
            sampler = UniformShuffleSampler(self.train_set, self.batch_size, **world)
        if self.trainer is not None:
            # Lightning iterates the loader it is given before its set_epoch (FitLoop.setup_data:
            # resuming after an epoch's end, reload_dataloaders_every_n_epochs): start in the
            # epoch it will train, the count of processed epochs it passes set_epoch.
            sampler.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed)
        # Keywords: Lightning replaces the sampler by name (trainer.overfit_batches).
        encoded = {"collate_fn": collate_encoded} if self.decode == "gpu" else {}
        loader = ResumableDataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler,
                                     progress=progress, rank=world.get("rank", 0),
                                     **self._worker_options(), **encoded)
        if self._loader_state_to_load:
            loader.load_state_dict(self._loader_state_to_load)
            self._loader_state_to_load = None
        self._train_loader = loader
        return loader

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """A training batch of ``decode="gpu"`` is decoded on ``device`` (its images that fail
        there are replaced by others of the batch and counted as load failures); every other
        batch moves as Lightning moves it."""
        if not isinstance(batch, EncodedBatch):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        if device.type != "cuda" and not self.gpu_decode_on_cpu:
            raise DatasetError(
                f"data.decode=gpu needs a CUDA device, but this run trains on {device.type} "
                f"(trainer.accelerator); train on a GPU or set data.decode=cpu"
            )
        return self.train_transform.decode(batch, device, self._device_decode_failed)

    def _device_decode_failed(self, position: int, error: Exception) -> None:
        self.train_set.load_failures.add(position)
        log.warning("could not decode %s on the device (%s); using another image of the batch",
                    self.train_set.sample_name(position), error)

    def state_dict(self) -> dict:
        """The train loader's position, also kept here: Lightning restores the copy it saves
        with its loops only into a loader it builds after the restore, but the learning-rate
        schedule's ``trainer.estimated_stepping_batches`` (in ``configure_optimizers``) builds
        and iterates it before. The datamodule is restored first, so this copy reaches the
        loader whenever it is built."""
        loader = self._train_loader
        return {"train_loader": loader.state_dict()} if loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._loader_state_to_load = state_dict.get("train_loader")

    def _train_batches_processed(self) -> int:
        """Batches of the current epoch the trainer has finished: where a checkpoint saved now
        resumes (the loader itself is a prefetched batch ahead)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> list[DataLoader]:
        """This rank's share of each verification set under a Trainer (the whole sets on one
        process); the module gathers the embeddings of all ranks before scoring pairs."""
        world = {}
        if self.trainer is not None:
            world = dict(num_replicas=self.trainer.world_size, rank=self.trainer.global_rank)
        return self.verification_loaders(**world)

    def verification_loaders(self, num_replicas: int = 1, rank: int = 0) -> list[DataLoader]:
        """One loader per verification set reading rank ``rank``'s share of its images (of
        ``num_replicas``): every image on exactly one rank (``ShardedSequentialSampler``)."""
        return [
            self._loader(s, self.eval_batch_size, ShardedSequentialSampler(s, num_replicas, rank))
            for s in self.verification_sets
        ]


class LoadFailureReport(pl.Callback):
    """One warning after each training epoch in which training images failed to decode: how many
    (counted in every DataLoader worker, each replaced by the next image) and the first files."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, FaceDataModule):
            return
        failures = datamodule.take_epoch_load_failures()
        if failures["count"]:
            rank = f" (rank {trainer.global_rank})" if trainer.world_size > 1 else ""
            more = " ..." if failures["count"] > len(failures["first"]) else ""
            log.warning(
                "epoch %d%s: %d training image(s) failed to decode and were replaced by the next "
                "image; first: %s%s",
                trainer.current_epoch, rank, failures["count"], "; ".join(failures["first"]), more,
            )
