"""Build timm VisionTransformers with a chosen token mixer, and read their attention.

Every model is timm's `VisionTransformer`; the mixer only picks the classes passed
as `attn_layer` (token mixing) and `mlp_layer` (channel mixing), or the whole block
(`block_fn`) where the reference block is not timm's. Config names map
to classes through `MIXERS` (`registry.py`: a new mixer is one class and one entry there); named sizes live in
`vitablate.config.VARIANTS` (checking a config needs no torch).
"""

from __future__ import annotations

import contextlib
import math
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


POS_EMBEDS = ("learn", "sincos", "sincos_moco_v3")  # model.pos_embed
WEIGHT_INITS = ("timm", "moco_v3", "mae")  # model.weight_init


def sincos_pos_embed_2d(dim: int, grid: int, num_prefix_tokens: int = 0, row_first: bool = False) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding: (num_prefix_tokens + grid*grid, dim), zeros for prefix tokens.

    Patches in row-major order. Each axis takes dim/2 channels: sin(pos * w_k) then cos(pos * w_k), with
    w_k = 1 / 10000^(k / (dim/4)), k < dim/4. MAE (facebookresearch/mae: util/pos_embed.py,
    get_2d_sincos_pos_embed: np.meshgrid(grid_w, grid_h) puts the column index in the first half) and
    `row_first=True`: MoCo v3 (vits.py, build_2d_sincos_position_embedding: torch.meshgrid(grid_w, grid_h)
    with 'ij' indexing puts the row index first). Computed in float64, returned as float32.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    gy, gx = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))  # (dim/4,)

    def one_axis(pos: torch.Tensor) -> torch.Tensor:  # (M,) -> (M, dim/2)
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    axes = (gy, gx) if row_first else (gx, gy)
    emb = torch.cat([one_axis(axes[0]), one_axis(axes[1])], dim=1)  # (grid*grid, dim)
    emb = torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


def _init_moco_v3(model: VisionTransformer, in_chans: int) -> None:
    """MoCo v3's initialisation (facebookresearch/moco-v3: vits.py, VisionTransformerMoCo.__init__), after timm's."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:  # vits.py: "treat the weights of Q, K, V separately": fan_out is a third of the rows
                bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if model.cls_token is not None:
        nn.init.normal_(model.cls_token, std=1e-6)
    # vits.py: xavier-uniform over the patch projection as a Linear, bound sqrt(6 / (3 * p * p + embed_dim)); its
    # 3 is the RGB channel count, in_chans here
    proj = model.patch_embed.proj
    bound = math.sqrt(6.0 / float(in_chans * math.prod(proj.kernel_size) + model.embed_dim))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)


def _init_mae(model: VisionTransformer) -> None:
    """MAE's encoder initialisation (facebookresearch/mae: models_mae.py, initialize_weights and _init_weights),
    after timm's; the position embedding is model.pos_embed's business."""
    w = model.patch_embed.proj.weight.data
    nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # "initialize patch_embed like nn.Linear"
    if model.cls_token is not None:
        nn.init.normal_(model.cls_token, std=0.02)
    for m in model.modules():
        mae_init_module(m)


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
    pos_embed: str = "learn",
    freeze_patch_embed: bool = False,
    weight_init: str = "timm",
    init_values: Optional[float] = None,
    **timm_kwargs,
) -> VisionTransformer:
    """A timm `VisionTransformer` whose blocks use `mixer` (a key of `MIXERS`).

    `global_pool='avg'` (default) classifies from the mean patch token so every
    mixer, `identity` included, sees the whole image; the CLS token stays in the
    sequence as in the references. Extra keyword arguments go to timm.

    The pre-training papers' details (config `model.*`; the defaults leave timm's model untouched, its
    parameters and random draws included): `pos_embed` sincos / sincos_moco_v3 fixes the position embedding
    to `sincos_pos_embed_2d` and stops its gradient (MAE models_mae.py, MoCo v3 vits.py; the parameter keeps
    its name, so checkpoints load into a model with a learnt one); `freeze_patch_embed` stops the patch
    projection's gradient (MoCo v3 vits.py stop_grad_conv1); `weight_init` re-initialises as MoCo v3 or
    MAE do, after timm; `init_values` adds timm's LayerScale (SimMIM models/vision_transformer.py gamma_1/2).
    """
    build = MIXERS.entry(mixer).obj  # an unknown name: an error naming the choices
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"model.pos_embed is {pos_embed!r}; choose one of {list(POS_EMBEDS)}")
    if weight_init not in WEIGHT_INITS:
        raise ValueError(f"model.weight_init is {weight_init!r}; choose one of {list(WEIGHT_INITS)}")
    if pos_embed != "learn" and embed_dim % 4:
        raise ValueError(f"model.pos_embed {pos_embed} needs embed_dim divisible by 4, got {embed_dim}; "
                         "use pos_embed: learn or another width")
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}; pick sizes that divide")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    grid = img_size // patch_size
    geometry = Geometry((grid, grid), int(class_token) + timm_kwargs.get("reg_tokens", 0))
    mixer_kwargs = build(geometry)
    if init_values is not None:
        if "block_fn" in mixer_kwargs:
            raise ValueError(f"model.init_values (LayerScale) needs timm's Block, which the {mixer} mixer "
                             "replaces; set model.init_values: null for it")
        timm_kwargs["init_values"] = init_values
    model = VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        mlp_ratio=mlp_ratio, class_token=class_token, drop_path_rate=drop_path_rate,
        **mixer_kwargs, **timm_kwargs,
    )
    if weight_init == "moco_v3":
        _init_moco_v3(model, in_chans)
    elif weight_init == "mae":
        _init_mae(model)
    if pos_embed != "learn":
        if model.pos_embed is None:
            raise ValueError(f"model.pos_embed {pos_embed} needs timm's absolute position embedding")
        npt = 0 if model.no_embed_class else model.num_prefix_tokens
        with torch.no_grad():
            model.pos_embed.copy_(sincos_pos_embed_2d(embed_dim, grid, npt, row_first=pos_embed == "sincos_moco_v3")
                                  .unsqueeze(0))
        model.pos_embed.requires_grad_(False)
    if freeze_patch_embed:
        model.patch_embed.proj.requires_grad_(False)
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


def mae_init_module(m: nn.Module) -> None:
    """MAE's per-module initialisation (models_mae.py `_init_weights`): Linear xavier-uniform with zero bias,
    LayerNorm weight 1 and bias 0; other modules untouched. Shared by `weight_init: mae` and MAE's decoder."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
