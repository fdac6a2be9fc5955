"""Pre-training objectives ("pretexts") that own their augmentation, normalisation and loss.

The training loop (`vitablate.engine.fit`) hands each step raw images in [0, 1] on the
device and calls `loss_fn(x, y) -> (loss, logs)`; afterwards `after_step(step, total)`.
Every objective here is an `nn.Module` with that interface, so swapping the pretext is
swapping one object:

- `supervised`: cross-entropy on labels through a linear head (labels as one more pretext);
- `moco`: MoCo v3 (Chen, Xie, He 2021), contrastive with a momentum encoder;
- `simmim`: SimMIM (Xie et al. 2022), mask tokens in the input, L1 on masked pixels;
- `mae`: MAE (He et al. 2022), encoder on visible patches only, light decoder, MSE;
- `hybrid`: lam * MoCo + (1 - lam) * SimMIM on one shared encoder (Park et al. 2023, Sec. 5).

`encoder` is always a timm `VisionTransformer` built with `num_classes=0` (see
`vitablate.models.create_model`): it is the network later evaluated and analysed, and
every head, projector, predictor or decoder lives beside it in the objective. Nothing
here re-initialises the encoder.

Randomness (augmentation, masks) is drawn from the `generator` passed to `forward`
when one is given, so a fixed generator repeats a step exactly.
"""

from __future__ import annotations

import copy
import math
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, PatchDropout, trunc_normal_
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from vitablate.data.augment import BatchAugment, normalize, two_views
from vitablate.distributed import concat_all_gather
from vitablate.distributed import rank as dist_rank
from vitablate.models import add_prefix_and_positions
from vitablate.models.factory import mae_init_module, sincos_pos_embed_2d

from .registry import PRETEXTS

__all__ = [
    "PretextObjective",
    "Supervised",
    "MoCo",
    "SimMIM",
    "MAE",
    "Hybrid",
    "PRETEXTS",
    "build_pretext",
    "patchify",
    "unpatchify",
    "random_masking",
    "block_masking",
    "moco_momentum",
    "sincos_pos_embed_2d",
]


# ---------------------------------------------------------------------------------------
# helpers shared by the objectives
# ---------------------------------------------------------------------------------------


def _patch_size(encoder: VisionTransformer) -> int:
    """The encoder's (square) patch side in pixels."""
    ps = encoder.patch_embed.patch_size
    ps = (ps, ps) if isinstance(ps, int) else tuple(ps)
    if ps[0] != ps[1]:
        raise ValueError(f"square patches expected, got {ps}")
    return int(ps[0])


def _in_chans(encoder: VisionTransformer) -> int:
    return int(encoder.patch_embed.proj.in_channels)


def patchify(imgs: Tensor, p: int) -> Tensor:
    """imgs: (N, C, H, W) -> (N, L, p*p*C), patches in row-major order, values in (p, q, c) order (as MAE)."""
    N, C, H, W = imgs.shape
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not a multiple of the patch size {p}")
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x: Tensor, p: int, c: int, h: int, w: Optional[int] = None) -> Tensor:
    """x: (N, L, p*p*C) with L = h*w -> imgs: (N, C, h*p, w*p); the inverse of `patchify`."""
    w = h if w is None else w
    N = x.shape[0]
    x = x.reshape(N, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, c, h * p, w * p)


