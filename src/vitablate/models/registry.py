"""The token-mixer registry: config name -> the VisionTransformer arguments of that mixer, plus its colour.

Each entry is a function `geometry -> VisionTransformer keyword arguments` (`attn_layer` and `mlp_layer` for
timm's Block, or `block_fn` for a whole block; `geometry` is a `vitablate.models.Geometry`). Registration order
is the mixers' order in the docs and the CLI. This module imports no torch (the Snakemake parse and the
reports read it): each builder imports its classes when called.

A new mixer is one class (in `mixers.py` or anywhere) and one entry here:

    @MIXERS.register("my_mixer", colour="#e377c2", label="my token mixer")
    def _my_mixer(g):
        from .mixers import MyMixer, bind
        return dict(attn_layer=bind(MyMixer, num_tokens=g.num_tokens), mlp_layer=_mlp())

It is then valid in `architecture.mixers` (add it to config/schema.yaml's enums too: tests/test_registry.py
checks they agree), drawn in its colour, and built by `vitablate.models.create_model`.
"""

from __future__ import annotations

from ..registry import Registry

MIXERS: Registry = Registry("mixer", "architecture.mixers", home="vitablate.models.registry")


def _mlp():
    from timm.layers import Mlp

    return Mlp


@MIXERS.register("attention", colour="#1f77b4", label="self-attention + MLP (ViT)")
def _attention(g):
    from .mixers import MixingAttention

    return dict(attn_layer=MixingAttention, mlp_layer=_mlp())


@MIXERS.register("feedforward", colour="#ff7f0e", label="feed-forward over patches + MLP (Melas-Kyriazi)")
def _feedforward(g):
    from .mixers import FeedForwardBlock, bind

    return dict(block_fn=bind(FeedForwardBlock, num_tokens=g.num_tokens))


@MIXERS.register("mixer", colour="#7b4173", label="token MLP + MLP (MLP-Mixer)")
def _mixer(g):
    from .mixers import TokenMLP, bind

    return dict(attn_layer=bind(TokenMLP, num_tokens=g.num_tokens), mlp_layer=_mlp())


@MIXERS.register("attention_only", colour="#2ca02c", label="self-attention + feature attention")
def _attention_only(g):
    from .mixers import FeatureAttention, MixingAttention, bind

    return dict(attn_layer=MixingAttention, mlp_layer=bind(FeatureAttention, num_tokens=g.num_tokens))


@MIXERS.register("pooling", colour="#9467bd", label="average pooling + MLP (PoolFormer)")
def _pooling(g):
    from .mixers import PoolingMixer, bind

    return dict(attn_layer=bind(PoolingMixer, grid_size=g.grid_size, num_prefix_tokens=g.num_prefix_tokens),
                mlp_layer=_mlp())


@MIXERS.register("identity", colour="#7f7f7f", label="no token mixing + MLP (lower bound)")
def _identity(g):
    from .mixers import IdentityMixer

    return dict(attn_layer=IdentityMixer, mlp_layer=_mlp())
