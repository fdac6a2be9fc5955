"""Training-step throughput: vitablate's create_model(mixer="attention") vs timm's own ViT.

Same size, same weights, same batch, measured side by side (interleaved) in one run.
The capture/override hooks must cost nothing when unused: goal ratio >= 0.95.

    python bench/bench_model_throughput.py [--rounds 30] [--batch 64]
"""

from __future__ import annotations

import argparse

import torch
from timm.models.vision_transformer import VisionTransformer

from common import interleaved, save
from vitablate.models import create_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = dict(img_size=args.img_size, patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth,
                num_heads=args.heads, num_classes=100)
    torch.manual_seed(0)
    ours = create_model(mixer="attention", **size).to(device)
    timm_vit = VisionTransformer(global_pool="avg", **size).to(device)
    timm_vit.load_state_dict(ours.state_dict())
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in (("vitablate", ours), ("timm", timm_vit))}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step(model, opt):
        def fn():
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return fn

    fns = {"vitablate": step(ours, opts["vitablate"]), "timm": step(timm_vit, opts["timm"])}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    interleaved(fns, 3, sync)  # warm-up
    res = interleaved(fns, args.rounds, sync)
    thr = {k: args.batch / v["median_s"] for k, v in res.items()}
    ratio = thr["vitablate"] / thr["timm"]
    print(f"device={device} size={size} batch={args.batch}")
    print(f"images/s: vitablate {thr['vitablate']:.1f}  timm {thr['timm']:.1f}  ratio {ratio:.3f} (goal >= 0.95)")
    save(f"model_throughput_{device.type}", {"size": size, "batch": args.batch, "rounds": args.rounds,
                                             "images_per_s": thr, "ratio_vitablate_over_timm": ratio,
                                             "goal": 0.95, "timings": res})


if __name__ == "__main__":
    main()
