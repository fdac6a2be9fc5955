"""Frozen-feature evaluations: linear probes, k-nearest neighbours, cue-conflict shape bias.

Two linear probes:
- `fit_linear_probe` (eval.probe: lbfgs): features are extracted once per split and a multinomial
  logistic regression is fitted by full-batch L-BFGS on them (standardised with the training
  set's statistics), which takes seconds even on a CPU; `select_linear_probe` picks its L2
  strength on the validation split. An iterative fit of the probe's weights.
- `LinearProbe` (eval.probe: reference): MAE's protocol (facebookresearch/mae: main_linprobe.py),
  a BatchNorm without affine and a linear head on the frozen encoder's features, trained by the
  engine with SGD or LARS on random-resized crops and flips.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

log = logging.getLogger(__name__)


@torch.no_grad()
def extract(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, device: torch.device,
            transform: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 and labels (N,) on CPU; `forward` maps images to (B, D)."""
    feats, labels = [], []
    for x, y in batches:
        x = x.to(device)
        if transform is not None:
            x = transform(x)
        feats.append(forward(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels)


def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, weight_decay: float = 1e-3,
                     steps: int = 100) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multinomial logistic regression (full-batch L-BFGS) on standardised features.

    Returns predict(features) -> logits. Deterministic: zero init, no sampling.
    """
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True) + 1e-6
    tx = (train_x - mean) / std
    head = torch.nn.Linear(tx.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(tx), train_y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        return head((x - mean) / std)

    predict.state = {"kind": "lbfgs", "mean": mean, "std": std, "head": head.state_dict()}  # for probe.pt
    return predict


def linear_probe_from_state(state: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The `fit_linear_probe` predict whose `.state` was saved (a transfer linear probe's probe.pt): the same
    standardisation and head, so it gives the same logits."""
    mean, std = state["mean"], state["std"]
    weight = state["head"]["weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict(state["head"])

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        return head((x - mean) / std)

    return predict


def select_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                        num_classes: int, weight_decays: float | list[float]
                        ) -> tuple[Callable[[torch.Tensor], torch.Tensor], float, dict[float, float]]:
    """`fit_linear_probe` for each L2 strength; the one with the best top-1 on (val_x, val_y) wins.

    Returns (predict, chosen weight decay, {weight decay: val top-1}); ties go to the stronger L2.
    """
    decays = sorted({float(w) for w in (weight_decays if isinstance(weight_decays, (list, tuple)) else
                                        [weight_decays])}, reverse=True)
    if not decays:
        raise ValueError("eval.probe_weight_decay is an empty list; give at least one L2 strength")
    best, scores = None, {}
    for wd in decays:
        predict = fit_linear_probe(train_x, train_y, num_classes, wd)
        scores[wd] = 100.0 * (predict(val_x).argmax(-1) == val_y).float().mean().item()
        if best is None or scores[wd] > scores[best[1]]:
            best = (predict, wd)
    if len(decays) > 1:
        log.info("linear probe L2 on the val split: %s -> %g", scores, best[1])
    return best[0], best[1], scores


class LinearProbe(nn.Module):
    """MAE's linear probe (facebookresearch/mae: main_linprobe.py): the frozen encoder's features through
    BatchNorm1d(affine=False, eps=1e-6) and a linear head (weights N(0, 0.01) truncated, bias 0).

    The encoder stays in eval mode and gets no gradient; only the head trains (the BatchNorm
    keeps running statistics in training, so evaluation normalises with them).
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        dim = encoder.num_features
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.encoder(x)  # (B, D): the token the encoder pools (CLS for global_pool=token)
        return self.head(feats.float())


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Weighted k-NN on cosine similarity (weights exp(sim / T), as in DINO's evaluation); top-1 %."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    k = min(k, len(train_x))
    correct = 0
    for i in range(0, len(test_x), 1024):  # chunks bound the (chunk, N_train) similarity matrix
        sim, idx = (test_x[i:i + 1024] @ train_x.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[i:i + 1024]).sum().item()
    return 100.0 * correct / len(test_x)


def shape_bias(pred: torch.Tensor, y_shape: torch.Tensor, y_texture: torch.Tensor) -> dict[str, float]:
    """Cue-conflict decisions (Geirhos et al.): shape bias = shape hits / (shape hits + texture hits).

    `pred` are class indices from a probe trained where shape class i always wore texture i,
    so on a conflicting image a prediction can follow the shape, the texture, or neither.
    """
    shape_hits = (pred == y_shape).sum().item()
    texture_hits = (pred == y_texture).sum().item()
    decided = shape_hits + texture_hits
    return {"shape_bias": shape_hits / decided if decided else float("nan"),
            "cue_conflict_shape_top1": 100.0 * shape_hits / len(pred),
            "cue_conflict_texture_top1": 100.0 * texture_hits / len(pred)}
