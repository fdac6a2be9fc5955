"""Tests for vitablate.analysis: metric values on analytic maps, validation, and the
hook-based per-layer drivers against timm's own attention."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from vitablate.analysis import (  # noqa: E402
    attention_distance,
    drop_prefix,
    fourier_hf,
    layerwise_analysis,
    layerwise_features,
    nmi,
    token_cosine,
)
from vitablate.analysis.metrics import recompute_attention  # noqa: E402

GRID = 4
PATCH = 16
N = GRID * GRID


def _centres_np(grid, patch):
    """Patch centres in pixels, row-major, via plain loops (independent of the module)."""
    return [((r + 0.5) * patch, (c + 0.5) * patch) for r in range(grid) for c in range(grid)]


def _mean_pairwise_distance_np(grid, patch):
    pts = _centres_np(grid, patch)
    total = 0.0
    for (y1, x1), (y2, x2) in itertools.product(pts, pts):
        total += math.hypot(y1 - y2, x1 - x2)
    return total / len(pts) ** 2


def _uniform(b=2, h=3, n=N):
    return torch.full((b, h, n, n), 1.0 / n, dtype=torch.float64)


def _local_map(b=1, h=1):
    """Each query attends uniformly to itself and its 4-neighbours."""
    a = torch.zeros(N, N, dtype=torch.float64)
    for r in range(GRID):
        for c in range(GRID):
            q = r * GRID + c
            for dr, dc in [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]:
                rr, cc = r + dr, c + dc
                if 0 <= rr < GRID and 0 <= cc < GRID:
                    a[q, rr * GRID + cc] = 1.0
    a = a / a.sum(-1, keepdim=True)
    return a.expand(b, h, N, N).clone()


# --------------------------------------------------------------------------- #
# attention_distance / nmi
# --------------------------------------------------------------------------- #
def test_uniform_attention():
    attn = _uniform()
    expected = _mean_pairwise_distance_np(GRID, PATCH)
    d = attention_distance(attn, GRID, PATCH)
    assert d.shape == (3,)
    assert torch.allclose(d, torch.full((3,), expected, dtype=d.dtype), atol=1e-9)
    assert torch.allclose(nmi(attn), torch.zeros(3, dtype=torch.float64), atol=1e-6)


def test_uniform_attention_float32_and_tuple_grid():
    attn = _uniform().float()
    expected = _mean_pairwise_distance_np(GRID, PATCH)
    d = attention_distance(attn, (GRID, GRID), (PATCH, PATCH))
    assert torch.allclose(d, torch.full_like(d, expected), atol=1e-4)
    assert torch.allclose(nmi(attn), torch.zeros(3), atol=1e-6)


def test_identity_and_permutation():
    eye = torch.eye(N, dtype=torch.float64).expand(2, 2, N, N)
    assert torch.allclose(attention_distance(eye, GRID, PATCH), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(nmi(eye), torch.ones(2, dtype=torch.float64), atol=1e-6)

    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(N, generator=g)
    pmap = torch.eye(N, dtype=torch.float64)[perm].expand(2, 2, N, N)
    assert torch.allclose(nmi(pmap), torch.ones(2, dtype=torch.float64), atol=1e-6)
    # Distance of a permutation map = mean distance between q and perm(q).
    pts = _centres_np(GRID, PATCH)
    expected = np.mean([math.dist(pts[q], pts[int(perm[q])]) for q in range(N)])
    assert torch.allclose(attention_distance(pmap, GRID, PATCH),
                          torch.full((2,), float(expected), dtype=torch.float64))


def test_random_maps_in_range():
    g = torch.Generator().manual_seed(1)
    attn = torch.randn(3, 4, N, N, generator=g).mul(3).softmax(-1)
    d = attention_distance(attn, GRID, PATCH)
    m = nmi(attn)
    assert d.shape == (4,) and m.shape == (4,)
    pts = _centres_np(GRID, PATCH)
    max_d = max(math.dist(p, q) for p, q in itertools.product(pts, pts))
    assert bool((d >= 0).all()) and bool((d <= max_d).all())
    assert bool((m >= 0).all()) and bool((m <= 1).all())
    assert bool((m > 0).all())  # random logits are not uniform


def test_single_key_attention_nmi_zero():
    # Every query attends to key 0: H(k)=0, I=0 -> defined as 0, not NaN.
    attn = torch.zeros(1, 1, N, N)
    attn[..., 0] = 1.0
    assert torch.allclose(nmi(attn), torch.zeros(1))


def test_local_vs_global():
    local, glob = _local_map(), _uniform(b=1, h=1)
    assert attention_distance(local, GRID, PATCH) < attention_distance(glob, GRID, PATCH)
    assert nmi(local) > nmi(glob)


def test_rows_renormalised_by_metrics():
    # Scaling rows must not change either metric.
    g = torch.Generator().manual_seed(2)
    attn = torch.randn(2, 2, N, N, generator=g).softmax(-1).double()
    scaled = attn * torch.rand(2, 2, N, 1, generator=g).double().add(0.1)
    assert torch.allclose(attention_distance(attn, GRID, PATCH), attention_distance(scaled, GRID, PATCH))
    assert torch.allclose(nmi(attn), nmi(scaled))


def test_drop_prefix_renormalises():
    g = torch.Generator().manual_seed(3)
    full = torch.randn(2, 3, N + 1, N + 1, generator=g).softmax(-1)
    out = drop_prefix(full, 1)
    assert out.shape == (2, 3, N, N)
    assert torch.allclose(out.sum(-1), torch.ones(2, 3, N), atol=1e-6)
    expected = full[:, :, 1:, 1:] / full[:, :, 1:, 1:].sum(-1, keepdim=True)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(drop_prefix(full, 0), full, atol=1e-6)


# --------------------------------------------------------------------------- #
# token metrics
# --------------------------------------------------------------------------- #
def test_token_cosine():
    v = torch.randn(8)
    same = v.expand(2, 5, 8)
    assert torch.allclose(token_cosine(same), torch.tensor(1.0), atol=1e-6)
    ortho = torch.eye(6).expand(3, 6, 6)  # 6 orthonormal tokens per image
    assert torch.allclose(token_cosine(ortho), torch.tensor(0.0), atol=1e-6)
    # Matches an explicit pairwise computation on random tokens.
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    u = x / x.norm(dim=-1, keepdim=True)
    s = u @ u.transpose(1, 2)
    off = (s.sum((1, 2)) - s.diagonal(dim1=1, dim2=2).sum(-1)) / (7 * 6)
    assert torch.allclose(token_cosine(x), off.mean())


def test_fourier_hf_checkerboard_vs_smooth():
    r = torch.arange(GRID)[:, None]
    c = torch.arange(GRID)[None, :]
    checker = (1.0 + 0.5 * (-1.0) ** (r + c)).reshape(1, N, 1)  # Nyquist pattern
    smooth = (1.0 + 0.5 * torch.cos(2 * math.pi * r / GRID)).expand(GRID, GRID).reshape(1, N, 1)
    const = torch.ones(1, N, 1)
    chans = torch.randn(1, 1, 4).abs() + 0.5  # several channels, same spatial pattern
    hf_checker = fourier_hf(checker * chans, GRID)
    hf_smooth = fourier_hf(smooth * chans, GRID)
    hf_const = fourier_hf(const * chans, GRID)
    assert hf_checker.dim() == 0
    assert hf_checker > hf_smooth
    assert hf_checker > hf_const
    assert torch.isfinite(hf_const)
    assert hf_smooth < 0

    # Exact value in float64: on the 4x4 grid the outer ring is the 7 cells with
    # f_y = -2 or f_x = -2; only the (-2, -2) corner is non-zero (amplitude 0.5 * N
    # times the channel-mean scale), DC is N times that scale. The result must not
    # depend on eps (it did when the ring's logs were averaged).
    eps = 1e-8
    scale = chans.double().mean()
    got = fourier_hf(checker.double() * chans.double(), GRID, eps=eps)
    ring = torch.log(0.5 * N * scale / 7 + eps)  # log of the ring's MEAN amplitude: eps plays no part
    expected = ring - torch.log(N * scale + eps)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got, fourier_hf(checker.double() * chans.double(), GRID, eps=1e-12), atol=1e-6)


def test_fourier_hf_nonsquare_grid():
    tokens = torch.randn(2, 3 * 5, 4)
    out = fourier_hf(tokens, (3, 5))
    assert out.dim() == 0 and torch.isfinite(out)


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
def test_invalid_inputs():
    attn = _uniform(n=N + 1)
    with pytest.raises(ValueError, match="grid_size"):
        attention_distance(attn, GRID, PATCH)  # 17 tokens vs 4x4 grid (CLS not dropped)
    with pytest.raises(ValueError, match=r"\(B, H, N, N\)"):
        nmi(torch.full((2, N, N), 1.0 / N))
    with pytest.raises(ValueError, match=r"\(B, H, N, N\)"):
        attention_distance(torch.full((2, N, N), 1.0 / N), GRID, PATCH)
    with pytest.raises(ValueError, match="square"):
        nmi(torch.rand(1, 1, N, N + 1))
    with pytest.raises(ValueError, match="negative"):
        nmi(torch.randn(1, 1, N, N))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        drop_prefix(_uniform(), N)
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        token_cosine(torch.randn(N, 8))
    with pytest.raises(ValueError, match="grid_size"):
        fourier_hf(torch.randn(1, N + 1, 8), GRID)
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        fourier_hf(torch.randn(N, 8), GRID)
    with pytest.raises(ValueError, match="patch_size"):
        attention_distance(_uniform(), GRID, 0)


# --------------------------------------------------------------------------- #
# model drivers
# --------------------------------------------------------------------------- #
def _tiny_vit(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
               global_pool="avg", num_classes=3)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def test_layerwise_analysis_shapes_and_ranges():
    model = _tiny_vit()
    model.train()
    x = torch.randn(3, 3, 16, 16)
    res = layerwise_analysis(model, x)
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert [r["layer"] for r in res] == [0, 1]
    max_d = math.hypot(3 * 4, 3 * 4)  # 4x4 grid, 4 px patches
    for r in res:
        assert r["attention_distance"].shape == (2,)
        assert r["nmi"].shape == (2,)
        assert bool((r["attention_distance"] >= 0).all())
        assert bool((r["attention_distance"] <= max_d + 1e-5).all())
        assert bool((r["nmi"] >= 0).all()) and bool((r["nmi"] <= 1).all())
        assert isinstance(r["token_cosine"], float) and -1 <= r["token_cosine"] <= 1
        assert isinstance(r["fourier_hf"], float) and math.isfinite(r["fourier_hf"])


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}, {"reg_tokens": 2}])
def test_recomputed_attention_matches_timm(kw):
    model = _tiny_vit(**kw).eval()
    x = torch.randn(2, 3, 16, 16)
    captured, inputs = {}, {}
    handles = []
    for i, blk in enumerate(model.blocks):
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(
            lambda m, a, o, i=i: captured.__setitem__(i, o.detach().clone())))
        handles.append(blk.attn.register_forward_hook(
            lambda m, a, o, i=i: inputs.__setitem__(i, a[0].detach().clone())))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()

    res = layerwise_analysis(model, x)
    p = model.num_prefix_tokens
    for i, blk in enumerate(model.blocks):
        with torch.no_grad():
            mine = recompute_attention(blk.attn, inputs[i])
        assert torch.allclose(mine, captured[i], atol=1e-6)
        ref = drop_prefix(captured[i], p)
        assert torch.allclose(res[i]["attention_distance"], attention_distance(ref, 4, 4), atol=1e-5)
        assert torch.allclose(res[i]["nmi"], nmi(ref), atol=1e-6)


class _Mixer(nn.Module):
    """A token mixer without qkv (pooling-style)."""

    def forward(self, x, **kwargs):
        return x - x.mean(dim=1, keepdim=True)


def test_layerwise_analysis_non_attention_mixer():
    model = _tiny_vit().eval()
    model.blocks[1].attn = _Mixer()
    res = layerwise_analysis(model, torch.randn(2, 3, 16, 16))
    assert res[0]["nmi"] is not None
    assert res[1]["attention_distance"] is None and res[1]["nmi"] is None
    assert isinstance(res[1]["token_cosine"], float)


def test_layerwise_features():
    model = _tiny_vit().eval()
    x = torch.randn(3, 3, 16, 16)
    feats = layerwise_features(model, x)
    assert len(feats) == 2 and all(f.shape == (3, 32) for f in feats)
    # Last block's pooled patch tokens = forward_features before the final norm.
    outs = []
    h = model.blocks[-1].register_forward_hook(lambda m, a, o: outs.append(o))
    with torch.no_grad():
        model.forward_features(x)
    h.remove()
    assert torch.allclose(feats[-1], outs[0][:, 1:].mean(1), atol=1e-6)


def test_driver_invalid_inputs():
    model = _tiny_vit()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        layerwise_analysis(model, torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        layerwise_features(model, torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="grid_size"):
        layerwise_analysis(model, torch.randn(1, 3, 16, 16), grid_size=3)
