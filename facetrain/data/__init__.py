"""Datasets, transforms, the synthetic face generator and the datamodule.

Imports flow one way: ``images`` and ``failures`` ← the readers (``folder``, ``record``,
``binset``) ← ``pairs`` (verification sets) ← ``datamodule``; ``writers`` imports the readers,
never the reverse.
"""

from facetrain.data.binset import BinDataset, read_bin
from facetrain.data.datamodule import FaceDataModule, LoadFailureReport
from facetrain.data.folder import IdentityFolderDataset, scan_identity_folder
from facetrain.data.images import DatasetError
from facetrain.data.pairs import (
    LFWPairsDataset,
    PairListDataset,
    open_verification_set,
    read_lfw_pairs,
    read_pair_list,
)
from facetrain.data.record import RecordDataset
from facetrain.data.synthetic import SyntheticFaces
from facetrain.data.writers import pack_identity_folder, write_bin, write_bin_from_set

__all__ = [
    "BinDataset",
    "DatasetError",
    "FaceDataModule",
    "IdentityFolderDataset",
    "LFWPairsDataset",
    "LoadFailureReport",
    "PairListDataset",
    "RecordDataset",
    "SyntheticFaces",
    "open_verification_set",
    "pack_identity_folder",
    "read_bin",
    "read_lfw_pairs",
    "read_pair_list",
    "scan_identity_folder",
    "write_bin",
    "write_bin_from_set",
]
