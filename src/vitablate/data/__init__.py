"""Data: datasets (fixed splits), batched GPU-friendly augmentation, corruption test sets.

The names below are imported on first use (PEP 562), so that `vitablate.data.files` (the torch-free checks
Snakemake's own process runs) can be imported without torch.
"""

import importlib

_SOURCES = {
    "BatchAugment": "augment",
    "normalize": "augment",
    "two_views": "augment",
    "CORRUPTIONS": "corruptions",
    "corrupt": "corruptions",
    "corrupt_split": "corruptions",
    "DATASETS": "datasets",
    "DatasetBundle": "datasets",
    "FolderSplit": "datasets",
    "Split": "datasets",
    "load_dataset": "datasets",
    "ImageFolderStream": "pipeline",
    "to_unit": "pipeline",
}

__all__ = list(_SOURCES)


def __getattr__(name: str):
    if name in _SOURCES:
        return getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
