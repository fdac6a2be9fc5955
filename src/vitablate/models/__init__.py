"""timm VisionTransformer factory, token mixers, attention capture and override."""

from ..config import VARIANTS
from .factory import (
    MIXERS,
    Geometry,
    add_prefix_and_positions,
    attention_maps,
    attention_modules,
    capturing,
    count_params,
    create_model,
    embed,
    make_hookable,
    resolve_layers,
)
from .mixers import FeatureAttention, FeedForwardBlock, IdentityMixer, MixingAttention, PoolingMixer, TokenMLP

__all__ = [
    "MIXERS", "VARIANTS", "Geometry", "add_prefix_and_positions", "attention_maps", "attention_modules", "capturing",
    "count_params", "create_model", "embed", "make_hookable", "resolve_layers",
    "FeatureAttention", "FeedForwardBlock", "IdentityMixer", "MixingAttention", "PoolingMixer", "TokenMLP",
]