def random_masking(
    N: int, L: int, mask_ratio: float, device: torch.device, generator: Optional[torch.Generator] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image random masks with EXACTLY round(mask_ratio * L) masked patches each (MAE's argsort of noise).

    Returns (mask, ids_keep, ids_restore):
      mask: (N, L) float, 1 = masked, 0 = visible, in the original patch order;
      ids_keep: (N, L - num_masked) long, indices of the visible patches (in shuffled order);
      ids_restore: (N, L) long, argsort of the shuffle, to put a shuffled sequence back in order.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    num_masked = round(mask_ratio * L)
    len_keep = L - num_masked
    noise = torch.rand(N, L, device=device, generator=generator)  # uniform [0, 1)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first len_keep are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(N, L, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # unshuffle: (N, L), 1 = masked
    return mask, ids_keep, ids_restore


def moco_momentum(step: int, total_steps: int, base: float) -> float:
    """MoCo v3's cosine momentum schedule: `base` at step 0 rising to 1.0 at `total_steps`."""
    progress = min(1.0, max(0.0, step / max(1, total_steps)))
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base)


def deterministic(module: nn.Module) -> nn.Module:
    """`module` with every DropPath, PatchDropout and Dropout switched off in place (probability 0), whatever
    its mode."""
    for m in module.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
        elif isinstance(m, PatchDropout):
            m.prob = 0.0
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return module


def _mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's `_build_mlp`: Linear(no bias) [+ BN + ReLU] ..., last BN without affine."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d1 = input_dim if i == 0 else mlp_dim
        d2 = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d1, d2, bias=False))
        if i < num_layers - 1:
            layers.append(nn.BatchNorm1d(d2))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------------------


def _require_fixed_size(encoder: VisionTransformer, name: str) -> None:
    if getattr(encoder, "dynamic_img_size", False):
        raise ValueError(f"{name} here needs a fixed image size (dynamic_img_size=False)")


