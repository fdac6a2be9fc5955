"""Batched augmentation on the batch's own device, with per-image random parameters.

No per-image Python loop: each transform draws one parameter vector for the whole
batch and applies it with tensor ops (crops through one `affine_grid`/`grid_sample`),
so two-view self-supervised training runs at GPU speed when the data is on the GPU.
All randomness comes from the optional `generator`, so a seeded generator repeats it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """(x - mean) / std per channel; x (B, C, H, W), mean/std one value per channel."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    if x.ndim != 4 or mean.shape[1] != x.shape[1] or std.shape[1] != x.shape[1]:
        # Without this, 1-channel stats would silently broadcast over RGB images.
        raise ValueError(f"normalize got {mean.shape[1]} means and {std.shape[1]} stds for x of shape "
                         f"{tuple(x.shape)}; pass one value per channel of a (B, C, H, W) batch "
                         "(e.g. bundle.mean, bundle.std)")
    return (x - mean) / std


def _rand(n: int, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """(n,) uniform [0, 1) on x's device from `generator` (which must live on that device)."""
    return torch.rand(n, device=x.device, generator=generator)


def _gray(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 1, H, W) luminance (ITU-R 601 weights for RGB)."""
    if x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), a, b)


def _jitter_strengths(color_jitter: float | Sequence[float]) -> tuple[float, float, float, float]:
    """A strength s -> (s, s, s, 0); or (brightness, contrast, saturation, hue) as given."""
    if isinstance(color_jitter, (int, float)) and not isinstance(color_jitter, bool):
        vals = (float(color_jitter),) * 3 + (0.0,)
    elif isinstance(color_jitter, Sequence) and len(color_jitter) == 4:
        vals = tuple(float(v) for v in color_jitter)
    else:
        raise ValueError(f"color_jitter is a strength or [brightness, contrast, saturation, hue], got {color_jitter!r}")
    if min(vals) < 0 or vals[3] > 0.5:
        raise ValueError(f"color_jitter strengths must be >= 0 and hue <= 0.5, got {color_jitter!r}")
    return vals  # type: ignore[return-value]


def _rgb_to_hsv(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV, each in [0, 1] (hue as a fraction of the circle)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hr = (g - b) / safe
    hg = 2.0 + (b - r) / safe
    hb = 4.0 + (r - g) / safe
    h = torch.where(maxc == r, hr, torch.where(maxc == g, hg, hb))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of `_rgb_to_hsv`: (B, 3, H, W) HSV in [0, 1] -> RGB in [0, 1]."""
    h, s, v = x.unbind(1)
    k = torch.stack([(5.0 + h * 6.0) % 6.0, (3.0 + h * 6.0) % 6.0, (1.0 + h * 6.0) % 6.0], 1)  # (B, 3, H, W)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


class BatchAugment(nn.Module):
    """Config-driven batched augmentation for supervised and two-view SSL training.

    crop_scale: random-resized-crop area range (None disables); aspect log-uniform in (3/4, 4/3).
    pad_crop: random translation by up to this many pixels (reflect padding); cheap supervised aug.
    flip: horizontal flip with p=0.5. color_jitter: torchvision's ColorJitter per image, a strength
    s (brightness, contrast and saturation factors in [1-s, 1+s], no hue) or [brightness,
    contrast, saturation, hue] (hue shift in [-hue, hue] of the colour circle); the four run in a
    random order per image, as torchvision's; saturation and hue are skipped for 1 channel.
    color_jitter_p: probability that an image is jittered at all (MoCo v3's RandomApply p = 0.8).
    grayscale_p, blur_p, solarize_p: per-image probabilities. Output stays in [0, 1] with the
    input's shape.
    """

    def __init__(self, crop_scale: Optional[tuple[float, float]] = (0.2, 1.0), flip: bool = True,
                 color_jitter: float | Sequence[float] = 0.4, grayscale_p: float = 0.2, blur_p: float = 0.0,
                 solarize_p: float = 0.0, pad_crop: int = 0, color_jitter_p: float = 1.0) -> None:
        super().__init__()
        if crop_scale is not None and not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        for name, p in (("grayscale_p", grayscale_p), ("blur_p", blur_p), ("solarize_p", solarize_p),
                        ("color_jitter_p", color_jitter_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {p}")
        if pad_crop < 0:
            raise ValueError("pad_crop must be >= 0")
        self.crop_scale, self.flip = crop_scale, flip
        self.jitter = _jitter_strengths(color_jitter)
        self.color_jitter_p = color_jitter_p
        self.grayscale_p, self.blur_p, self.solarize_p, self.pad_crop = grayscale_p, blur_p, solarize_p, pad_crop

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """x: (B, C, H, W) in [0, 1] -> augmented, same shape."""
        if self.crop_scale is not None or self.pad_crop or self.flip:
            x = self._geometry(x, generator)
        if any(self.jitter) and self.color_jitter_p > 0:
            jittered = self._jitter(x, generator)
            x = jittered if self.color_jitter_p >= 1 else _where(
                _rand(len(x), x, generator) < self.color_jitter_p, jittered, x)
        if self.grayscale_p > 0:
            x = _where(_rand(len(x), x, generator) < self.grayscale_p, _gray(x).expand_as(x), x)
        if self.blur_p > 0:
            x = _where(_rand(len(x), x, generator) < self.blur_p, self._blur(x, generator), x)
        if self.solarize_p > 0:
            x = _where(_rand(len(x), x, generator) < self.solarize_p, torch.where(x >= 0.5, 1 - x, x), x)
        return x.clamp(0, 1)

    def _geometry(self, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """Crop, translate and flip in one affine resampling: theta maps output to input coords."""
        B, _, H, W = x.shape
        sx = torch.ones(B, device=x.device)
        sy = torch.ones(B, device=x.device)
        tx = torch.zeros(B, device=x.device)
        ty = torch.zeros(B, device=x.device)
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            area = lo + (hi - lo) * _rand(B, x, generator)
            log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * _rand(B, x, generator)
            ratio = log_r.exp()
            sx = (area * ratio).sqrt().clamp(max=1.0)  # crop width / image width
            sy = (area / ratio).sqrt().clamp(max=1.0)
            tx = (1 - sx) * (2 * _rand(B, x, generator) - 1)  # centre stays inside the image
            ty = (1 - sy) * (2 * _rand(B, x, generator) - 1)
        if self.pad_crop:
            k = self.pad_crop
            shift_x = torch.floor(_rand(B, x, generator) * (2 * k + 1)) - k  # integer pixels in [-k, k]
            shift_y = torch.floor(_rand(B, x, generator) * (2 * k + 1)) - k
            tx = tx + 2 * shift_x / W
            ty = ty + 2 * shift_y / H
        if self.flip:
            sx = torch.where(_rand(B, x, generator) < 0.5, -sx, sx)
        theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 2] = sx, tx
        theta[:, 1, 1], theta[:, 1, 2] = sy, ty
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        mode = "nearest" if self.crop_scale is None else "bilinear"  # pure shifts/flips stay exact
        return F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False)

    def _jitter(self, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """torchvision ColorJitter per image: factors drawn once, the four ops in a random order."""
        B = len(x)
        b, c, s, h = self.jitter

        def factor(strength: float) -> Tensor:  # uniform in [max(0, 1 - s), 1 + s]
            lo = max(0.0, 1.0 - strength)
            return (lo + (1.0 + strength - lo) * _rand(B, x, generator)).view(B, 1, 1, 1)

        f_b, f_c, f_s = factor(b), factor(c), factor(s)
        f_h = (h * (2 * _rand(B, x, generator) - 1)).view(B, 1, 1)
        rgb = x.shape[1] == 3

        def brightness(t: Tensor) -> Tensor:
            return (t * f_b).clamp(0, 1)

        def contrast(t: Tensor) -> Tensor:
            mean = _gray(t).mean((1, 2, 3), keepdim=True)
            return ((t - mean) * f_c + mean).clamp(0, 1)

        def saturation(t: Tensor) -> Tensor:
            if t.shape[1] == 1:
                return t
            g = _gray(t)
            return ((t - g) * f_s + g).clamp(0, 1)

        def hue(t: Tensor) -> Tensor:
            if not rgb:
                return t
            hsv = _rgb_to_hsv(t)
            hsv = torch.stack([(hsv[:, 0] + f_h) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
            return _hsv_to_rgb(hsv).clamp(0, 1)

        ops = [op for op, strength in ((brightness, b), (contrast, c), (saturation, s), (hue, h)) if strength > 0]
        # per-image random order (torchvision draws randperm(4) per call, i.e. per image)
        order = torch.rand(B, len(ops), device=x.device, generator=generator).argsort(dim=1)  # (B, n_ops)
        for step in range(len(ops)):
            out = x
            for i, op in enumerate(ops):
                out = _where(order[:, step] == i, op(x), out)
            x = out
        return x

    def _blur(self, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """Gaussian blur with a per-image sigma in [0.1, 2] px (separable, grouped conv over B*C)."""
        B, C, H, W = x.shape
        radius = max(1, min(H, W) // 8)
        sigma = (0.1 + 1.9 * _rand(B, x, generator)).view(B, 1)
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype).view(1, -1)
        k = torch.exp(-offsets**2 / (2 * sigma**2))
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, K)
        y = x.reshape(1, B * C, H, W)
        y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(B * C, 1, 1, -1), groups=B * C)
        y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(B * C, 1, -1, 1), groups=B * C)
        return y.view(B, C, H, W)


def two_views(aug1: nn.Module, aug2: nn.Module, x: Tensor, generator: Optional[torch.Generator] = None
              ) -> tuple[Tensor, Tensor]:
    """Two independently augmented views of the same batch (contrastive learning)."""
    return aug1(x, generator=generator), aug2(x, generator=generator)
