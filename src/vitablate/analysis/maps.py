"""The attention of one query patch, per layer, for figures a reader looks at.

`query_attention` turns a model's per-block maps into one heat map per layer: the row of
the query patch, keys restricted to patch tokens and renormalised (as every map-level
metric here does), averaged over heads. `centre_query` says which patch is "the centre".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .metrics import drop_prefix


def centre_query(grid_size: tuple[int, int]) -> tuple[int, int]:
    """(row, col) of the patch at the image centre; on an even side, the one just below / right of it."""
    gh, gw = grid_size
    return gh // 2, gw // 2


def query_attention(maps: Sequence[Tensor], grid_size: tuple[int, int], num_prefix_tokens: int,
                    query: tuple[int, int] | None = None, image: int = 0) -> tuple[Tensor, Tensor]:
    """Heat maps of one query patch of one image, one per layer.

    maps: one (B, H, N, N) post-softmax map per layer, prefix tokens included (as
    `vitablate.models.attention_maps` returns them). Returns (attn, prefix_mass):
    attn (L, gh * gw), row-major over the patch grid, each row summing to 1 over patch keys
    (prefix keys dropped, each head's row renormalised, then the mean over heads); and
    prefix_mass (L,), the share of the query's attention (head mean) that went to the prefix
    tokens before renormalising, which the heat map does not show.
    """
    gh, gw = grid_size
    r, c = centre_query(grid_size) if query is None else query
    if not (0 <= r < gh and 0 <= c < gw):
        raise ValueError(f"query patch {(r, c)} is outside the {gh}x{gw} patch grid")
    q = r * gw + c
    rows, prefix = [], []
    for layer, m in enumerate(maps):
        if m.ndim != 4 or m.shape[-1] != gh * gw + num_prefix_tokens:
            raise ValueError(f"layer {layer}: map of shape {tuple(m.shape)} is not (B, H, N, N) with "
                             f"N = {gh}x{gw} patches + {num_prefix_tokens} prefix tokens")
        one = m[image : image + 1].float()  # (1, H, N, N)
        p = num_prefix_tokens
        prefix.append(one[0, :, p + q, :p].sum(-1).mean())
        rows.append(drop_prefix(one, p)[0, :, q].mean(0))  # (gh * gw,)
    return torch.stack(rows), torch.stack(prefix)
