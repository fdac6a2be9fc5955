"""The papers' reference numbers: every published number the reports print, each with its source.

One place for them (docs/design.md's table of reference numbers is checked against `PAPER` by
tests/test_summary.py); `vitablate.summary` prints them beside each run's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ref:
    """One published number: top-1 (%) on ImageNet-1K at paper scale, with where it is printed."""

    value: float
    source: str


MELAS = "Melas-Kyriazi (2021), *Do You Even Need Attention?*, arXiv:2105.02723"
DEIT = "Touvron et al. (ICML 2021), *Training data-efficient image transformers & distillation through attention*"
MOCO3 = "Chen, Xie & He (ICCV 2021), *An Empirical Study of Training Self-Supervised Vision Transformers*"
MAE = "He et al. (CVPR 2022), *Masked Autoencoders Are Scalable Vision Learners*"
SIMMIM = "Xie et al. (CVPR 2022), *SimMIM: A Simple Framework for Masked Image Modeling*"
ATTN_TRANSFER = ("Li et al. (NeurIPS 2024), *On the Surprising Effectiveness of Attention Transfer for Vision "
                 "Transformers*, ViT-L student, MAE ViT-L teacher")

# Every paper number the summary prints, each with its source; a number without one is not printed.
PAPER: dict[str, dict] = {
    "architecture": {  # model size -> mixer -> Ref; attention is DeiT's recipe, the one feedforward is trained with
        "base": {"attention": Ref(79.9, f"DeiT-B, as quoted in {MELAS}, abstract"),
                 "feedforward": Ref(74.9, f"{MELAS}, abstract and FF-base in its code's README")},
        "tiny": {"attention": Ref(72.2, f"DeiT-Ti, {DEIT}"),
                 "feedforward": Ref(61.4, f"FF-tiny, {MELAS}, its code's README")},
        "large": {"feedforward": Ref(71.4, f"FF-large, {MELAS}, its code's README")},
    },
    "pretext": {  # pretext -> eval -> Ref (ViT-B/16)
        "moco": {"linear_probe": Ref(76.7, f"{MOCO3}, ViT-B linear probing"),
                 "finetune": Ref(83.2, f"MoCo v3 ViT-B fine-tuned, {MAE}, Table 3")},
        "simmim": {"linear_probe": Ref(56.7, f"{SIMMIM}, ViT-B linear probing"),
                   "finetune": Ref(83.8, f"{SIMMIM}, ViT-B fine-tuning")},
        "mae": {"linear_probe": Ref(68.0, f"{MAE}, ViT-B linear probing"),
                "finetune": Ref(83.6, f"{MAE}, Table 3, ViT-B")},
    },
    "transfer": {method: Ref(v, ATTN_TRANSFER) for method, v in (
        ("scratch", 83.0), ("finetune", 85.7), ("attn_copy", 85.1), ("attn_distill", 85.7), ("ensemble", 86.3))},
}


FASHION_MNIST_BENCHMARK = ("the benchmark table of Fashion-MNIST's repository, github.com/zalandoresearch/fashion-mnist "
                           "(README, Benchmark; Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747), trained on all "
                           "60,000 training images")
# Published baselines per dataset, test top-1 (%): so a reader can see whether this run's models are sane.
DATASET_BASELINES: dict[str, dict[str, Ref]] = {
    "fashion_mnist": {
        "human (crowd-sourced, 1,000 test images)": Ref(83.5, FASHION_MNIST_BENCHMARK),
        "MLP 256-128-64": Ref(90.0, FASHION_MNIST_BENCHMARK),
        "2 conv layers, <100K parameters": Ref(92.5, FASHION_MNIST_BENCHMARK),
    },
}


def paper_gap_closed(method: str) -> float:
    """The paper's gap closed, from its top-1 numbers: (method - scratch) / (finetune - scratch)."""
    t = {m: r.value for m, r in PAPER["transfer"].items()}
    return (t[method] - t["scratch"]) / (t["finetune"] - t["scratch"])


def paper_sources(question: str) -> list[str]:
    """One line per source of a question's paper numbers: each number (what it is, its value), then the source."""
    by_source: dict[str, list[str]] = {}
    for key, by in PAPER[question].items():
        items = [(None, by)] if isinstance(by, Ref) else list(by.items())
        for sub, ref in items:
            label = f"`{key}`" if sub is None else f"`{sub}`, {key}" if question == "architecture" else f"`{key}`, {sub}"
            by_source.setdefault(ref.source, []).append(f"{label} {ref.value:.1f}")
    return [f"{'; '.join(numbers)}: {source}" for source, numbers in by_source.items()]
