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


class BatchAugment(nn.Module):
    """Config-driven batched augmentation for supervised and two-view SSL training.

    crop_scale: random-resized-crop area range (None disables); aspect log-uniform in (3/4, 4/3).
    pad_crop: random translation by up to this many pixels (reflect padding); cheap supervised aug.
    flip: horizontal flip with p=0.5. color_jitter: strength s of brightness/contrast/saturation
    factors in [1-s, 1+s] (saturation skipped for 1 channel). grayscale_p, blur_p, solarize_p:
    per-image probabilities. Output stays in [0, 1] with the input's shape.
    """

    def __init__(self, crop_scale: Optional[tuple[float, float]] = (0.2, 1.0), flip: bool = True,
                 color_jitter: float = 0.4, grayscale_p: float = 0.2, blur_p: float = 0.0, solarize_p: float = 0.0,
                 pad_crop: int = 0) -> None:
        super().__init__()
        if crop_scale is not None and not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        for name, p in (("grayscale_p", grayscale_p), ("blur_p", blur_p), ("solarize_p", solarize_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {p}")
        if pad_crop < 0 or color_jitter < 0:
            raise ValueError("pad_crop and color_jitter must be >= 0")
        self.crop_scale, self.flip, self.color_jitter = crop_scale, flip, color_jitter
        self.grayscale_p, self.blur_p, self.solarize_p, self.pad_crop = grayscale_p, blur_p, solarize_p, pad_crop

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """x: (B, C, H, W) in [0, 1] -> augmented, same shape."""
        if self.crop_scale is not None or self.pad_crop or self.flip:
            x = self._geometry(x, generator)
        if self.color_jitter > 0:
            x = self._jitter(x, generator)
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
        s, B = self.color_jitter, len(x)

        def factor() -> Tensor:
            return (1 - s + 2 * s * _rand(B, x, generator)).view(B, 1, 1, 1)

        x = (x * factor()).clamp(0, 1)  # brightness
        mean = _gray(x).mean((2, 3), keepdim=True)
        x = ((x - mean) * factor() + mean).clamp(0, 1)  # contrast
        if x.shape[1] > 1:
            g = _gray(x)
            x = ((x - g) * factor() + g).clamp(0, 1)  # saturation
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
