"""Objectives, each owning its loss: pre-training pretexts and attention transfer."""

from .pretext import MAE, PRETEXTS, Hybrid, MoCo, PretextObjective, SimMIM, Supervised, build_pretext
from .transfer import (
    AttentionCopy, AttentionDistillation, IncompatibleTeacher, attention_distillation_loss, check_compatible,
    parse_layers,
)

__all__ = [
    "MAE", "PRETEXTS", "Hybrid", "MoCo", "PretextObjective", "SimMIM", "Supervised", "build_pretext",
    "AttentionCopy", "AttentionDistillation", "IncompatibleTeacher", "attention_distillation_loss",
    "check_compatible", "parse_layers",
]
