"""A dry job (execution.dry_jobs) and the fields every job's record starts with. Imports no torch: a Ray worker
that only runs dry jobs (orchestration benchmarks, cluster smoke tests, the tests of faults) starts in about a second
instead of spending seconds of CPU importing torch and timm."""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, Optional

from . import __version__
from .config import JobConfig, to_dict


def base_record(cfg: JobConfig) -> dict:
    return {
        "question": cfg.question, "job": cfg.job, "dataset": cfg.data.name, "mixer": cfg.mixer,
        "seed": cfg.seed, "model": cfg.model.variant or "custom", "vitablate_version": __version__,
        "host": socket.gethostname(), "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "config": to_dict(cfg),
    }


def noop(cfg: JobConfig, on_epoch: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Trains nothing (execution.dry_jobs): measures the orchestration around a job, shows placement."""
    start = time.time()
    if cfg.execution.dry_job_sleep_s:
        time.sleep(cfg.execution.dry_job_sleep_s)
    if on_epoch is not None:
        on_epoch(1, {"epoch": 1, "train_loss": 0.0})
    return base_record(cfg) | {"history": [{"epoch": 1}], "top1_test": 0.0, "top1_val": 0.0, "params_m": 0.0,
                               "start_time": start, "end_time": time.time(), "dry": True}
