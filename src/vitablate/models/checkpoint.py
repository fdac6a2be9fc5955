"""vitablate's own checkpoint files (a pre-training job's encoder.pt, a training job's model.pt), read one way.

Each holds {"model": state dict, "model_kwargs": create_model keyword arguments, "config": the job's config as
plain dicts} (a model.pt trained with an EMA also its online weights, "online_model"): tensors, dicts, lists,
strings and numbers only, so it is read with `torch.load(weights_only=True)`, which unpickles nothing else (a
checkpoint cannot run code when read).
"""

from __future__ import annotations

import os
from typing import Optional

import torch


def read_checkpoint(path: str, what: str, missing: str, unreadable: str) -> dict:
    """The contents of a torch file, read with weights_only=True.

    what: the file's kind ("checkpoint", "teacher checkpoint"); missing / unreadable: what the error says
    after the path when the file is absent (FileNotFoundError) / cannot be read (RuntimeError): the fix.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} {missing}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"{what} {path} cannot be read ({type(e).__name__}: {str(e)[:300]}); {unreadable}") from e


def save_checkpoint(path: str, model: torch.nn.Module, model_kwargs: dict, config: dict,
                    extra: Optional[dict] = None) -> None:
    """Write a vitablate checkpoint atomically (a temporary file, then a rename). `extra`: more entries beside
    the three (a model.pt trained with an EMA keeps its online weights as "online_model", a state dict)."""
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "model_kwargs": dict(model_kwargs), "config": config,
                    **(extra or {})}, tmp)


def load_vit(path: str) -> tuple[torch.nn.Module, dict, dict]:
    """(model, its create_model kwargs, its job's config) from an encoder.pt or a model.pt."""
    from .factory import create_model

    state = read_checkpoint(path, "checkpoint",
                            "is missing; run the job that writes it first (its pre-training job for an encoder.pt, "
                            "its training job for a model.pt)",
                            "delete it and re-run the job that writes it")
    try:
        model = create_model(**state["model_kwargs"])
        model.load_state_dict(state["model"])
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e}); "
                           "delete it and re-run the job that writes it") from e
    return model, state["model_kwargs"], state.get("config", {})
