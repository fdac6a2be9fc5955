"""timm VisionTransformer factory, token mixers, attention capture and override.

The names below load on first use (PEP 562), so `vitablate.models.registry` (the mixer registry, read by the
Snakemake parse and the reports) is importable without torch.
"""

from ..registry import lazy_exports

_EXPORTS = {
    "MIXERS": ".registry",
    "VARIANTS": "..config",
    **{name: ".factory" for name in ("Geometry", "add_prefix_and_positions", "attention_maps", "attention_modules", "capturing", "count_params",
                                     "create_model", "embed", "make_hookable", "resolve_layers")},
    **{name: ".mixers" for name in ("FeatureAttention", "FeedForwardBlock", "IdentityMixer", "MixingAttention",
                                    "PoolingMixer", "TokenMLP")},
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
