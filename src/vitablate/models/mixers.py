"""Token mixers, each a class timm's `Block(attn_layer=..., mlp_layer=...)` can build,
or a whole block timm's `VisionTransformer(block_fn=...)` can build.

A new mixer is one class and one entry in `MIXERS` (see `registry.py`).

`MixingAttention` is timm's `Attention` with the same parameter names (so timm
checkpoints load) plus per-module switches that later questions need:

- `capture`: keep the post-softmax map (`last_map`, (B, H, N, N)) and the
  pre-softmax logits (`last_logits`) of the last forward;
- `override_map`: use this post-softmax map instead of softmax(QK^T) (attention copy);
- `override_q` / `override_k`: use these queries or keys instead of the module's own
  (copy Q-only / K-only); `capture` also keeps `last_q`, `last_k`;
- `observe` (with `capture`): keep the map, but compute the output by timm's own path, so
  the forward is bit-identical to one without capture (analyses that read block outputs too).

With every switch off, the forward is timm's fused scaled-dot-product path: the
hooks cost one attribute check per block.
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.layers import Attention, DropPath, Mlp
from torch import nn


class MixingAttention(Attention):
    """timm `Attention` whose maps can be captured or overridden (see module doc)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reset_hooks()

    def reset_hooks(self) -> None:
        self.capture = False
        self.observe = False
        self.override_map: Optional[torch.Tensor] = None  # (B, H, N, N) post-softmax
        self.override_q: Optional[torch.Tensor] = None  # (B, H, N, head_dim), after q_norm
        self.override_k: Optional[torch.Tensor] = None
        self.last_map: Optional[torch.Tensor] = None
        self.last_logits: Optional[torch.Tensor] = None
        self.last_q: Optional[torch.Tensor] = None
        self.last_k: Optional[torch.Tensor] = None

    @property
    def hooked(self) -> bool:
        return (
            self.capture
            or self.override_map is not None
            or self.override_q is not None
            or self.override_k is not None
        )

    def forward(
        self,
        x: torch.Tensor,  # (B, N, C)
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if not self.hooked:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal or self.gate is not None:
            raise NotImplementedError("attention capture/override supports unmasked, ungated attention only")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.override_q is not None:
            q = self.override_q
        if self.override_k is not None:
            k = self.override_k
        logits = None
        if self.override_map is not None:
            attn = self.override_map  # the student's own Q/K are unused here
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            attn = logits.softmax(dim=-1)
        if self.capture:
            self.last_map, self.last_logits, self.last_q, self.last_k = attn, logits, q, k
        if self.observe:  # the map is kept; the output is timm's own, exactly as without capture
            if self.override_map is not None or self.override_q is not None or self.override_k is not None:
                raise ValueError("observe keeps timm's own output: it cannot be combined with an override")
            return super().forward(x)
        x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))


