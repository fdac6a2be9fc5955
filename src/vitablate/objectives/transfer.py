"""Attention transfer (Li et al., "On the surprising effectiveness of attention transfer").

A student ViT learns its features from scratch while its attention comes from a
frozen pre-trained teacher:

- copy (`AttentionCopy`): in the chosen layers the student uses the teacher's
  post-softmax map (or only its queries / keys: `mode="q"|"k"`) and ignores its own;
  the teacher runs at train *and* test time;
- distill (`attention_distillation_loss`): cross-entropy between teacher and student
  attention distributions, added to the classification loss; the teacher is needed in
  training only.

Maps are materialised only in the layers that use them: every other layer, teacher's
and student's, keeps the fused attention path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import attention_modules, capturing, resolve_layers


@dataclass(frozen=True)
class ViTShape:
    """What must agree for a teacher's attention to serve a student."""

    depth: int
    num_heads: int
    embed_dim: int
    patch_size: int
    num_tokens: int  # prefix + patch tokens

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


def vit_shape(model: nn.Module) -> ViTShape:
    mods = attention_modules(model)
    pe = model.patch_embed
    return ViTShape(depth=len(mods), num_heads=mods[0].num_heads, embed_dim=model.embed_dim,
                    patch_size=int(pe.patch_size[0]), num_tokens=pe.num_patches + model.num_prefix_tokens)


class IncompatibleTeacher(ValueError):
    """The teacher's attention cannot stand in for the student's."""


def check_compatible(teacher: nn.Module, student: nn.Module, what: str = "attention maps") -> None:
    """Refuse, before any training, a teacher whose shape cannot serve the student.

    Maps need equal depth, heads, patch size and token count; copying queries or keys also
    needs equal width (head dimension). The message names both shapes.
    """
    t, s = vit_shape(teacher), vit_shape(student)
    fields = ["depth", "num_heads", "patch_size", "num_tokens"] + (["embed_dim"] if what != "attention maps" else [])
    bad = [f for f in fields if getattr(t, f) != getattr(s, f)]
    if bad:
        raise IncompatibleTeacher(
            f"teacher ({t}) cannot serve the student ({s}) for {what}: {', '.join(bad)} differ. "
            "Give the student the teacher's shape (model.* in the config) or pick a teacher of the student's shape."
        )


def _freeze(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _float32(device_type: str):
    """A region where autocast is off: the frozen teacher's maps and the distillation loss are computed in
    float32 even when the student trains under bf16 autocast (softmaxes over N keys lose mass in bf16)."""
    return torch.autocast(device_type=device_type, enabled=False)


class SharedDropPath(nn.Module):
    """Stochastic depth whose per-sample keep mask is set from outside (`mask`, (B,) of 0 or 1/keep_prob).

    Installed in the same place of a student's and its teacher's blocks, it lets both drop the same residual
    branches for the same images, as attention-transfer's DualVisionTransformer does (models_dual_vit.py,
    get_drop_path_mask: the teacher's forward takes the student's drop_masks). Without a mask (evaluation,
    or between steps) it is the identity.
    """

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.mask: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return x
        return x * self.mask.to(x.dtype).view((x.shape[0],) + (1,) * (x.ndim - 1))


def _drop_prob(module: nn.Module) -> float:
    return float(getattr(module, "drop_prob", 0.0) or 0.0)  # timm's DropPath; nn.Identity where the rate is 0


class _SharedDropPaths:
    """The student's stochastic depth shared with the teacher: both models' DropPaths become SharedDropPaths
    at the student's rates, and `draw(batch)` sets one mask per residual branch on both (training only)."""

    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        self.pairs: list[tuple[SharedDropPath, SharedDropPath]] = []
        for t_blk, s_blk in zip(teacher.blocks, student.blocks):
            for attr in ("drop_path1", "drop_path2"):
                rate = _drop_prob(getattr(s_blk, attr))
                s_mod, t_mod = SharedDropPath(rate), SharedDropPath(rate)
                setattr(s_blk, attr, s_mod)
                setattr(t_blk, attr, t_mod)
                self.pairs.append((s_mod, t_mod))

    def draw(self, batch: int, device: torch.device) -> None:
        """One Bernoulli(keep) mask per residual branch, scaled by 1/keep (timm's drop_path, scale_by_keep)."""
        for s_mod, t_mod in self.pairs:
            keep = 1.0 - s_mod.drop_prob
            mask = None
            if s_mod.drop_prob > 0:
                mask = torch.bernoulli(torch.full((batch,), keep, device=device)) / keep
            s_mod.mask = t_mod.mask = mask

    def clear(self) -> None:
        for s_mod, t_mod in self.pairs:
            s_mod.mask = t_mod.mask = None


def _run_blocks(model: nn.Module, x: torch.Tensor, upto: int) -> None:
    """timm's forward, stopped after block `upto` (later blocks' maps are not needed)."""
    model.forward_intermediates(x, indices=[upto], stop_early=True, output_fmt="NLC", intermediates_only=True)


class AttentionCopy(nn.Module):
    """Student logits with the frozen teacher's attention in `layers` (None = all).

    mode: "map" (post-softmax maps, the reference), "q" or "k" (the teacher's queries or
    keys with the student's own other half). forward(x): (B, C, H, W) -> (B, classes).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: Optional[Sequence[int]] = None,
                 mode: str = "map", teacher_drop_path: bool = False) -> None:
        super().__init__()
        if mode not in ("map", "q", "k"):
            raise ValueError(f"AttentionCopy mode must be map, q or k, got {mode!r}")
        check_compatible(teacher, student, "attention maps" if mode == "map" else f"copied {mode}")
        self.teacher = _freeze(teacher)
        self.student = student
        self.mode = mode
        self.layers = resolve_layers(layers, len(student.blocks))
        self.shared_drop_paths = _SharedDropPaths(teacher, student) if teacher_drop_path else None

    def train(self, mode: bool = True) -> "AttentionCopy":
        super().train(mode)
        self.teacher.eval()  # the teacher is frozen: no dropout, fixed statistics
        return self

    @torch.no_grad()
    def teacher_attention(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's maps (or q / k) of the chosen layers, in float32 whatever the autocast:
        each (B, H, N, N) or (B, H, N, head_dim)."""
        with _float32(x.device.type), capturing(self.teacher, self.layers) as mods:
            _run_blocks(self.teacher, x.float(), max(self.layers))
            attr = {"map": "last_map", "q": "last_q", "k": "last_k"}[self.mode]
            return [getattr(m, attr) for m in mods]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_drop_paths is not None and self.training:
            self.shared_drop_paths.draw(x.shape[0], x.device)
        mods = attention_modules(self.student)
        attr = {"map": "override_map", "q": "override_q", "k": "override_k"}[self.mode]
        try:
            given = self.teacher_attention(x)
            for i, value in zip(self.layers, given):
                setattr(mods[i], attr, value)
            return self.student(x)
        finally:
            for i in self.layers:
                setattr(mods[i], attr, None)
            if self.shared_drop_paths is not None:
                self.shared_drop_paths.clear()


def attention_distillation_loss(student_logits: Sequence[torch.Tensor], teacher_logits: Sequence[torch.Tensor],
                                temperature: float = 1.0) -> torch.Tensor:
    """Σ_layers mean_{batch, head, query} CE(softmax(teacher / T), log_softmax(student / T)).

    Each list holds one pre-softmax (B, H, N, N) tensor per distilled layer. The teacher side
    is detached: gradient reaches the student only.
    """
    if len(student_logits) != len(teacher_logits) or not student_logits:
        raise ValueError(f"need one teacher map per student map, got {len(student_logits)} and {len(teacher_logits)}")
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_logits, teacher_logits):
        if s.shape != t.shape:
            raise ValueError(f"student attention {tuple(s.shape)} and teacher attention {tuple(t.shape)} differ")
        p_t = F.softmax(t.detach().float() / temperature, dim=-1)
        total = total + -(p_t * F.log_softmax(s.float() / temperature, dim=-1)).sum(-1).mean()
    return total


