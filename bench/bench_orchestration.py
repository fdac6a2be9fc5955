"""Orchestration overhead on this machine: what Snakemake, Ray and MLflow cost around a job.

1. per-job overhead around a job that trains nothing (execution.dry_jobs): the slope of the
   wall time of `snakemake --cores 1` over the number of jobs (startup cancels out); goal < 1.5 s;
2. `snakemake -n` on a 1,000-job grid; goal < 5 s;
3. aggregating 10,000 run records into the architecture table; goal < 1 s.

    python bench/bench_orchestration.py [--small 4 --large 36]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import save

REPO = Path(__file__).resolve().parents[1]


def workflow_copy(dest: Path) -> Path:
    for name in ("Snakefile", "rules", "config", "envs", "reports/captions"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / name)
    return dest


def set_config(wf: Path, mixers: list[str], seeds: list[int], dry: bool = True) -> None:
    cfg = yaml.safe_load((wf / "config/config.yaml").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("pretext", "transfer")}
    cfg["architecture"].update(mixers=mixers, seeds=seeds)
    cfg["execution"]["dry_jobs"] = dry
    (wf / "config/config.yaml").write_text(yaml.safe_dump(cfg))


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stdout[-2000:] + r.stderr[-2000:])
    return time.perf_counter() - t0


def per_job_overhead(small: int, large: int) -> dict:
    walls = {}
    for n in (small, large):
        with tempfile.TemporaryDirectory() as d:
            wf = workflow_copy(Path(d))
            set_config(wf, ["identity"], list(range(n)))
            walls[n] = timed([sys.executable, "-m", "snakemake", "--cores", "1", "architecture"], wf)
    slope = (walls[large] - walls[small]) / (large - small)
    # startup: Ray cluster and dispatcher start, the report job, Ray's stop (paid once per run)
    return {"jobs": list(walls), "wall_s": list(walls.values()), "per_job_s": slope,
            "startup_s": walls[small] - slope * small, "goal_s": 1.5}


def dry_run_1000() -> dict:
    with tempfile.TemporaryDirectory() as d:
        wf = workflow_copy(Path(d))
        set_config(wf, ["attention", "feedforward", "attention_only", "pooling", "identity"], list(range(200)))
        wall = timed([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--quiet", "all"], wf)
    return {"jobs": 1000, "wall_s": wall, "goal_s": 5.0}


def aggregate_10000() -> dict:
    from vitablate.aggregate import architecture_table, load_records

    with tempfile.TemporaryDirectory() as d:
        rng = random.Random(0)
        paths = []
        for i in range(10_000):
            rec = {"question": "architecture", "dataset": "digits", "mixer": f"m{i % 5}", "model": "vit_digits",
                   "seed": i // 5, "params_m": 0.2, "top1_test": rng.uniform(80, 95),
                   "history": [{"epoch": e, "train_loss": 1.0 / (e + 1)} for e in range(25)], "config": {"x": 1}}
            p = Path(d) / f"{i}.json"
            p.write_text(json.dumps(rec))
            paths.append(str(p))
        t0 = time.perf_counter()
        table = architecture_table(load_records(paths))
        wall = time.perf_counter() - t0
    assert table.height == 5
    return {"records": 10_000, "wall_s": wall, "goal_s": 1.0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--small", type=int, default=4)
    p.add_argument("--large", type=int, default=36)
    args = p.parse_args()
    out = {"aggregate_10000": aggregate_10000()}
    print("aggregate 10,000 records:", f"{out['aggregate_10000']['wall_s']:.2f} s (goal < 1 s)")
    out["dry_run_1000"] = dry_run_1000()
    print("snakemake -n, 1,000 jobs:", f"{out['dry_run_1000']['wall_s']:.2f} s (goal < 5 s)")
    out["per_job_overhead"] = per_job_overhead(args.small, args.large)
    print("per-job overhead (Snakemake + Ray + MLflow, dry job):",
          f"{out['per_job_overhead']['per_job_s']:.2f} s (goal < 1.5 s)", out["per_job_overhead"])
    save("orchestration", out)


if __name__ == "__main__":
    main()
