"""Tests for vitablate.analysis: metric values on analytic maps, validation, and the
hook-based per-layer drivers against timm's own attention."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.layers import Attention  # noqa: E402
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
from vitablate.models import create_model  # noqa: E402

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


def _notebook_delta_log_amplitude(tokens, grid, eps=1e-6):
    """cl-vs-mim's representation notebook (get_fourier_latents), written again in
    numpy: per image and channel log(|FFT2| + eps), rolled by (h // 2, w // 2), mean
    over images and channels, half-diagonal from zero frequency, last minus first."""
    x = np.asarray(tokens, dtype=np.float64)
    b, n, c = x.shape
    fmap = x.transpose(0, 2, 1).reshape(b, c, grid, grid)
    log_amp = np.log(np.abs(np.fft.fft2(fmap, axes=(2, 3))) + eps)
    shifted = np.roll(log_amp, shift=(grid // 2, grid // 2), axis=(2, 3)).mean(axis=(0, 1))
    half_diag = np.diag(shifted)[grid // 2:]
    return float(half_diag[-1] - half_diag[0])


def _diagonal_wave(grid, dc, amp):
    """(grid*grid,) map dc + amp * cos(2 pi f (r + c) / grid) at the highest frequency f
    the shifted half-diagonal reaches: |FFT| is dc*N at zero frequency and amp*N/2 at
    (f, f) and (-f, -f), zero elsewhere."""
    f = (grid - 1) - grid // 2
    r = torch.arange(grid, dtype=torch.float64)[:, None]
    c = torch.arange(grid, dtype=torch.float64)[None, :]
    return (dc + amp * torch.cos(2 * math.pi * f * (r + c) / grid)).reshape(-1)


@pytest.mark.parametrize("grid", [4, 5, 14])
def test_fourier_hf_known_spectrum(grid):
    # Every channel: DC amplitude N, top half-diagonal amplitude N/4 (scaled per channel);
    # the mean of logs is -log 4 whatever the channel scales.
    n = grid * grid
    wave = _diagonal_wave(grid, 1.0, 0.5)  # (N,)
    scales = torch.tensor([0.5, 1.0, 3.0, 20.0], dtype=torch.float64)
    tokens = (wave[:, None] * scales[None, :]).expand(2, n, 4).clone()  # (B, N, C)
    got = fourier_hf(tokens, grid)
    assert got.dim() == 0
    assert abs(float(got) - (-math.log(4.0))) < 1e-5
    assert abs(float(got) - _notebook_delta_log_amplitude(tokens, grid)) < 1e-9


def test_fourier_hf_large_offset_channels():
    # 14 channels carry a strong diagonal wave on a small mean; 2 "massive activation"
    # channels carry a huge constant and a faint wave. Per channel the log ratio is
    # log(50) and log(5e-7): the mean of logs is positive, while the log of the
    # channel-averaged amplitude (what vitablate used to report) is negative.
    grid = 4
    n = grid * grid
    normal = _diagonal_wave(grid, 0.01, 1.0)
    massive = _diagonal_wave(grid, 1000.0, 0.001)
    chans = [normal] * 14 + [massive] * 2
    tokens = torch.stack(chans, dim=-1)[None].expand(3, n, 16).clone()  # (B, N, C)
    got = float(fourier_hf(tokens, grid))
    expected = (14 * math.log(50.0) + 2 * math.log(5e-7)) / 16
    assert abs(got - expected) < 1e-3
    assert got > 0
    assert abs(got - _notebook_delta_log_amplitude(tokens, grid)) < 1e-9
    # the previous definition disagrees in sign on exactly these tokens
    amp = torch.fft.fftshift(torch.fft.fft2(tokens.transpose(1, 2).reshape(3, 16, grid, grid)).abs().mean(1),
                             dim=(-2, -1))
    assert float(torch.log(amp[0, grid - 1, grid - 1]) - torch.log(amp[0, grid // 2, grid // 2])) < 0


def test_fourier_hf_random_tokens_match_notebook():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(5, 49, 12, generator=gen, dtype=torch.float64)
    tokens[..., :2] += 30.0  # a few large-offset channels
    assert abs(float(fourier_hf(tokens, 7)) - _notebook_delta_log_amplitude(tokens, 7)) < 1e-9
    # float32 tokens are computed in float32 and agree to float32 precision
    assert abs(float(fourier_hf(tokens.float(), 7)) - _notebook_delta_log_amplitude(tokens, 7)) < 1e-4


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
    assert [r["layer"] for r in res] == [0, 1, 2]  # embedding, block 1, block 2
    assert res[0]["attention_distance"] is None and res[0]["nmi"] is None
    max_d = math.hypot(3 * 4, 3 * 4)  # 4x4 grid, 4 px patches
    for r in res[1:]:
        assert r["attention_distance"].shape == (2,)
        assert r["nmi"].shape == (2,)
        assert bool((r["attention_distance"] >= 0).all())
        assert bool((r["attention_distance"] <= max_d + 1e-5).all())
        assert bool((r["nmi"] >= 0).all()) and bool((r["nmi"] <= 1).all())
        assert isinstance(r["token_cosine"], float) and -1 <= r["token_cosine"] <= 1
        assert isinstance(r["fourier_hf"], float) and math.isfinite(r["fourier_hf"])


def recompute_attention(attn_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's `Attention` map for input x (B, N, C), written out: the independent reference."""
    b, n, _ = x.shape
    heads, head_dim = attn_module.num_heads, attn_module.head_dim
    qkv = attn_module.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn_module.q_norm(qkv[0]), attn_module.k_norm(qkv[1])
    return ((q * attn_module.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


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
    assert all(type(blk.attn) is Attention and "capture" not in vars(blk.attn) for blk in model.blocks)  # restored
    p = model.num_prefix_tokens
    for i, blk in enumerate(model.blocks):
        with torch.no_grad():
            mine = recompute_attention(blk.attn, inputs[i])
        assert torch.allclose(mine, captured[i], atol=1e-6)
        ref = drop_prefix(captured[i], p)
        assert torch.allclose(res[i + 1]["attention_distance"], attention_distance(ref, 4, 4), atol=1e-5)
        assert torch.allclose(res[i + 1]["nmi"], nmi(ref), atol=1e-6)


def test_layerwise_analysis_leaves_the_forward_bit_identical():
    """Capturing maps (observe) must not change what the blocks compute: the token metrics equal,
    bit for bit, those of the block outputs of timm's own forward_features (no capture), for a
    vitablate model and for plain timm with the same weights; so do the layer-wise features."""
    torch.manual_seed(0)
    ours = create_model(mixer="attention", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                        num_classes=3).eval()
    timm_vit = _tiny_vit().eval()
    timm_vit.load_state_dict(ours.state_dict())
    x = torch.randn(3, 3, 16, 16)
    outs = []
    hooks = [blk.register_forward_hook(lambda m, a, o: outs.append(o)) for blk in timm_vit.blocks]
    with torch.no_grad():
        timm_vit.forward_features(x)
    for h in hooks:
        h.remove()
    for model in (ours, timm_vit):
        res = layerwise_analysis(model, x)
        for r, o in zip(res[1:], outs):
            assert r["token_cosine"] == float(token_cosine(o[:, 1:]))
            assert r["fourier_hf"] == float(fourier_hf(o[:, 1:], 4))
        feats = layerwise_features(model, x)
        assert all(torch.equal(f, o[:, 1:].mean(1)) for f, o in zip(feats[1:], outs))


def test_layerwise_analysis_layer0_is_the_embedding():
    model = _tiny_vit(reg_tokens=1).eval()
    x = torch.randn(3, 3, 16, 16)
    res = layerwise_analysis(model, x)
    with torch.no_grad():  # the embedding output, computed by hand from timm's modules
        emb = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    outs = []  # the last block's output (before the final norm)
    h = model.blocks[-1].register_forward_hook(lambda m, a, o: outs.append(o))
    with torch.no_grad():
        model.forward_features(x)
    h.remove()
    p = model.num_prefix_tokens
    assert res[0]["fourier_hf"] == pytest.approx(_notebook_delta_log_amplitude(emb[:, p:].numpy(), 4), abs=1e-4)
    assert res[-1]["fourier_hf"] == pytest.approx(_notebook_delta_log_amplitude(outs[0][:, p:].numpy(), 4),
                                                  abs=1e-4)
    assert res[0]["token_cosine"] == pytest.approx(float(token_cosine(emb[:, p:])), abs=1e-6)


class _Mixer(nn.Module):
    """A token mixer without qkv (pooling-style)."""

    def forward(self, x, **kwargs):
        return x - x.mean(dim=1, keepdim=True)


def test_layerwise_analysis_non_attention_mixer():
    model = _tiny_vit().eval()
    model.blocks[1].attn = _Mixer()
    res = layerwise_analysis(model, torch.randn(2, 3, 16, 16))
    assert res[1]["nmi"] is not None  # block 1 attends
    assert res[2]["attention_distance"] is None and res[2]["nmi"] is None
    assert isinstance(res[2]["token_cosine"], float)


def test_layerwise_features():
    model = _tiny_vit().eval()
    x = torch.randn(3, 3, 16, 16)
    feats = layerwise_features(model, x)
    assert len(feats) == 3 and all(f.shape == (3, 32) for f in feats)  # embedding + 2 blocks
    with torch.no_grad():
        emb = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    assert torch.allclose(feats[0], emb[:, 1:].mean(1), atol=1e-6)
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
