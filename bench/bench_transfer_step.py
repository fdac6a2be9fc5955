"""Training-step time of attention copy and distillation against scratch, same student, side by side.

The frozen teacher's forward pass should be the only extra work: goals copy <= 1.4x and
distill <= 1.5x scratch. Runs on CUDA when available (bf16 autocast, fused AdamW), else CPU.

    python bench/bench_transfer_step.py                      # ViT-S/16-like at 224 px on GPU, small on CPU
    python bench/bench_transfer_step.py --size tiny --layers all
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import interleaved, save
from vitablate.models import VARIANTS, create_model
from vitablate.objectives import AttentionCopy, AttentionDistillation, parse_layers

SIZES = {
    "cpu": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),  # 65 tokens
    "tiny": VARIANTS["vit_tiny_patch16_224"],
    "small": VARIANTS["vit_small_patch16_224"],
    "base": VARIANTS["vit_base_patch16_224"],
}


def main() -> None:
    p = argparse.ArgumentParser()
    cuda = torch.cuda.is_available()
    p.add_argument("--size", default="small" if cuda else "cpu", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=128 if cuda else 32)
    p.add_argument("--layers", default="all", help="all | first:K | last:K")
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    size = dict(SIZES[args.size], num_classes=100)
    torch.manual_seed(0)
    models = {name: create_model(mixer="attention", **size).to(device) for name in ("scratch", "copy", "distill")}
    teacher = create_model(mixer="attention", **dict(size, num_classes=0)).to(device)
    layers = parse_layers(args.layers, size["depth"])
    copy = AttentionCopy(teacher, models["copy"], layers).train()
    distill = AttentionDistillation(teacher, models["distill"], layers).train()
    x = torch.randn(args.batch, 3, size["img_size"], size["img_size"], device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    losses = {
        "scratch": lambda: F.cross_entropy(models["scratch"](x), y),
        "copy": lambda: F.cross_entropy(copy(x), y),
        "distill": lambda: distill(x, y)[0],
    }
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=cuda) for n, m in models.items()}

    def step(name):
        def fn():
            with autocast:
                loss = losses[name]()
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
        return fn

    fns = {n: step(n) for n in losses}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    interleaved(fns, 3, sync)
    res = interleaved(fns, args.rounds, sync)
    ratio = {n: res[n]["median_s"] / res["scratch"]["median_s"] for n in ("copy", "distill")}
    print(f"device={device} size={args.size} batch={args.batch} layers={args.layers}")
    for n in fns:
        print(f"  {n:8s} {1000 * res[n]['median_s']:8.1f} ms/step")
    print(f"  copy/scratch {ratio['copy']:.2f} (goal <= 1.4)   distill/scratch {ratio['distill']:.2f} (goal <= 1.5)")
    save(f"transfer_step_{device.type}_{args.size}", {"size": size, "batch": args.batch, "layers": args.layers,
                                                      "ratio_over_scratch": ratio, "goals": {"copy": 1.4, "distill": 1.5},
                                                      "timings": res})


if __name__ == "__main__":
    main()
