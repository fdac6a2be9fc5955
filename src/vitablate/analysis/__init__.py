"""Attention and representation diagnostics (attention distance, NMI, token
similarity, Fourier high-frequency content) and per-layer drivers for ViTs."""

from .metrics import (
    attention_distance,
    drop_prefix,
    fourier_hf,
    layerwise_analysis,
    layerwise_features,
    nmi,
    token_cosine,
)

__all__ = [
    "attention_distance",
    "nmi",
    "drop_prefix",
    "token_cosine",
    "fourier_hf",
    "layerwise_analysis",
    "layerwise_features",
]
