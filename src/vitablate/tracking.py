"""MLflow: one experiment per question, one run per job.

A run holds the flattened resolved config as params, per-epoch metrics, the tags
DESIGN.md fixes (question, dataset, mixer, pretext, method, teacher, seed, job),
and the run record and resolved config as artifacts. A job that fails ends its
run FAILED with the error as a tag and an artifact: never silently missing.

All calls go through `MlflowClient` with explicit run ids (thread-safe, no
global active run) and retry briefly when SQLite reports a lock, so many jobs
can log to the default store at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import tempfile
import threading
import time
from typing import Any, Callable, TypeVar

from .config import flatten

TAG_KEYS = ("question", "dataset", "mixer", "pretext", "method", "teacher", "seed", "job")
_lock = threading.Lock()  # one writer per process: SQLite serialises writers anyway
T = TypeVar("T")


def default_uri(results_dir: str = "results") -> str:
    """MLFLOW_TRACKING_URI if set, else SQLite under the results directory (absolute path)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{os.path.abspath(os.path.join(results_dir, 'mlflow.db'))}"


@contextlib.contextmanager
def _store_lock(uri: str):
    """Across processes: a new SQLite store migrates its schema on first use, and two
    processes migrating at once corrupt it ('duplicate column'); serialise that first use."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = os.path.abspath(uri[len("sqlite:///"):])
    os.makedirs(os.path.dirname(db), exist_ok=True)
    with open(db + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_ready: set[str] = set()


def client(uri: str):
    """An MlflowClient whose store exists and is migrated (once per process and URI)."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    if uri not in _ready:
        with _store_lock(uri):
            c.search_experiments(max_results=1)  # forces creation / migration of the store
        _ready.add(uri)
    return c


def prepare(uri: str, experiments: list[str]) -> None:
    """Create the store and the experiments before jobs start (called by the workflow's onstart)."""
    c = client(uri)
    with _store_lock(uri):
        for name in experiments:
            retry(lambda: experiment_id(c, name), f"create experiment {name}")


def retry(fn: Callable[[], T], what: str, attempts: int = 8) -> T:
    """Retry transient store errors (SQLite 'database is locked', a server hiccup)."""
    for i in range(attempts):
        try:
            with _lock:
                return fn()
        except Exception as e:  # MlflowException wraps sqlalchemy's OperationalError
            text = str(e).lower()
            transient = "locked" in text or "busy" in text or "temporarily" in text or "connection" in text
            if not transient or i == attempts - 1:
                raise RuntimeError(f"MLflow {what} failed: {e}") from e
            time.sleep(0.05 * 2**i * (1 + random.random()))
    raise AssertionError("unreachable")


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go beside the database (results/mlartifacts); servers decide their own."""
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(os.path.abspath(uri[len("sqlite:///"):])), "mlartifacts")
    return None


def experiment_id(c, name: str) -> str:
    """Get or create the experiment (another job may create it at the same moment)."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(c.tracking_uri)
    try:
        return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    except Exception:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def job_tags(cfg: dict) -> dict[str, str]:
    """The fixed tag set, from the resolved config (absent ones are left out)."""
    tags = {"question": cfg["question"], "job": cfg["job"], "seed": str(cfg["seed"]),
            "dataset": cfg["data"]["name"], "mixer": cfg.get("mixer")}
    tags.update(cfg.get("tags") or {})
    return {k: str(v) for k, v in tags.items() if v is not None and k in TAG_KEYS}


def start_run(uri: str, cfg: dict, run_name: str | None = None) -> str:
    """Create the job's run (RUNNING) with its params and tags; returns the run id."""
    from mlflow.entities import Param

    c = client(uri)
    exp = retry(lambda: experiment_id(c, cfg["question"]), "experiment lookup")
    run = retry(lambda: c.create_run(exp, tags=job_tags(cfg), run_name=run_name), "create_run")
    params = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(cfg).items())]
    for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
        retry(lambda: c.log_batch(run.info.run_id, params=params[i:i + 100]), "log params")
    return run.info.run_id


def _metrics(values: dict[str, Any], step: int):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"]


class EpochLogger:
    """Picklable per-epoch metric logger handed to the job (runs inside the Ray worker)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def __call__(self, epoch: int, metrics: dict) -> None:
        c = client(self.uri)
        retry(lambda: c.log_batch(self.run_id, metrics=_metrics(metrics, epoch)), "log epoch metrics")


def _log_json_artifact(c, run_id: str, name: str, obj: Any) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        with open(path, "w") as f:
            json.dump(obj, f, indent=1, default=str)
        retry(lambda: c.log_artifact(run_id, path), f"log artifact {name}")


def finish_run(uri: str, run_id: str, record: dict, artifacts: tuple[str, ...] = ()) -> None:
    """Final metrics, the record and config as artifacts, then FINISHED."""
    c = client(uri)
    summary = {k: v for k, v in record.items()
               if k.startswith(("top1", "params_m", "train_s", "wall_s", "shape_bias", "final_loss", "cue_conflict"))}
    retry(lambda: c.log_batch(run_id, metrics=_metrics(summary, record.get("epochs", 0))), "log final metrics")
    _log_json_artifact(c, run_id, "record.json", {k: v for k, v in record.items() if k != "config"})
    _log_json_artifact(c, run_id, "config.json", record.get("config", {}))
    for path in artifacts:
        if os.path.exists(path):
            retry(lambda: c.log_artifact(run_id, path), f"log artifact {path}")
    retry(lambda: c.set_terminated(run_id, "FINISHED"), "end run")


def fail_run(uri: str, run_id: str, error: str, status: str = "FAILED") -> None:
    """End the run FAILED (or KILLED for an interruption) with the error kept as tag and artifact."""
    c = client(uri)
    retry(lambda: c.set_tag(run_id, "error", error[:5000]), "tag error")
    try:
        _log_json_artifact(c, run_id, "error.json", {"error": error})
    finally:
        retry(lambda: c.set_terminated(run_id, status), "end run")
