"""Attention and representation diagnostics (attention distance, NMI, token
similarity, Fourier high-frequency content) and per-layer drivers for ViTs.

The names below load on first use (PEP 562), so `vitablate.analysis.registry` (the metric and evaluation
registries, read by the reports) is importable without torch.
"""

from importlib import import_module

_EXPORTS = {
    "METRICS": ".registry",
    "EVALS": ".registry",
    **{name: ".metrics" for name in ("attention_distance", "nmi", "drop_prefix", "token_cosine", "fourier_hf",
                                     "layerwise_analysis", "layerwise_features")},
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
