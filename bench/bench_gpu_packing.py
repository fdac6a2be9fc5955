"""Packing tiny runs on one GPU: a grid with `num_gpus: 0.25` against the same grid with `num_gpus: 1`.

Tiny runs (vit_digits, 8x8 digits held on the GPU) leave a GPU mostly idle: one run per GPU
wastes it. With 0.25 Ray places four runs on the GPU at once. The figure is runs per hour
of the whole workflow (`snakemake --cores N architecture`, Ray and MLflow included), each
setting on the same GPU in one invocation, alternating order. Goal: packed >= 3x unpacked.

Needs CUDA; prints why and exits 0 without one (`--allow-cpu` runs it anyway against one
*declared* GPU, to check the script itself on a laptop; its figures mean nothing).

    python bench/bench_gpu_packing.py [--jobs 16] [--epochs 30] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from bench_orchestration import timed, workflow_copy
from common import interleaved, save

MIXERS = ["attention", "feedforward", "attention_only", "pooling", "identity"]


def grid_config(wf: Path, jobs: int, epochs: int, num_gpus: float, num_cpus: float) -> int:
    """Write the grid into the workflow copy `wf`; returns its number of jobs."""
    cfg = yaml.safe_load((wf / "config/config.yaml").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("pretext", "transfer")}
    seeds = -(-jobs // len(MIXERS))
    cfg["architecture"].update(mixers=MIXERS, seeds=list(range(seeds)))
    cfg["architecture"]["train"]["epochs"] = epochs
    cfg["execution"].update(num_gpus=num_gpus, num_cpus=num_cpus)
    (wf / "config/config.yaml").write_text(yaml.safe_dump(cfg))
    return seeds * len(MIXERS)


def run_grid(jobs: int, epochs: int, num_gpus: float, num_cpus: float, cores: int) -> int:
    """The whole workflow over the grid, in a fresh copy; returns the number of runs."""
    with tempfile.TemporaryDirectory() as d:
        wf = workflow_copy(Path(d))
        n = grid_config(wf, jobs, epochs, num_gpus, num_cpus)
        timed([sys.executable, "-m", "snakemake", "--cores", str(cores), "architecture"], wf)
    return n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=20)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--allow-cpu", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA device: bench_gpu_packing needs a GPU (use --allow-cpu to check the script)")
        return
    from vitablate.execution import start_session, stop_session

    # One Ray cluster for both settings with exactly one GPU, so that 0.25 means 4 per GPU.
    os.environ.pop("RAY_ADDRESS", None)
    cpus = os.cpu_count() or 4
    start_session(num_cpus=cpus, num_gpus=1, dispatcher=False)  # each snakemake run starts its own
    settings = {"1": dict(num_gpus=1.0, num_cpus=1), "0.25": dict(num_gpus=0.25, num_cpus=max(1, cpus // 4))}
    runs: dict[str, int] = {}

    def grid(name: str):
        def go() -> None:
            runs[name] = run_grid(args.jobs, args.epochs, cores=cpus, **settings[name])
        return go

    try:
        timing = interleaved({name: grid(name) for name in settings}, args.rounds)  # alternating order
    finally:
        stop_session()
    rate = {name: runs[name] / timing[name]["median_s"] * 3600 for name in settings}
    for name in settings:
        print(f"num_gpus={name}: {runs[name]} runs in {timing[name]['median_s']:.1f} s = {rate[name]:.0f} runs/h")
    ratio = rate["0.25"] / rate["1"]
    print(f"packing 0.25 vs 1: {ratio:.2f}x more runs per hour (goal >= 3x)")
    save("gpu_packing" if torch.cuda.is_available() else "gpu_packing_cpu_check",
         {"runs": runs, "wall_s": timing, "runs_per_hour": rate, "ratio": ratio, "goal": 3.0, "epochs": args.epochs})


if __name__ == "__main__":
    main()