class FeedForwardBlock(nn.Module):
    """The feed-forward-only block of "Do you even need attention?".

    lukemelas/do-you-even-need-attention: vision_transformer_linear.py, LinearBlock:
    first the channel MLP with a pre-norm over channels, then the token MLP
    (N -> mlp_ratio * N -> N, shared across channels) with a pre-norm over the
    token dimension, i.e. on the transposed (B, C, N) features each channel's N
    token values are normalised. Each stage is a residual branch with its own
    stochastic depth. Called with timm's `block_fn` arguments.
    """

    num_tokens: int = 0  # bound per model by `bind`: patches + prefix tokens

    def __init__(self, dim: int, num_heads: int = 1, mlp_ratio: float = 4.0, proj_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: type = nn.GELU, norm_layer: type = nn.LayerNorm,
                 **_: object) -> None:
        super().__init__()
        n = self.num_tokens
        if n <= 0:
            raise ValueError("FeedForwardBlock needs num_tokens; build it through vitablate.models.create_model")
        self.norm1 = norm_layer(dim)  # over channels
        self.mlp_channels = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(n)  # over the N tokens
        self.mlp_tokens = Mlp(n, hidden_features=int(n * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("the feed-forward-only block mixes every token; it takes no attention mask")
        x = x + self.drop_path1(self.mlp_channels(self.norm1(x)))  # (B, N, C)
        t = x.transpose(1, 2)  # (B, C, N): each channel's token values
        t = t + self.drop_path2(self.mlp_tokens(self.norm2(t)))
        return t.transpose(1, 2)


class TokenMLP(nn.Module):
    """Feed-forward over the token dimension inside timm's `Block` (the `mixer` mixer).

    Each channel's N-vector of token values goes through an MLP N -> 4N -> N,
    shared across channels, in the attention layer's place: token mixing first,
    after timm's LayerNorm over channels (MLP-Mixer's order and norm). Not the
    paper's block: that is `FeedForwardBlock` (mixer `feedforward`).
    """

    num_tokens: int = 0  # bound per model by `bind`: patches + prefix tokens
    hidden_ratio: float = 4.0

    def __init__(self, dim: int, num_heads: int = 1, proj_drop: float = 0.0, **_: object) -> None:
        super().__init__()
        n = self.num_tokens
        if n <= 0:
            raise ValueError("TokenMLP needs num_tokens; build it through vitablate.models.create_model")
        self.mlp = Mlp(n, hidden_features=int(n * self.hidden_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        # (B, N, C) -> (B, C, N): mix along tokens, channel by channel
        return self.mlp(x.transpose(1, 2)).transpose(1, 2)


class FeatureAttention(nn.Module):
    """Attention over the feature dimension, used in place of the channel MLP.

    The C channels are the sequence and each channel's N token values its
    embedding, so the layer mixes features but never tokens. Single head: N (e.g.
    197) rarely divides into heads. Called with timm's `mlp_layer` arguments.
    """

    num_tokens: int = 0

    def __init__(self, in_features: int, hidden_features: int | None = None, bias: bool = True,
                 drop: float = 0.0, **_: object) -> None:
        super().__init__()
        n = self.num_tokens
        if n <= 0:
            raise ValueError("FeatureAttention needs num_tokens; build it through vitablate.models.create_model")
        self.attn = Attention(n, num_heads=1, qkv_bias=bias, proj_drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x.transpose(1, 2)).transpose(1, 2)  # (B, N, C) -> (B, C, N) -> back


class PoolingMixer(nn.Module):
    """PoolFormer's token mixer: avg-pool(3x3) over the patch grid minus the input.

    Prefix (CLS) tokens are not on the grid: they get the mean of the patch tokens
    minus themselves, so they still summarise the image.
    """

    grid_size: tuple[int, int] = (0, 0)
    num_prefix_tokens: int = 1

    def __init__(self, dim: int, **_: object) -> None:
        super().__init__()
        if self.grid_size[0] <= 0:
            raise ValueError("PoolingMixer needs grid_size; build it through vitablate.models.create_model")
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        p = self.num_prefix_tokens
        prefix, patches = x[:, :p], x[:, p:]  # (B, P, C), (B, gh*gw, C)
        B, M, C = patches.shape
        gh, gw = self.grid_size
        grid = patches.transpose(1, 2).reshape(B, C, gh, gw)
        pooled = (self.pool(grid) - grid).reshape(B, C, M).transpose(1, 2)
        return torch.cat([patches.mean(1, keepdim=True).expand_as(prefix) - prefix, pooled], dim=1)


class IdentityMixer(nn.Module):
    """No token mixing: the block adds its normalised input back (PoolFormer's identity baseline).

    A lower bound; with average pooling the head still sees every patch.
    """

    def __init__(self, dim: int, **_: object) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        return x


def bind(cls: type, **attrs: object) -> type:
    """A subclass of `cls` with class attributes set (timm needs a class, not a partial)."""
    return type(cls.__name__, (cls,), dict(attrs))

