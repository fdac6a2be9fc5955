"""Orchestration overhead on this machine: what Snakemake, Ray and MLflow cost around a job.

1. per-job overhead around a job that trains nothing (execution.dry_jobs): the slope of the
   wall time of `snakemake --cores 1` over the number of jobs (startup cancels out); goal < 1.5 s;
2. `snakemake -n` on a 1,000-job grid; goal < 5 s;
3. aggregating 10,000 run records into the architecture table; goal < 1 s;
4. what the report's training curves cost per record (two metric histories read from SQLite).

    python bench/bench_orchestration.py [--small 4 --large 36 --rounds 2]
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

from common import interleaved, save

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


def per_job_overhead(small: int, large: int, rounds: int) -> dict:
    """Slope of the wall time over the number of dry jobs; each size run `rounds` times, alternating."""
    def run(n: int):
        def go() -> None:
            with tempfile.TemporaryDirectory() as d:
                wf = workflow_copy(Path(d))
                set_config(wf, ["identity"], list(range(n)))
                timed([sys.executable, "-m", "snakemake", "--cores", "1", "architecture"], wf)
        return go

    t = interleaved({small: run(small), large: run(large)}, rounds)
    slope = (t[large]["median_s"] - t[small]["median_s"]) / (large - small)
    # startup: Ray cluster and dispatcher start, the report job, Ray's stop (paid once per run)
    return {"jobs": [small, large], "wall_s": {n: t[n]["samples_s"] for n in (small, large)}, "per_job_s": slope,
            "startup_s": t[small]["median_s"] - slope * small, "goal_s": 1.5}


def curves_per_record(n: int = 1000, epochs: int = 25) -> dict:
    """The report's training curves: two metric histories per record read back from a SQLite MLflow
    store (aggregate.load_curves + curve_table). Not part of the table goal; measured to say what it costs."""
    from mlflow.entities import Metric

    from vitablate import tracking
    from vitablate.aggregate import curve_table, load_curves

    with tempfile.TemporaryDirectory() as d:
        uri = f"sqlite:///{d}/mlflow.db"
        c = tracking.client(uri)
        exp = c.create_experiment("architecture")
        paths = []
        for i in range(n):
            run = c.create_run(exp).info.run_id
            c.log_batch(run, metrics=[Metric(m, 1.0 / (e + 1), 0, e + 1) for e in range(epochs)
                                      for m in ("train_loss", "top1_val")])
            p = Path(d) / f"{i}.json"
            p.write_text(json.dumps({"dataset": "digits", "mixer": f"m{i % 5}", "seed": i // 5, "mlflow_run_id": run}))
            paths.append(str(p))
        t0 = time.perf_counter()
        table = curve_table(load_curves(paths, uri, ["dataset", "mixer"], ["train_loss", "top1_val"]),
                            ["dataset", "mixer"])
        wall = time.perf_counter() - t0
    assert table.height == 5 * 2 * epochs
    return {"records": n, "wall_s": wall, "per_record_ms": wall / n * 1000}


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
    p.add_argument("--rounds", type=int, default=2, help="runs of each grid size (median)")
    args = p.parse_args()
    out = {"aggregate_10000": aggregate_10000()}
    print("aggregate 10,000 records:", f"{out['aggregate_10000']['wall_s']:.2f} s (goal < 1 s)")
    out["dry_run_1000"] = dry_run_1000()
    print("snakemake -n, 1,000 jobs:", f"{out['dry_run_1000']['wall_s']:.2f} s (goal < 5 s)")
    out["per_job_overhead"] = per_job_overhead(args.small, args.large, args.rounds)
    print("per-job overhead (Snakemake + Ray + MLflow, dry job):",
          f"{out['per_job_overhead']['per_job_s']:.2f} s (goal < 1.5 s);",
          f"startup {out['per_job_overhead']['startup_s']:.1f} s per run", out["per_job_overhead"]["wall_s"])
    out["curves"] = curves_per_record()
    print(f"training curves from MLflow (SQLite), {out['curves']['records']} records:",
          f"{out['curves']['wall_s']:.2f} s = {out['curves']['per_record_ms']:.1f} ms per record")
    save("orchestration", out)


if __name__ == "__main__":
    main()
