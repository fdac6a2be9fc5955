"""Representation and attention diagnostics for Vision Transformers.

All metrics are pure functions of tensors (attention maps or block-output tokens)
plus two drivers, :func:`layerwise_analysis` and :func:`layerwise_features`, that
run a timm ``VisionTransformer`` once (its public ``forward_intermediates``, the
attention maps read by ``vitablate.models.capturing``) and apply them to the
embedding output (layer 0) and every block's output (layer i = block i).

Conventions
-----------
* Attention maps are ``(B, H, N, N)`` post-softmax probabilities, rows = queries,
  columns = keys. The map-level metrics expect *patch tokens only* (use
  :func:`drop_prefix` to remove CLS/register tokens first) in row-major patch
  order, and renormalise every row to sum to 1 because dropping prefix columns
  leaves rows that sum to less than 1.
* Token tensors are ``(B, N, C)`` patch tokens of one block output.
* Everything is vectorised over images, heads and queries; no Python loops over
  them. Computation is done in at least float32 so half-precision model outputs
  do not lose the small probabilities that the entropy terms depend on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import capturing, embed

__all__ = [
    "attention_distance",
    "nmi",
    "drop_prefix",
    "token_cosine",
    "fourier_hf",
    "layerwise_analysis",
    "layerwise_features",
]

# Floor for row sums when renormalising: a row whose mass was entirely on dropped
# prefix tokens stays all-zero instead of becoming NaN.
_ROW_SUM_FLOOR = 1e-12


# --------------------------------------------------------------------------- #
# Input validation helpers
# --------------------------------------------------------------------------- #
def _as_pair(value: Any, name: str) -> tuple[int, int]:
    """Return ``value`` as a ``(rows, cols)`` pair of positive ints."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got bool {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(
            f"{name} must be an int or a (rows, cols) pair of ints, got {value!r}"
        )
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


