"""Objectives, each owning its loss: pre-training pretexts and attention transfer.

The names below load on first use (PEP 562), so `vitablate.objectives.registry` (the pretext registry, read
by the Snakemake parse and the reports) is importable without torch.
"""

from importlib import import_module

_EXPORTS = {
    "PRETEXTS": ".registry",
    **{name: ".pretext" for name in ("MAE", "Hybrid", "MoCo", "PretextObjective", "SimMIM", "Supervised",
                                     "build_pretext")},
    **{name: ".transfer" for name in ("AttentionCopy", "AttentionDistillation", "IncompatibleTeacher",
                                      "attention_distillation_loss", "check_compatible", "parse_layers")},
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
