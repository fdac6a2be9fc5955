"""Training-step time with the papers' recipe ingredients on against off, side by side (issue 12).

Each variant is one optimiser step built from vitablate's own pieces, as a training job builds them:
`engine.build_optimizer` (with `train.layer_decay`: timm's layer-wise groups), `engine.set_lr` (each
group's lr_scale), `engine.classification_loss` (with `jobs.build_mixup`: timm Mixup/CutMix and soft-target
cross-entropy) and `jobs.build_ema` (timm ModelEmaV3, updated after the step). Variants are timed
interleaved, one step each per round, so the machine's noise hits them alike; the goal is <= 5% slower
with Mixup, EMA and layer decay all on, at the default model size (vit_digits, batch 64: the default
workflow's architecture question).

    python bench/bench_recipe_step.py                  # default size and a larger CPU size
    python bench/bench_recipe_step.py --sizes digits --rounds 200
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import interleaved, save
from vitablate.config import JobConfig, TrainConfig
from vitablate.engine import build_optimizer, classification_loss, set_lr
from vitablate.jobs import build_ema, build_mixup
from vitablate.models import VARIANTS, create_model

SIZES = {  # model kwargs, batch, image channels, classes
    "digits": (dict(VARIANTS["vit_digits"], in_chans=1, num_classes=10), 64),  # the default workflow's model
    "cpu": (dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=100), 32),
}
VARIANTS_ON = {  # the train keys each variant sets on top of today's defaults
    "off": {},
    "mixup": dict(mixup_alpha=0.8, cutmix_alpha=1.0),
    "ema": dict(ema=True),
    "layer_decay": dict(layer_decay=0.75),
    "all": dict(mixup_alpha=0.8, cutmix_alpha=1.0, ema=True, layer_decay=0.75),
}


def make_step(size: str, keys: dict, device: torch.device):
    kw, batch = SIZES[size]
    torch.manual_seed(0)
    model = create_model(mixer="attention", **kw).to(device).train()
    cfg = JobConfig(train=TrainConfig(batch_size=batch, lr=1e-3, **keys))
    optimizer = build_optimizer(model, cfg.train, device)
    loss_fn = classification_loss(model, cfg.train.label_smoothing, build_mixup(cfg, kw["num_classes"]))
    ema = build_ema(cfg, model)
    x = torch.randn(batch, kw["in_chans"] if "in_chans" in kw else 3, kw["img_size"], kw["img_size"], device=device)
    y = torch.randint(0, kw["num_classes"], (batch,), device=device)

    def step():
        set_lr(optimizer, 1e-3)
        optimizer.zero_grad(set_to_none=True)
        loss, _ = loss_fn(x.clone(), y)  # Mixup mixes in place
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(model)

    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=sorted(SIZES))
    p.add_argument("--rounds", type=int, default=120)
    p.add_argument("--warmup", type=int, default=10)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    figures = {"device": str(device), "rounds": args.rounds, "sizes": {}}
    for size in args.sizes:
        steps = {name: make_step(size, keys, device) for name, keys in VARIANTS_ON.items()}
        for _ in range(args.warmup):
            for fn in steps.values():
                fn()
        timing = interleaved(steps, args.rounds, sync)
        off = timing["off"]["median_s"]
        row = {}
        for name, t in timing.items():
            row[name] = {"median_ms": 1e3 * t["median_s"], "ratio_to_off": t["median_s"] / off,
                         "stdev_ms": 1e3 * statistics.pstdev(t["samples_s"])}
            print(f"{size:7s} {name:12s} {1e3 * t['median_s']:8.2f} ms/step  x{t['median_s'] / off:.3f}")
        figures["sizes"][size] = {"batch": SIZES[size][1], "steps": row,
                                  "goal": "all <= 1.05 x off at the default size (digits)"}
    save("recipe_step", figures)


if __name__ == "__main__":
    main()