class AttentionDistillation(nn.Module):
    """Training-time wrapper: loss(x, y) = CE(student(x), y) + weight * distillation in `layers`.

    Evaluation uses `student` alone: the teacher is never needed at test time.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: Optional[Sequence[int]] = None,
                 weight: float = 3.0, temperature: float = 1.0, label_smoothing: float = 0.0,
                 teacher_drop_path: bool = False) -> None:
        super().__init__()
        check_compatible(teacher, student)
        self.teacher = _freeze(teacher)
        self.student = student
        self.layers = resolve_layers(layers, len(student.blocks))
        self.weight, self.temperature, self.label_smoothing = weight, temperature, label_smoothing
        self.shared_drop_paths = _SharedDropPaths(teacher, student) if teacher_drop_path else None

    def train(self, mode: bool = True) -> "AttentionDistillation":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        shared = self.shared_drop_paths is not None and self.training
        if shared:
            self.shared_drop_paths.draw(x.shape[0], x.device)
        try:
            with torch.no_grad(), _float32(x.device.type), capturing(self.teacher, self.layers) as t_mods:
                _run_blocks(self.teacher, x.float(), max(self.layers))
                teacher_logits = [m.last_logits for m in t_mods]
            with capturing(self.student, self.layers) as s_mods:
                logits = self.student(x)
                student_logits = [m.last_logits for m in s_mods]
        finally:
            if shared:
                self.shared_drop_paths.clear()
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        with _float32(x.device.type):
            distill = attention_distillation_loss(student_logits, teacher_logits, self.temperature)
        return ce + self.weight * distill, {"loss_ce": ce.detach(), "loss_distill": distill.detach()}


def parse_layers(spec: str, depth: int) -> list[int]:
    """'all' | 'first:K' | 'last:K' | '0,2,5' -> sorted block indices (checked against depth)."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(depth))
    for prefix in ("first:", "last:"):
        if spec.startswith(prefix):
            try:
                k = int(spec[len(prefix):])
            except ValueError:
                raise ValueError(f"layers {spec!r}: K must be an integer, as in {prefix}3") from None
            if not 1 <= k <= depth:
                raise ValueError(f"layers {spec!r}: K must be in 1..{depth} for a model of depth {depth}")
            return list(range(k)) if prefix == "first:" else list(range(depth - k, depth))
    try:
        idx = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"layers {spec!r} is not all, first:K, last:K or a comma-separated list of indices") from None
    return resolve_layers(idx, depth)
