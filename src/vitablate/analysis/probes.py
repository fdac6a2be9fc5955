"""Frozen-feature evaluations: linear probe, k-nearest neighbours, cue-conflict shape bias.

Features are extracted once per split; probes then train on tensors, which takes
seconds even on a CPU. Linear probes read *normalised* features (standardised
with the training set's statistics, as MAE's BatchNorm-without-affine head does).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F


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

    return predict


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
