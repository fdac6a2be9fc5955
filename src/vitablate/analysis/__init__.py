"""Attention and representation diagnostics (attention distance, NMI, token
similarity, Fourier high-frequency content) and per-layer drivers for ViTs.

The names below load on first use (PEP 562), so `vitablate.analysis.registry` (the metric and evaluation
registries, read by the reports) is importable without torch.
"""

from ..registry import lazy_exports

_EXPORTS = {
    "METRICS": ".registry",
    "EVALS": ".registry",
    **{name: ".metrics" for name in ("attention_distance", "nmi", "drop_prefix", "token_cosine", "fourier_hf",
                                     "layerwise_analysis", "layerwise_features")},
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
