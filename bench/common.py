"""Shared helpers for benchmarks: timing side by side, saving JSON figures."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch_threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, sync: Callable[[], None] = lambda: None) -> dict:
    """Time each fn once per round, alternating order, so drift and noise hit all alike.

    Returns per-name median and all samples (seconds per call).
    """
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "samples_s": v} for k, v in samples.items()}


def save(name: str, figures: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"benchmark": name, "machine": machine(), **figures}, f, indent=1)
    print(f"saved {path}")
    return path
