"""GPU training throughput of ViT-B/16 at 224 px and its model-FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / the device's *measured* bf16 matmul rate (a large bf16 GEMM
timed on the same GPU, side by side), so the ratio does not depend on a datasheet.
Training FLOPs per image = 3 x forward FLOPs (forward + backward), forward counted from the
matmuls: per block 24·N·D² (qkv, proj, MLP) + 4·N²·D (attention), plus patch embedding.
Goal: MFU >= 45%. Needs CUDA; prints why and exits 0 without one.

    python bench/bench_gpu_vit.py [--batch 256] [--compile]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from common import save
from vitablate.models import VARIANTS, create_model


def vit_train_flops_per_image(img=224, patch=16, dim=768, depth=12, mlp_ratio=4.0, classes=1000) -> float:
    n = (img // patch) ** 2 + 1
    per_block = 2 * n * dim * (3 * dim + dim + 2 * mlp_ratio * dim) + 2 * 2 * n * n * dim
    embed = 2 * (img // patch) ** 2 * (3 * patch * patch) * dim
    return 3 * (depth * per_block + embed + 2 * dim * classes)


def measured_bf16_rate(n: int = 8192, iters: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures GPU throughput; run it on a GPU machine")
        sys.exit(0)
    size = VARIANTS["vit_base_patch16_224"]
    model = create_model(mixer="attention", num_classes=1000, **size).cuda()
    fwd = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (args.batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    images_per_s = args.batch / dt
    achieved = images_per_s * vit_train_flops_per_image()
    peak = measured_bf16_rate()
    mfu = achieved / peak
    print(f"{torch.cuda.get_device_name(0)}: {images_per_s:.0f} img/s, {achieved / 1e12:.0f} TFLOP/s model, "
          f"measured bf16 GEMM {peak / 1e12:.0f} TFLOP/s, MFU {100 * mfu:.1f}% (goal >= 45%)")
    save("gpu_vit_b16", {"batch": args.batch, "compile": args.compile, "images_per_s": images_per_s,
                         "model_tflops": achieved / 1e12, "measured_bf16_tflops": peak / 1e12, "mfu": mfu,
                         "goal_mfu": 0.45})


if __name__ == "__main__":
    main()
