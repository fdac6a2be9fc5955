"""Data: datasets (fixed splits), batched GPU-friendly augmentation, corruption test sets."""

from .augment import BatchAugment, normalize, two_views
from .corruptions import CORRUPTIONS, corrupt, corrupt_split
from .datasets import DATASETS, DatasetBundle, FolderSplit, Split, load_dataset

__all__ = [
    "Split",
    "FolderSplit",
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
