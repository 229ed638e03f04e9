"""Datasets, transforms, the synthetic face generator and the datamodule."""

from facetrain.data.datamodule import FaceDataModule
from facetrain.data.folder import IdentityFolderDataset, scan_identity_folder
from facetrain.data.images import DatasetError
from facetrain.data.pairs import PairListDataset, read_pair_list
from facetrain.data.synthetic import SyntheticFaces

__all__ = [
    "DatasetError",
    "FaceDataModule",
    "IdentityFolderDataset",
    "PairListDataset",
    "SyntheticFaces",
    "read_pair_list",
    "scan_identity_folder",
]
