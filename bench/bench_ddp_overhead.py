"""DDP overhead on this CPU: training-step time of 2 gloo workers against 1, same per-worker batch.

Each worker runs the step `engine.fit` runs (forward through `distributed.wrap_loss`, i.e. DDP with
several workers, backward, AdamW), one torch thread each. With W workers on W free cores the step
time ratio W-vs-1 is the cost of the gradient all-reduce (and of sharing the machine); it is a check
of the correctness path here, not a speed claim (NCCL on GPUs is another matter).

    nice python bench/bench_ddp_overhead.py [--steps 30] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

from common import save


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    import torch.distributed as tdist
    import torch.nn.functional as F

    from vitablate import distributed
    from vitablate.models import create_model

    torch.set_num_threads(1)
    if world > 1:
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = create_model(img_size=32, patch_size=4, embed_dim=args.dim, depth=args.depth, num_heads=4,
                         num_classes=10, mixer="attention")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step, sync = distributed.wrap_loss(model, lambda x, y: (F.cross_entropy(model(x), y), {}), torch.device("cpu"))
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    times = []
    for i in range(args.steps + 3):
        distributed.barrier()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = step(x, y)
        loss.backward()
        opt.step()
        if i >= 3:  # warm-up steps left out
            times.append(time.perf_counter() - t)
    if rank == 0:
        torch.save(times, out)
    if world > 1:
        tdist.destroy_process_group()


def run(world: int, args) -> list[float]:
    from vitablate.execution import _free_port

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "t.pt")
        if world == 1:
            _worker(0, 1, 0, args, out)
        else:
            mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world)
        return torch.load(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=32, help="per worker")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    args = p.parse_args()
    one, two = run(1, args), run(2, args)
    figures = {w: {"step_s_median": statistics.median(t), "step_s_min": min(t), "samples_s": t}
               for w, t in (("1_worker", one), ("2_workers", two))}
    ratio = figures["2_workers"]["step_s_median"] / figures["1_worker"]["step_s_median"]
    params = sum(p.numel() for p in __import__("vitablate.models", fromlist=["create_model"]).create_model(
        img_size=32, patch_size=4, embed_dim=args.dim, depth=args.depth, num_heads=4, num_classes=10).parameters())
    print(f"step time 1 worker {figures['1_worker']['step_s_median'] * 1e3:.1f} ms, 2 workers "
          f"{figures['2_workers']['step_s_median'] * 1e3:.1f} ms (x{ratio:.2f}), {params / 1e6:.2f} M parameters, "
          f"per-worker batch {args.batch}, {os.cpu_count()} CPUs")
    save("ddp_overhead", {"args": vars(args), "params": params, "ratio_2_vs_1": ratio, **figures})


if __name__ == "__main__":
    main()
