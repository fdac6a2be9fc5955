"""Data: datasets (fixed splits), batched GPU-friendly augmentation, corruption test sets."""

from .augment import BatchAugment, normalize, two_views
from .corruptions import CORRUPTIONS, corrupt, corrupt_split
from .datasets import DATASETS, DatasetBundle, FolderSplit, Split, load_dataset
from .pipeline import ImageFolderStream, to_unit

__all__ = [
    "Split",
    "FolderSplit",
    "ImageFolderStream",
    "to_unit",
    "DatasetBundle",
    "DATASETS",
    "load_dataset",
    "BatchAugment",
    "normalize",
    "two_views",
    "CORRUPTIONS",
    "corrupt",
    "corrupt_split",
]