def _as_float_pair(value: Any, name: str) -> tuple[float, float]:
    """Return ``value`` (patch size in pixels) as a ``(h, w)`` pair of positive floats."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number or a pair of numbers, got bool {value!r}")
    if isinstance(value, (int, float)):
        pair = (float(value), float(value))
    elif isinstance(value, Sequence) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        pair = (float(value[0]), float(value[1]))
    else:
        raise ValueError(
            f"{name} must be a number or an (h, w) pair of numbers, got {value!r}"
        )
    if not (pair[0] > 0 and pair[1] > 0):
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


def _compute_dtype(t: Tensor) -> torch.dtype:
    # At least float32: entropies of half-precision maps are too noisy.
    return torch.promote_types(t.dtype, torch.float32)


def _check_attn(attn: Tensor, name: str = "attn") -> Tensor:
    """Validate a (B, H, N, N) attention map and return it in the compute dtype."""
    if not isinstance(attn, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(attn).__name__}")
    if attn.dim() != 4:
        raise ValueError(
            f"{name} must have shape (B, H, N, N), got {tuple(attn.shape)}; "
            "add a batch dimension with attn.unsqueeze(0) for a single image"
        )
    if attn.shape[-1] != attn.shape[-2]:
        raise ValueError(
            f"{name} must be square over tokens (B, H, N, N), got {tuple(attn.shape)}; "
            "pass self-attention maps (queries and keys over the same tokens)"
        )
    if not attn.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {attn.dtype}")
    if attn.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(attn.shape)})")
    attn = attn.detach().to(_compute_dtype(attn))
    if bool((attn < 0).any()):
        raise ValueError(
            f"{name} has negative entries; pass post-softmax attention probabilities, "
            "not logits"
        )
    return attn


def _renormalise(attn: Tensor) -> Tensor:
    """Rescale rows (last dim) to sum to 1. (B, H, N, N) -> (B, H, N, N)."""
    return attn / attn.sum(dim=-1, keepdim=True).clamp_min(_ROW_SUM_FLOOR)


def _check_tokens(tokens: Tensor, name: str = "tokens") -> Tensor:
    if not isinstance(tokens, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 3:
        raise ValueError(
            f"{name} must have shape (B, N, C), got {tuple(tokens.shape)}; "
            "add a batch dimension with tokens.unsqueeze(0) for a single image"
        )
    if not tokens.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tokens.dtype}")
    if tokens.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tokens.shape)})")
    return tokens.detach().to(_compute_dtype(tokens))


def _check_grid(n_tokens: int, grid_size: Any, what: str) -> tuple[int, int]:
    gh, gw = _as_pair(grid_size, "grid_size")
    if gh * gw != n_tokens:
        raise ValueError(
            f"{what} has N={n_tokens} tokens but grid_size={grid_size!r} implies "
            f"{gh}x{gw}={gh * gw} patches; drop prefix (CLS/register) tokens first "
            "(drop_prefix for maps, tokens[:, num_prefix_tokens:] for tokens) or pass "
            "the grid the tokens were laid out on"
        )
    return gh, gw


# --------------------------------------------------------------------------- #
# Attention-map metrics
# --------------------------------------------------------------------------- #
def drop_prefix(attn: Tensor, num_prefix_tokens: int) -> Tensor:
    """Remove the first ``num_prefix_tokens`` queries and keys and renormalise rows.

    Args:
        attn: (B, H, N_total, N_total) post-softmax map including prefix tokens.
        num_prefix_tokens: number of leading non-patch tokens (CLS, registers).

    Returns:
        (B, H, N, N) map over patch tokens, N = N_total - num_prefix_tokens, each
        row summing to 1 (rows whose mass was all on prefix keys stay zero).
    """
    attn = _check_attn(attn)
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
        raise ValueError(
            f"num_prefix_tokens must be an int, got {type(num_prefix_tokens).__name__}"
        )
    n_total = attn.shape[-1]
    if not 0 <= num_prefix_tokens < n_total:
        raise ValueError(
            f"num_prefix_tokens={num_prefix_tokens} must be in [0, {n_total - 1}] for a "
            f"map over {n_total} tokens; use the model's num_prefix_tokens"
        )
    p = num_prefix_tokens
    return _renormalise(attn[:, :, p:, p:])  # (B, H, N, N)


def _patch_centre_distances(
    grid: tuple[int, int], patch: tuple[float, float], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Euclidean distance in pixels between all patch centres, (N, N), row-major order."""
    gh, gw = grid
    rows = torch.arange(gh, device=device, dtype=dtype) * patch[0]  # (gh,) pixels
    cols = torch.arange(gw, device=device, dtype=dtype) * patch[1]  # (gw,) pixels
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")  # (gh, gw) each
    centres = torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=-1)  # (N, 2)
    # The +patch/2 centre offset cancels in differences, so grid corners suffice.
    diff = centres[:, None, :] - centres[None, :, :]  # (N, N, 2)
    return diff.pow(2).sum(-1).sqrt()  # (N, N)


def attention_distance(attn: Tensor, grid_size: Any, patch_size: Any) -> Tensor:
    """Mean attention distance in pixels, one value per head.

    For query q: ``sum_k A_qk * ||p_q - p_k||`` with p the patch centres in pixels;
    averaged over queries and images.

    Args:
        attn: (B, H, N, N) post-softmax map over patch tokens only (row-major).
        grid_size: patches per side, int or (gh, gw) with gh * gw == N.
        patch_size: patch size in pixels, number or (ph, pw).

    Returns:
        (H,) tensor of mean distances in pixels.
    """
    attn = _renormalise(_check_attn(attn))  # (B, H, N, N)
    grid = _check_grid(attn.shape[-1], grid_size, "attn")
    patch = _as_float_pair(patch_size, "patch_size")
    dist = _patch_centre_distances(grid, patch, attn.device, attn.dtype)  # (N, N) px
    per_query = (attn * dist).sum(dim=-1)  # (B, H, N) expected px distance
    return per_query.mean(dim=(0, 2))  # (H,)


