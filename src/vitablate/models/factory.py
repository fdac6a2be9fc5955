"""Build timm VisionTransformers with a chosen token mixer, and read their attention.

Every model is timm's `VisionTransformer`; the mixer only picks the classes passed
as `attn_layer` (token mixing) and `mlp_layer` (channel mixing), or the whole block
(`block_fn`) where the reference block is not timm's. Config names map
to classes through `MIXERS`; named sizes live in
`vitablate.config.VARIANTS` (checking a config needs no torch).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .mixers import (
    FeatureAttention, FeedForwardBlock, IdentityMixer, MixingAttention, PoolingMixer, TokenMLP, bind,
)


@dataclass(frozen=True)
class Geometry:
    """What a mixer may need to know about the token sequence."""

    grid_size: tuple[int, int]
    num_prefix_tokens: int

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens


# name -> geometry -> VisionTransformer keyword arguments (attn_layer and mlp_layer for timm's
# Block, or block_fn for a whole block). A new mixer is one class and one line here.
MIXERS: dict[str, Callable[[Geometry], dict[str, Callable]]] = {
    "attention": lambda g: dict(attn_layer=MixingAttention, mlp_layer=Mlp),
    "feedforward": lambda g: dict(block_fn=bind(FeedForwardBlock, num_tokens=g.num_tokens)),
    "mixer": lambda g: dict(attn_layer=bind(TokenMLP, num_tokens=g.num_tokens), mlp_layer=Mlp),
    "attention_only": lambda g: dict(attn_layer=MixingAttention,
                                     mlp_layer=bind(FeatureAttention, num_tokens=g.num_tokens)),
    "pooling": lambda g: dict(attn_layer=bind(PoolingMixer, grid_size=g.grid_size,
                                              num_prefix_tokens=g.num_prefix_tokens), mlp_layer=Mlp),
    "identity": lambda g: dict(attn_layer=IdentityMixer, mlp_layer=Mlp),
}


def create_model(
    mixer: str = "attention",
    img_size: int = 224,
    patch_size: int = 16,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    num_classes: int = 1000,
    in_chans: int = 3,
    global_pool: str = "avg",
    class_token: bool = True,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.0,
    **timm_kwargs,
) -> VisionTransformer:
    """A timm `VisionTransformer` whose blocks use `mixer` (a key of `MIXERS`).

    `global_pool='avg'` (default) classifies from the mean patch token so every
    mixer, `identity` included, sees the whole image; the CLS token stays in the
    sequence as in the references. Extra keyword arguments go to timm.
    """
    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}; choose one of {sorted(MIXERS)}")
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}; pick sizes that divide")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    grid = img_size // patch_size
    geometry = Geometry((grid, grid), int(class_token) + timm_kwargs.get("reg_tokens", 0))
    model = VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        mlp_ratio=mlp_ratio, class_token=class_token, drop_path_rate=drop_path_rate,
        **MIXERS[mixer](geometry), **timm_kwargs,
    )
    model.mixer = mixer  # read by jobs and analysis; not a parameter
    return model


def add_prefix_and_positions(model: VisionTransformer, patches: torch.Tensor) -> torch.Tensor:
    """(B, L, D) patch tokens -> (B, prefix + L, D): the CLS / register tokens prepended and the
    position embeddings added, as timm's `VisionTransformer` does before its blocks.

    timm keeps this step private (`_pos_embed`); masked image modelling needs it on its own, after
    the patch embedding and before the blocks (SimMIM swaps masked patches for a mask token first,
    MAE drops the masked patches after it), so it is rebuilt here from the model's public
    attributes (`cls_token`, `reg_token`, `pos_embed`, `no_embed_class`, `pos_drop`).
    Bit-identical to timm's step (tests/test_models.py); a `dynamic_img_size` model is refused.
    """
    if getattr(model, "dynamic_img_size", False):
        raise ValueError("add_prefix_and_positions needs a fixed image size (dynamic_img_size=False)")
    prefix = [t.expand(patches.shape[0], -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
    x = patches
    if model.pos_embed is None:  # no positions: timm skips pos_drop too
        return torch.cat([*prefix, x], dim=1)
    if model.no_embed_class:  # the position embeddings cover the patches only (DeiT-3): add, then prepend
        x = x + model.pos_embed
        x = torch.cat([*prefix, x], dim=1) if prefix else x
    else:  # they cover the prefix tokens too (original ViT): prepend, then add
        x = torch.cat([*prefix, x], dim=1) if prefix else x
        x = x + model.pos_embed
    return model.pos_drop(x)


def embed(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images -> (B, prefix + L, D): what the first block of `model` receives
    (patch embedding, prefix tokens and positions, patch dropout, pre-norm); `model.norm(blocks(...))`
    of it is `model.forward_features(x)`. Layer 0 of the layer-wise analyses."""
    return model.norm_pre(model.patch_drop(add_prefix_and_positions(model, model.patch_embed(x))))