def block_masking(N: int, grid_size: tuple[int, int], block: int, mask_ratio: float, device: torch.device,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """SimMIM's masks: square blocks of `block` x `block` patches, masked or visible as a whole.

    microsoft/SimMIM: data/data_simmim.py, MaskGenerator: on the grid of blocks, a random
    ceil(blocks * mask_ratio) of them are masked, then each is repeated over its patches.
    Returns (N, gh * gw) float, 1 = masked, in row-major patch order.
    """
    gh, gw = grid_size
    if block < 1 or gh % block or gw % block:
        raise ValueError(f"a mask block of {block} patches does not tile the {gh}x{gw} patch grid; set "
                         "pretext.objective.simmim_mask_patch_size to a multiple of the patch size that "
                         "divides the image size")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    rh, rw = gh // block, gw // block
    count = rh * rw
    num_masked = int(math.ceil(count * mask_ratio))
    noise = torch.rand(N, count, device=device, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)  # (N, count): each block's place in a random permutation
    coarse = (rank < num_masked).to(torch.float32).view(N, rh, 1, rw, 1)
    return coarse.expand(N, rh, block, rw, block).reshape(N, gh * gw)


def _hand_to_loader(aug: nn.Module, interpolation: str) -> tuple:
    """An augmentation's random-resized crop and flip as a loader view (low, high, interpolation, flip),
    removed from the augmentation, which keeps everything else (colour, blur, solarize, grayscale)."""
    if getattr(aug, "crop_scale", None) is None:
        raise ValueError(f"{type(aug).__name__} has no random-resized crop for the loader to take")
    view = (*aug.crop_scale, interpolation, bool(aug.flip))
    aug.crop_scale, aug.flip = None, False
    return view


def _crop_flip(min_scale: float) -> BatchAugment:
    """Masked-image-modeling views: random resized crop (area >= min_scale) and flip, no colour."""
    return BatchAugment(crop_scale=(min_scale, 1.0), flip=True, color_jitter=0.0, grayscale_p=0.0)


class PretextObjective(nn.Module):
    """A pre-training loss that owns augmentation and normalisation; `encoder` is what is kept afterwards.

    forward(x, y=None, generator=None) -> (scalar loss, logs of python floats)
      x: (B, C, H, W) raw images in [0, 1] on the device; y: (B,) labels (only `Supervised` reads them).
    after_step(step, total_steps): called after each optimiser step (default: nothing).
    trainable_parameters(): what the optimiser updates (unique; momentum copies excluded).
    """

    encoder: VisionTransformer
    loader_views = False  # True after take_loader_views: x is (B, k, C, H, W), the loader's crops

    def __init__(self, encoder: VisionTransformer, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.encoder = encoder
        self.patch_size = _patch_size(encoder)
        self.in_chans = c = _in_chans(encoder)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean/std need {c} values (the encoder's in_chans), got {self.mean}, {self.std}")

    def normalize(self, x: Tensor) -> Tensor:
        return normalize(x, self.mean, self.std)

    def forward(self, x: Tensor, y: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        pass

    def take_loader_views(self) -> list[tuple]:
        """Hand this objective's random-resized crops and flips to an image-folder loader (mode "views"),
        which then takes them from the full-resolution image: returns one (low, high, interpolation, flip)
        per view; afterwards forward reads x as (B, k, C, H, W) and its augmentation no longer crops or flips."""
        raise ValueError(f"{type(self).__name__} takes no views from the loader")

    def trainable_parameters(self) -> list[nn.Parameter]:
        # nn.Module.parameters() already yields a parameter shared by submodules once
        return [p for p in self.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------
# supervised
# ---------------------------------------------------------------------------------------


class Supervised(PretextObjective):
    """Cross-entropy with label smoothing through a linear head on the encoder's pooled features."""

    def __init__(self, encoder: VisionTransformer, mean: Sequence[float], std: Sequence[float], num_classes: int,
                 label_smoothing: float = 0.1, augment: Optional[nn.Module] = None, erase=None, mixup=None) -> None:
        super().__init__(encoder, mean, std)
        # DeiT's regularisers, as classifier training has them (jobs.random_erasing, jobs.build_mixup): timm's
        # RandomErasing on the normalised batch, timm's Mixup/CutMix with SoftTargetCrossEntropy; None = off
        self.erase, self.mixup = erase, mixup
        img = encoder.patch_embed.img_size[0]
        # light CIFAR-style augmentation: pad-and-crop by 1/8 of the side, horizontal flip
        self.augment = augment if augment is not None else BatchAugment(
            crop_scale=None, flip=True, color_jitter=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0,
            pad_crop=max(1, img // 8))
        self.label_smoothing = label_smoothing
        self.head = nn.Linear(encoder.num_features, num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, y: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        if y is None:
            raise ValueError("the supervised pretext needs labels y")
        x = self.normalize(self.augment(x, generator=generator))
        if self.erase is not None:
            x = self.erase(x)
        if self.mixup is not None:
            x, target = self.mixup(x, y)  # soft targets, label smoothing folded in
        feats = self.encoder(x)  # (B, embed_dim), pooled
        logits = self.head(feats)  # (B, num_classes)
        if self.mixup is not None:
            loss = SoftTargetCrossEntropy()(logits.float(), target)
        else:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        return loss, {"loss_ce": loss.detach()}


# ---------------------------------------------------------------------------------------
# MoCo v3
# ---------------------------------------------------------------------------------------


class MoCo(PretextObjective):
    """MoCo v3: online encoder + projector + predictor vs a momentum (EMA) encoder + projector.

    Two views from two augmentations; symmetric InfoNCE with in-batch negatives:
    loss = ctr(q1, k2) + ctr(q2, k1), ctr(q, k) = CE(norm(q) @ norm(k).T / T, arange) * 2T.
    Keys come from the momentum branch without gradients; `after_step` moves it towards
    the online branch with the cosine momentum schedule from `momentum` to 1.0.
    """

    # the negatives are the other keys of the batch the loss sees (main_moco.py gathers the whole batch's keys):
    # gradient accumulation shrinks it to a micro-batch (engine.accum_changes_objective)
    in_batch_negatives = True

    def __init__(self, encoder: VisionTransformer, mean: Sequence[float], std: Sequence[float], dim: int = 128,
                 mlp_dim: int = 512, temperature: float = 0.2, momentum: float = 0.99,
                 augment1: Optional[nn.Module] = None, augment2: Optional[nn.Module] = None,
                 crop_scale: Sequence[float] = (0.08, 1.0), color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
                 color_jitter_p: float = 0.8, grayscale_p: float = 0.2, blur_p: Sequence[float] = (1.0, 0.1),
                 solarize_p: Sequence[float] = (0.0, 0.2)) -> None:
        super().__init__(encoder, mean, std)
        self.temperature = temperature
        self.base_momentum = momentum
        self.momentum = momentum  # the value of the latest (or, before any step, first) EMA update
        # MoCo v3's asymmetric views; the defaults are its values (facebookresearch/moco-v3: main_moco.py,
        # augmentation1 / augmentation2): crop (0.08, 1), ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8,
        # grayscale 0.2, blur 1.0 / 0.1, solarize 0 / 0.2 (view 1 / view 2), flip
        for key, pair in (("moco_blur_p", blur_p), ("moco_solarize_p", solarize_p)):
            if len(pair) != 2:
                raise ValueError(f"pretext.objective.{key} is [view 1, view 2], got {list(pair)}")
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"pretext.objective.moco_crop_scale is [low, high] with 0 < low <= high <= 1, "
                             f"got {list(crop_scale)}; MoCo v3 uses [0.08, 1.0]")
        common = dict(crop_scale=tuple(crop_scale), flip=True, color_jitter=tuple(color_jitter),
                      color_jitter_p=color_jitter_p, grayscale_p=grayscale_p, pad_crop=0)
        self.augment1 = augment1 if augment1 is not None else BatchAugment(
            blur_p=blur_p[0], solarize_p=solarize_p[0], **common)
        self.augment2 = augment2 if augment2 is not None else BatchAugment(
            blur_p=blur_p[1], solarize_p=solarize_p[1], **common)
        self.projector = _mlp(3, encoder.num_features, mlp_dim, dim)
        self.predictor = _mlp(2, dim, mlp_dim, dim)  # MoCo v3's ViT predictor keeps the last BN
        # momentum branch: a frozen deep copy of encoder + projector, never seen by the optimiser; it drops
        # no paths and runs no dropout (facebookresearch/moco-v3: moco/builder.py builds the momentum encoder
        # like the base one, and vits.py pre-trains with drop_path_rate 0)
        self.momentum_encoder = deterministic(copy.deepcopy(encoder)).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def _online_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)]

    def contrastive_loss(self, q: Tensor, k: Tensor) -> Tensor:
        """q, k: (N, dim) -> scalar; positives on the diagonal, the other keys are negatives.

        With several workers the keys of every worker's images are gathered, so each of this
        worker's N queries meets W * N keys (W * N - 1 negatives); its positive is its own image's
        key, at offset N * rank (facebookresearch/moco-v3: moco/builder.py, contrastive_loss).
        """
        q = F.normalize(q.float(), dim=1)
        k = concat_all_gather(F.normalize(k.float(), dim=1))  # (W * N, dim); constants, no gradient
        logits = q @ k.T / self.temperature  # (N, W * N) cosine similarities / T
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * dist_rank()
        self.last_num_keys = k.shape[0]
        return F.cross_entropy(logits, labels) * (2 * self.temperature)

    def forward(self, x: Tensor, y: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        if x.shape[0] < 2:
            raise ValueError("MoCo needs a batch of at least 2 images (BatchNorm and in-batch negatives)")
        if self.loader_views:  # the loader's two independent crops of the full image, one per view
            x1, x2 = (self.normalize(v) for v in (self.augment1(x[:, 0], generator=generator),
                                                  self.augment2(x[:, 1], generator=generator)))
        else:
            x1, x2 = (self.normalize(v) for v in two_views(self.augment1, self.augment2, x, generator))
        q1 = self.predictor(self.projector(self.encoder(x1)))  # (B, dim)
        q2 = self.predictor(self.projector(self.encoder(x2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_encoder(x1))
            k2 = self.momentum_projector(self.momentum_encoder(x2))
        loss = self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)
        return loss, {"loss_moco": loss.detach(), "momentum": float(self.momentum), "moco_keys": self.last_num_keys}

    def take_loader_views(self) -> list[tuple]:
        # facebookresearch/moco-v3: main_moco.py, TwoCropsTransform: each view its own
        # RandomResizedCrop(224, scale=(crop_min, 1.)) (bilinear) and RandomHorizontalFlip
        self.loader_views = True
        return [_hand_to_loader(self.augment1, "bilinear"), _hand_to_loader(self.augment2, "bilinear")]

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA after optimiser step `step` (0-based): theta_k <- m theta_k + (1 - m) theta_q, m = schedule(step)."""
        m = moco_momentum(step, total_steps, self.base_momentum)
        self.momentum = m
        for online, ema in self._online_pairs():
            for p_q, p_k in zip(online.parameters(), ema.parameters()):
                p_k.mul_(m).add_(p_q.detach(), alpha=1.0 - m)


# ---------------------------------------------------------------------------------------
# masked image modelling
# ---------------------------------------------------------------------------------------


def _token_norm(encoder: VisionTransformer) -> nn.Module:
    """A LayerNorm for the patch tokens when the encoder has none.

    With `global_pool='avg'`, timm makes `encoder.norm` an Identity and normalises only the
    pooled feature (`fc_norm`); reconstruction heads read tokens, so they bring their own.
    """
    if isinstance(encoder.norm, nn.Identity):
        return nn.LayerNorm(encoder.embed_dim, eps=1e-6)
    return nn.Identity()


class SimMIM(PretextObjective):
    """SimMIM: masked patches' embeddings become a learnable mask token; L1 on their normalised pixels.

    The mask token replaces the patch embedding BEFORE position embeddings are added (so the
    token still knows where it is); prefix (CLS) tokens are kept. A linear head maps each
    patch token to its p*p*C pixels.
    """

    def __init__(self, encoder: VisionTransformer, mean: Sequence[float], std: Sequence[float],
                 mask_ratio: float = 0.6, augment: Optional[nn.Module] = None,
                 mask_patch_size: Optional[int] = None) -> None:
        super().__init__(encoder, mean, std)
        _require_fixed_size(encoder, "SimMIM")
        self.mask_ratio = mask_ratio
        # microsoft/SimMIM: data/data_simmim.py, MaskGenerator: masks come in blocks of mask_patch_size
        # pixels (32 at 224 px with 16 px patches: 2x2 patches); None masks single patches
        p = self.patch_size
        size = p if mask_patch_size is None else int(mask_patch_size)
        img = tuple(encoder.patch_embed.img_size)
        if size < p or size % p or img[0] % size or img[1] % size:
            raise ValueError(f"pretext.objective.simmim_mask_patch_size={mask_patch_size} must be a multiple of "
                             f"the patch size ({p} px) that divides the image size {img}; e.g. {2 * p}, or null "
                             "for single patches")
        self.mask_block = size // p  # patches per block side
        self.augment = augment if augment is not None else _crop_flip(0.67)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.norm = _token_norm(encoder)
        self.head = nn.Linear(encoder.embed_dim, self.patch_size ** 2 * self.in_chans)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}  # a token like the encoder's CLS: no weight decay (see engine.param_groups)

    def take_loader_views(self) -> list[tuple]:
        # microsoft/SimMIM: data/data_simmim.py, SimMIMTransform: RandomResizedCrop(img_size, scale=(0.67, 1.),
        # ratio=(3/4, 4/3)) (bilinear), RandomHorizontalFlip
        self.loader_views = True
        return [_hand_to_loader(self.augment, "bilinear")]

    def random_masking(self, N: int, mask_ratio: float, device: torch.device,
                       generator: Optional[torch.Generator] = None) -> Tensor:
        """mask: (N, L) float, 1 = masked, in blocks of `mask_block` x `mask_block` patches; exactly
        ceil(mask_ratio * blocks) masked blocks per image."""
        grid = tuple(self.encoder.patch_embed.grid_size)
        return block_masking(N, grid, self.mask_block, mask_ratio, device, generator)

    def forward_encoder(self, imgs: Tensor, mask: Tensor) -> Tensor:
        """imgs: (N, C, H, W) normalised, mask: (N, L) 1 = masked -> patch tokens (N, L, D) after the blocks."""
        enc = self.encoder
        x = enc.patch_embed(imgs)  # (N, L, D)
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        x = add_prefix_and_positions(enc, x)  # prepends CLS, adds position embeddings: (N, prefix + L, D)
        x = enc.patch_drop(x)
        x = enc.norm_pre(x)
        x = enc.blocks(x)
        x = self.norm(enc.norm(x))
        return x[:, enc.num_prefix_tokens:]

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """imgs: (N, C, H, W) normalised targets, pred: (N, L, p*p*C), mask: (N, L) -> mean L1 over masked patches."""
        target = patchify(imgs, self.patch_size)
        loss = (pred.float() - target.float()).abs().mean(dim=-1)  # (N, L), mean over each patch's pixels
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, x: Tensor, y: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        imgs = self.normalize(self.augment(x[:, 0] if self.loader_views else x, generator=generator))
        mask = self.random_masking(imgs.shape[0], self.mask_ratio, imgs.device, generator)  # (N, L)
        tokens = self.forward_encoder(imgs, mask)
        pred = self.head(tokens)  # (N, L, p*p*C)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, {"loss_simmim": loss.detach()}


class MAE(PretextObjective):
    """MAE: the encoder sees visible patches (+ prefix tokens) only; a light decoder rebuilds every patch.

    Decoder: Linear to `decoder_dim`, mask tokens put back at the masked positions, fixed
    2D sin-cos position embeddings, `decoder_depth` timm Blocks of `decoder_heads` heads (MAE ViT-B: 512-d, 8
    blocks, 16 heads: models_mae.py mae_vit_base_patch16_dec512d8b), LayerNorm, Linear to
    p*p*C pixels. Loss: MSE on masked patches against per-patch normalised targets
    (norm_pix_loss): (t - mean) / sqrt(var + 1e-6), over each patch's p*p*C values.
    """

    def __init__(self, encoder: VisionTransformer, mean: Sequence[float], std: Sequence[float],
                 mask_ratio: float = 0.75, decoder_dim: int = 64, decoder_depth: int = 2, decoder_heads: int = 4,
                 norm_pix_loss: bool = True, augment: Optional[nn.Module] = None) -> None:
        super().__init__(encoder, mean, std)
        _require_fixed_size(encoder, "MAE")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.augment = augment if augment is not None else _crop_flip(0.2)
        self.norm = _token_norm(encoder)
        npt = encoder.num_prefix_tokens
        grid = encoder.patch_embed.grid_size
        if grid[0] != grid[1]:
            raise ValueError(f"square patch grid expected, got {grid}")
        if decoder_dim % decoder_heads:
            raise ValueError(f"pretext.objective.mae_decoder_heads {decoder_heads} does not divide mae_decoder_dim "
                             f"{decoder_dim}; pick a divisor (MAE: 512-d decoder, 16 heads, models_mae.py)")
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # fixed (not learnt) as MAE; a buffer so it follows .to(device) and is saved
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_dim, grid[0], npt).unsqueeze(0))
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size ** 2 * self.in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        # MAE: mask token N(0, .02); Linear xavier-uniform, zero bias; LayerNorm (1, 0)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("encoder"):
                continue  # never touch the encoder's own init
            mae_init_module(m)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def take_loader_views(self) -> list[tuple]:
        # facebookresearch/mae: main_pretrain.py, RandomResizedCrop(input_size, scale=(0.2, 1.0),
        # interpolation=3 (bicubic)), RandomHorizontalFlip
        self.loader_views = True
        return [_hand_to_loader(self.augment, "bicubic")]

    def random_masking(self, x: Tensor, mask_ratio: float,
                       generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
        """x: (N, L, D) patch tokens -> x_masked (N, L_keep, D), mask (N, L) 1 = masked, ids_restore (N, L)."""
        N, L, D = x.shape
        mask, ids_keep, ids_restore = random_masking(N, L, mask_ratio, x.device, generator)
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, D))
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs: Tensor, mask_ratio: float,
                        generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
        """imgs: (N, C, H, W) normalised -> latent (N, prefix + L_keep, D), mask (N, L), ids_restore (N, L)."""
        enc = self.encoder
        npt = enc.num_prefix_tokens
        x = enc.patch_embed(imgs)  # (N, L, D)
        x = add_prefix_and_positions(enc, x)  # (N, prefix + L, D): prefix tokens + position embeddings for all
        prefix, patches = x[:, :npt], x[:, npt:]
        patches, mask, ids_restore = self.random_masking(patches, mask_ratio, generator)
        x = torch.cat([prefix, patches], dim=1)  # (N, prefix + L_keep, D): the blocks see only these
        x = enc.norm_pre(x)
        x = enc.blocks(x)
        x = self.norm(enc.norm(x))
        return x, mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent: (N, prefix + L_keep, D), ids_restore: (N, L) -> pred (N, L, p*p*C) for every patch."""
        npt = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)  # (N, prefix + L_keep, Dd)
        N, L = ids_restore.shape
        Dd = x.shape[-1]
        visible = x[:, npt:]
        mask_tokens = self.mask_token.to(x.dtype).expand(N, L - visible.shape[1], -1)
        full = torch.cat([visible, mask_tokens], dim=1)  # shuffled order: visible first
        full = torch.gather(full, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # original order
        x = torch.cat([x[:, :npt], full], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, npt:]  # drop prefix tokens

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """imgs: (N, C, H, W), pred: (N, L, p*p*C), mask: (N, L) 1 = masked -> mean MSE over masked patches."""
        target = patchify(imgs, self.patch_size).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (N, L), mean per patch
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, x: Tensor, y: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        imgs = self.normalize(self.augment(x[:, 0] if self.loader_views else x, generator=generator))
        latent, mask, ids_restore = self.forward_encoder(imgs, self.mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, {"loss_mae": loss.detach()}


# ---------------------------------------------------------------------------------------
# hybrid
# ---------------------------------------------------------------------------------------


class Hybrid(PretextObjective):
    """lam * L_moco + (1 - lam) * L_simmim on ONE shared encoder (separate heads).

    The MoCo part runs first, then SimMIM, each with its own augmentation, drawing from
    the same generator. A part whose weight is 0 is not computed (and not logged): then
    the hybrid is exactly the other objective, random draws included.
    """

    def __init__(self, encoder: VisionTransformer, mean: Sequence[float], std: Sequence[float], lam: float = 0.2,
                 moco_kwargs: Optional[dict] = None, simmim_kwargs: Optional[dict] = None) -> None:
        super().__init__(encoder, mean, std)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        self.lam = float(lam)
        self.moco = MoCo(encoder, mean, std, **(moco_kwargs or {}))
        self.simmim = SimMIM(encoder, mean, std, **(simmim_kwargs or {}))

    def forward(self, x: Tensor, y: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        loss = x.new_zeros((), dtype=torch.float32)
        logs: dict[str, Tensor | float] = {}
        mim_view = 2 if self.lam > 0 else 0  # with loader views: MoCo's two crops, then SimMIM's
        if self.lam > 0:
            l_moco, lg = self.moco(x, y, generator)
            loss = loss + self.lam * l_moco
            logs.update(lg)
        if self.lam < 1:
            l_mim, lg = self.simmim(x[:, mim_view:] if self.loader_views else x, y, generator)
            loss = loss + (1.0 - self.lam) * l_mim
            logs.update(lg)
        logs["loss_hybrid"] = loss.detach()
        return loss, logs

    def after_step(self, step: int, total_steps: int) -> None:
        self.moco.after_step(step, total_steps)

    def take_loader_views(self) -> list[tuple]:
        """MoCo's two crops (if lam > 0), then SimMIM's one (if lam < 1)."""
        self.loader_views = True
        return ((self.moco.take_loader_views() if self.lam > 0 else [])
                + (self.simmim.take_loader_views() if self.lam < 1 else []))



# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------

# the registry (names, families, colours) lives in registry.py: a new pretext is one class and one entry there


def build_pretext(name: str, encoder: VisionTransformer, mean: Sequence[float], std: Sequence[float],
                  **kwargs) -> PretextObjective:
    """The objective `name` (a key of `PRETEXTS`) around `encoder`; kwargs go to its constructor."""
    return PRETEXTS.entry(name).obj(encoder, mean, std, **kwargs)  # an unknown name: an error naming the choices