def nmi(attn: Tensor) -> Tensor:
    """Normalised mutual information between query position and attended key.

    With p(q) = 1/N, p(k|q) = A_qk and p(k) = mean_q A_qk (natural log):
    ``NMI = I(q; k) / sqrt(H(q) * H(k))``, computed per image and head, then
    averaged over images. Uniform attention gives 0, any permutation map gives 1.
    If H(k) = 0 (all queries attend to one key) or N = 1, I = 0 and NMI is 0.

    Args:
        attn: (B, H, N, N) post-softmax map over patch tokens; rows renormalised.

    Returns:
        (H,) tensor in [0, 1].
    """
    attn = _renormalise(_check_attn(attn))  # (B, H, N, N) = p(k|q)
    n = attn.shape[-1]
    p_k = attn.mean(dim=-2)  # (B, H, N) key marginal
    # I = sum_q p(q) sum_k A_qk log(A_qk / p(k)); xlogy gives 0*log0 = 0, and
    # p(k) > 0 wherever A_qk > 0, so the second term is finite too.
    cond = torch.xlogy(attn, attn) - torch.xlogy(attn, p_k[:, :, None, :])  # (B, H, N, N)
    mutual = cond.sum(dim=(-2, -1)) / n  # (B, H) nats
    h_k = -torch.xlogy(p_k, p_k).sum(dim=-1)  # (B, H) nats
    h_q = math.log(n)  # uniform query marginal, nats
    denom = (h_k * h_q).sqrt()  # (B, H)
    safe = denom > 0
    score = torch.where(safe, mutual / denom.clamp_min(torch.finfo(denom.dtype).tiny),
                        torch.zeros_like(mutual))  # (B, H)
    # I <= min(H(q), H(k)) <= sqrt(H(q) H(k)) analytically; clamp only float noise.
    return score.clamp(0.0, 1.0).mean(dim=0)  # (H,)


# --------------------------------------------------------------------------- #
# Token metrics
# --------------------------------------------------------------------------- #
def token_cosine(tokens: Tensor) -> Tensor:
    """Mean pairwise cosine similarity between distinct patch tokens.

    Args:
        tokens: (B, N, C) patch tokens of one block output, N >= 2.

    Returns:
        Scalar tensor: mean over images of the mean over ordered pairs i != j of
        cos(t_i, t_j). All-zero tokens count as cosine 0 with everything.
    """
    tokens = _check_tokens(tokens)
    n = tokens.shape[1]
    if n < 2:
        raise ValueError(
            f"token_cosine needs at least 2 tokens per image, got N={n}; pass patch "
            "tokens, not a pooled feature"
        )
    unit = F.normalize(tokens, dim=-1)  # (B, N, C), zero rows stay zero
    # sum_{i != j} u_i . u_j = ||sum_i u_i||^2 - sum_i ||u_i||^2: O(N C), no N x N matrix.
    total = unit.sum(dim=1).pow(2).sum(dim=-1)  # (B,)
    diag = unit.pow(2).sum(dim=(1, 2))  # (B,) = number of nonzero tokens
    per_image = (total - diag) / (n * (n - 1))  # (B,)
    return per_image.mean()


