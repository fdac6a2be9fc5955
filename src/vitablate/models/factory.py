"""Build timm VisionTransformers with a chosen token mixer, and read their attention.

Every model is timm's `VisionTransformer`; the mixer only picks the classes passed
as `attn_layer` (token mixing) and `mlp_layer` (channel mixing), or the whole block
(`block_fn`) where the reference block is not timm's. Config names map
to classes through `MIXERS` (`registry.py`: a new mixer is one class and one entry there); named sizes live in
`vitablate.config.VARIANTS` (checking a config needs no torch).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .mixers import MixingAttention
from .registry import MIXERS


@dataclass(frozen=True)
class Geometry:
    """What a mixer may need to know about the token sequence."""

    grid_size: tuple[int, int]
    num_prefix_tokens: int

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens


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
    build = MIXERS.entry(mixer).obj  # an unknown name: an error naming the choices
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
        **build(geometry), **timm_kwargs,
    )
    model.mixer = mixer  # read by jobs and analysis; not a parameter
    return model


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


def attention_modules(model: nn.Module) -> list[MixingAttention]:
    """The per-block token-mixing attention modules, in block order."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks; expected a timm VisionTransformer")
    mods = [getattr(blk, "attn", blk) for blk in blocks]  # a whole-block mixer has no .attn
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
def capturing(model: nn.Module, layers: Optional[Sequence[int]] = None) -> Iterator[list[MixingAttention]]:
    """Within the block, the chosen layers keep their maps (`.last_map`, `.last_logits`)."""
    mods = attention_modules(model)
    chosen = [mods[i] for i in resolve_layers(layers, len(mods))]
    for m in chosen:
        m.capture = True
    try:
        yield chosen
    finally:
        for m in chosen:
            m.capture = False
            m.last_map = m.last_logits = m.last_q = m.last_k = None


def attention_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """One (B, H, N, N) post-softmax map per block, prefix tokens included.

    Runs one forward pass in the caller's grad mode; only this call materialises maps.
    """
    with capturing(model) as mods:
        model(x)
        return [m.last_map for m in mods]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
