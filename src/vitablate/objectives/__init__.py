"""Objectives, each owning its loss: pre-training pretexts and attention transfer."""

from .pretext import MAE, PRETEXTS, Hybrid, MoCo, PretextObjective, SimMIM, Supervised, build_pretext

__all__ = ["MAE", "PRETEXTS", "Hybrid", "MoCo", "PretextObjective", "SimMIM", "Supervised", "build_pretext"]
