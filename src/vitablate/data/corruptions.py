"""Distribution-shift test sets: ImageNet-C-style corruptions, batched and deterministic.

Severity 1..5 as in Hendrycks & Dietterich (2019); parameters are scaled for tiny
images (8-32 px) so that every severity still changes the image monotonically.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .datasets import Split

# severity -> parameter, index 0 = severity 1
_NOISE_STD = (0.04, 0.08, 0.12, 0.18, 0.26)  # gaussian noise std ([0, 1] pixel units)
_SHOT_RATE = (60.0, 25.0, 12.0, 5.0, 3.0)  # photons per unit intensity (lower = noisier)
_BLUR_SIGMA = (0.4, 0.6, 0.9, 1.3, 1.8)  # pixels
_CONTRAST = (0.6, 0.45, 0.3, 0.2, 0.1)  # factor towards the image mean
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)  # added in HSV-value-like space
_PIXELATE = (0.85, 0.7, 0.55, 0.45, 0.35)  # downsample factor


def gaussian_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    return x + _NOISE_STD[severity - 1] * torch.randn(x.shape, generator=g, device=x.device)


def shot_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    rate = _SHOT_RATE[severity - 1]
    return torch.poisson(x.clamp(0, 1) * rate, generator=g) / rate


def gaussian_blur(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    sigma = _BLUR_SIGMA[severity - 1]
    radius = max(1, int(round(2.5 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-offsets**2 / (2 * sigma**2))
    k = k / k.sum()
    B, C, H, W = x.shape
    y = x.reshape(B * C, 1, H, W)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return y.view(B, C, H, W)


def contrast(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _CONTRAST[severity - 1] + mean


def brightness(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    return x + _BRIGHTNESS[severity - 1]


def pixelate(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    H, W = x.shape[-2:]
    f = _PIXELATE[severity - 1]
    small = F.interpolate(x, size=(max(1, int(H * f)), max(1, int(W * f))), mode="area")
    return F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)


CORRUPTIONS: dict[str, Callable[[Tensor, int, torch.Generator], Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
}


def corrupt(x: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """x (B, C, H, W) in [0, 1] -> corrupted, in [0, 1]; the same seed gives the same noise."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {sorted(CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"corruption severity must be an integer 1..5, got {severity!r}")
    g = torch.Generator(device=x.device).manual_seed(seed)
    return CORRUPTIONS[name](x, severity, g).clamp(0, 1)


def corrupt_split(split: Split, name: str, severity: int, seed: int = 0) -> Split:
    """A corrupted copy of an in-memory split (labels and extra labels kept)."""
    return Split(corrupt(split.x, name, severity, seed), split.y, dict(split.extra))