def make_hookable(model: nn.Module) -> nn.Module:
    """Turn every timm `Attention` in `model` into a `MixingAttention` in place.

    Lets models built by timm itself (e.g. `timm.create_model(name, pretrained=True)`)
    serve as teachers: the parameters are untouched, only the forward gains the hooks.
    """
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = MixingAttention
            MixingAttention.reset_hooks(module)
    return model


def attention_modules(model: nn.Module, strict: bool = True) -> list[Optional[MixingAttention]]:
    """The per-block token-mixing attention modules, in block order.

    strict=False: a block that does not mix tokens by attention gives None, and timm's own
    `Attention` is returned as it is (`capturing` makes it hookable while it captures).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks; expected a timm VisionTransformer")
    mods = [getattr(blk, "attn", blk) for blk in blocks]  # a whole-block mixer has no .attn
    if not strict:
        return [m if isinstance(m, Attention) else None for m in mods]
    bad = {type(m).__name__ for m in mods if not isinstance(m, MixingAttention)}
    if bad:
        raise ValueError(
            f"attention maps need blocks that mix tokens by attention, found {sorted(bad)}; "
            "use mixer='attention' (or vitablate.models.make_hookable on a timm ViT)"
        )
    return mods


def resolve_layers(layers: Optional[Sequence[int]], depth: int) -> list[int]:
    """None -> every layer; negative indices count from the end; checked against depth."""
    if layers is None:
        return list(range(depth))
    out = []
    for i in layers:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"layer index {i} is out of range for a model of depth {depth}")
        out.append(j)
    return sorted(set(out))


@contextlib.contextmanager
def capturing(model: nn.Module, layers: Optional[Sequence[int]] = None, observe: bool = False,
              strict: bool = True) -> Iterator[list[Optional[MixingAttention]]]:
    """Within the block, the chosen layers keep their maps (`.last_map`, `.last_logits`).

    The one way attention maps are read (training losses, figures, the layer-wise analyses).
    observe=True: the forward stays bit-identical to one without capture (timm's own fused
    attention computes each block's output; the map is computed beside it), for readers of the
    block outputs too. strict=False: blocks that do not attend give None, and timm's plain
    `Attention` is made hookable for the duration (its class is restored after).
    """
    mods = attention_modules(model, strict)
    chosen = [mods[i] for i in resolve_layers(layers, len(mods))]
    swapped = [m for m in chosen if m is not None and type(m) is Attention]
    for m in swapped:
        m.__class__ = MixingAttention
        MixingAttention.reset_hooks(m)
    for m in chosen:
        if m is not None:
            m.capture, m.observe = True, observe
    try:
        yield chosen
    finally:
        for m in chosen:
            if m is not None:
                m.capture = m.observe = False
                m.last_map = m.last_logits = m.last_q = m.last_k = None
        for m in swapped:
            for name in ("capture", "observe", "override_map", "override_q", "override_k", "last_map", "last_logits",
                         "last_q", "last_k"):
                m.__dict__.pop(name, None)
            m.__class__ = Attention


def attention_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """One (B, H, N, N) post-softmax map per block, prefix tokens included.

    Runs one forward pass in the caller's grad mode; only this call materialises maps.
    """
    with capturing(model) as mods:
        model(x)
        return [m.last_map for m in mods]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