def fourier_hf(tokens: Tensor, grid_size: Any, eps: float = 1e-6) -> Tensor:
    """Relative log amplitude of the highest frequency ("delta log amplitude").

    The quantity of cl-vs-mim's Fourier analysis (naver-ai/cl-vs-mim:
    representation_analysis.ipynb, ``get_fourier_latents``): tokens are laid out
    as a (B, C, gh, gw) feature map; per image and channel the 2-D FFT amplitude
    is taken to ``log(|FFT2| + eps)`` and frequency-shifted (zero frequency at
    (gh // 2, gw // 2)); the log amplitudes are averaged over images and channels
    (the mean of logs); the result is the value at the highest frequency along the
    half-diagonal, the shifted cell (gh - 1, gw - 1), minus the value at zero
    frequency. Higher (less negative) means more high-frequency content. On a
    square grid this is exactly the notebook's ``latent.diag()[h // 2:]`` last
    entry minus its first; on a non-square grid the same corner cell is used.

    Args:
        tokens: (B, N, C) patch tokens (prefix tokens dropped), N = gh * gw in
            row-major order.
        grid_size: int or (gh, gw), each side >= 2.
        eps: added to every amplitude inside the log (the notebook uses 1e-6).

    Returns:
        Scalar tensor (natural-log units).
    """
    tokens = _check_tokens(tokens)
    gh, gw = _check_grid(tokens.shape[1], grid_size, "tokens")
    if gh < 2 or gw < 2:
        raise ValueError(
            f"fourier_hf needs at least 2 patches per side to have a non-zero "
            f"frequency, got grid {gh}x{gw}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be positive to keep log finite, got {eps}")
    b, n, c = tokens.shape
    fmap = tokens.transpose(1, 2).reshape(b, c, gh, gw)  # (B, C, gh, gw)
    log_amp = torch.log(torch.fft.fft2(fmap).abs() + eps)  # (B, C, gh, gw), per image and channel
    # fftshift rolls by (gh // 2, gw // 2), as the notebook's torch.roll(int(h / 2)) does
    mean_log = torch.fft.fftshift(log_amp, dim=(-2, -1)).mean(dim=(0, 1))  # (gh, gw) mean of logs
    return mean_log[gh - 1, gw - 1] - mean_log[gh // 2, gw // 2]


# --------------------------------------------------------------------------- #
# Model drivers
# --------------------------------------------------------------------------- #
def _model_geometry(
    model: nn.Module, x: Tensor, num_prefix_tokens: int | None, patch_size: Any, grid_size: Any
) -> tuple[int, tuple[float, float], tuple[int, int]]:
    """Resolve prefix count, patch size (px) and patch grid from arguments or the model."""
    pe = getattr(model, "patch_embed", None)
    if num_prefix_tokens is None:
        if not hasattr(model, "num_prefix_tokens"):
            raise ValueError(
                "model has no num_prefix_tokens attribute; pass num_prefix_tokens="
            )
        num_prefix_tokens = int(model.num_prefix_tokens)
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) \
            or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
    if patch_size is None:
        if pe is None or not hasattr(pe, "patch_size"):
            raise ValueError("model has no patch_embed.patch_size; pass patch_size=")
        patch_size = tuple(pe.patch_size)
    patch = _as_float_pair(patch_size, "patch_size")
    if grid_size is None:
        if pe is None or getattr(pe, "grid_size", None) is None:
            raise ValueError("model has no patch_embed.grid_size; pass grid_size=")
        grid_size = tuple(pe.grid_size)
        # Models built with dynamic_img_size tokenise whatever resolution they get.
        if getattr(pe, "dynamic_img_size", False):
            if hasattr(pe, "dynamic_feat_size"):
                grid_size = tuple(pe.dynamic_feat_size(tuple(x.shape[-2:])))
            else:
                grid_size = (x.shape[-2] // int(patch[0]), x.shape[-1] // int(patch[1]))
    grid = _as_pair(grid_size, "grid_size")
    return num_prefix_tokens, patch, grid


def _check_model_input(model: nn.Module, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"x must be an image batch (B, C, H, W), got {shape}; use x.unsqueeze(0) "
            "for a single image"
        )
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(
            f"{type(model).__name__} has no non-empty 'blocks'; pass a timm-style "
            "VisionTransformer"
        )
    param = next(model.parameters(), None)
    return x if param is None else x.to(param.device)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the block; restores every submodule's own training flag (not
    just the root's) afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in modes:
            m.training = flag


def _depth_outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    """(B, N_total, C) tokens at every depth, prefix tokens included: index 0 the embedding output
    (the first block's input, `vitablate.models.embed`), index i block i's output (timm's public
    `forward_intermediates`, unnormalised)."""
    blocks = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
    if model.num_prefix_tokens:  # (patch tokens, prefix tokens) per block
        blocks = [torch.cat([prefix, patches], dim=1) for patches, prefix in blocks]
    return [embed(model, x), *blocks]


def layerwise_analysis(
    model: nn.Module,
    x: Tensor,
    num_prefix_tokens: int | None = None,
    patch_size: Any = None,
    grid_size: Any = None,
) -> list[dict[str, Any]]:
    """Per-block attention and representation diagnostics from one forward pass.

    Args:
        model: timm-style ViT with ``blocks``, ``patch_embed`` and ``num_prefix_tokens``.
        x: (B, C, H, W) image batch (moved to the model's device).
        num_prefix_tokens: leading non-patch tokens; default ``model.num_prefix_tokens``.
        patch_size: pixels per patch; default ``model.patch_embed.patch_size``.
        grid_size: patch grid; default ``model.patch_embed.grid_size``.

    Returns:
        One dict per depth, in order: layer 0 is the embedding output (the input
        of the first block: patch embedding plus position embedding), layer i the
        output of block i (1-based), as cl-vs-mim's representation notebook counts
        depth. Each is ``{"layer": i, <metric>: value}`` for every metric registered
        in ``vitablate.analysis.registry.METRICS`` with input "attention" or "tokens"
        (by default ``"attention_distance": (H,) tensor (px) or None, "nmi": (H,)
        tensor or None, "token_cosine": float, "fourier_hf": float``); the attention
        metrics of layer i describe block i's attention. Tensors are float32/64 on
        the CPU. Attention metrics are None for layer 0 and for blocks whose token
        mixer is not timm's ``Attention`` (or vitablate's ``MixingAttention``); the
        forward is the model's own, bit for bit (``capturing`` with ``observe``).
    """
    from .registry import METRICS, computed_metrics

    x = _check_model_input(model, x)
    n_prefix, patch, grid = _model_geometry(model, x, num_prefix_tokens, patch_size, grid_size)
    geometry = {"grid_size": grid, "patch_size": patch}
    attn_metrics, token_metric_names = computed_metrics("attention"), computed_metrics("tokens")
    results: list[dict[str, Any]] = [
        {"layer": i, **{name: None for name in (*attn_metrics, *token_metric_names)}}
        for i in range(len(model.blocks) + 1)
    ]

    def compute(name: str, x: Tensor) -> Any:
        entry = METRICS.entry(name)
        value = entry.obj(x, **{k: geometry[k] for k in entry.meta.get("needs", ())})
        return value.detach().cpu() if entry.meta.get("per_head") else float(value)

    def consume_map(i: int):
        def fn(module: nn.Module, args: tuple, output: Any) -> None:
            full = module.last_map  # (B, H, N_total, N_total), captured by `capturing`
            module.last_map = module.last_logits = module.last_q = module.last_k = None  # one layer at a time
            patch_attn = drop_prefix(full, n_prefix)  # (B, H, N, N)
            for name in attn_metrics:
                results[i][name] = compute(name, patch_attn)
        return fn

    handles = []
    with _evaluating(model), capturing(model, observe=True, strict=False) as mods:
        try:  # each block's map is read as soon as the block has run: one map in memory at a time
            handles = [m.register_forward_hook(consume_map(i)) for i, m in enumerate(mods, start=1) if m is not None]
            outs = _depth_outputs(model, x)
        finally:
            for h in handles:
                h.remove()
    for i, out in enumerate(outs):
        patches = out[:, n_prefix:]  # (B, N, C), CLS/registers dropped
        for name in token_metric_names:
            results[i][name] = compute(name, patches)
    return results


def layerwise_features(
    model: nn.Module, x: Tensor, num_prefix_tokens: int | None = None
) -> list[Tensor]:
    """Mean-pooled patch tokens at every block output, for per-layer linear probes.

    Args:
        model: timm-style ViT with ``blocks`` and ``num_prefix_tokens``.
        x: (B, C, H, W) image batch (moved to the model's device).
        num_prefix_tokens: leading non-patch tokens; default ``model.num_prefix_tokens``.

    Returns:
        List of detached (B, C) tensors on the model's device, one per depth as in
        :func:`layerwise_analysis`: index 0 the embedding output, index i block i.
    """
    x = _check_model_input(model, x)
    if num_prefix_tokens is None:
        num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) \
            or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
    with _evaluating(model):
        outs = _depth_outputs(model, x)
    feats = []
    for out in outs:
        patches = out[:, num_prefix_tokens:]  # (B, N, C)
        if patches.shape[1] == 0:
            raise ValueError(
                f"num_prefix_tokens={num_prefix_tokens} leaves no patch tokens "
                f"(block output has {out.shape[1]} tokens)"
            )
        feats.append(patches.mean(dim=1).detach())  # (B, C)
    return feats
