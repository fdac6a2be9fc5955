"""Objectives, each owning its loss: pre-training pretexts and attention transfer.

The names below load on first use (PEP 562), so `vitablate.objectives.registry` (the pretext registry, read
by the Snakemake parse and the reports) is importable without torch.
"""

from ..registry import lazy_exports

_EXPORTS = {
    "PRETEXTS": ".registry",
    **{name: ".pretext" for name in ("MAE", "Hybrid", "MoCo", "PretextObjective", "SimMIM", "Supervised",
                                     "build_pretext")},
    **{name: ".transfer" for name in ("AttentionCopy", "AttentionDistillation", "IncompatibleTeacher",
                                      "attention_distillation_loss", "check_compatible", "parse_layers")},
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
