"""MLflow: one experiment per question, one run per job.

A run holds the flattened resolved config as params, per-epoch metrics, the tags
docs/design.md fixes (question, dataset, mixer, pretext, method, teacher, seed, job; eval on a Q2 shift job),
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
import logging
import os
import random
import socket
import tempfile
import threading
import time
from typing import Any, Callable, TypeVar

from .config import flatten
from .io import atomic_path, write_json

CHECKPOINT_DIR = "checkpoints"  # artifact folder of the checkpoints a run hands to other jobs
# MLflow 3's UI opens an experiment by its kind: untagged, it shows the GenAI trace overview ("No data");
# tagged as model development, it opens on the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# eval: a Q2 shift job's (its job tag is "shift", as every shift job's; a Q2 evaluation's own says eval_<name>)
TAG_KEYS = ("question", "dataset", "mixer", "pretext", "method", "teacher", "seed", "job", "eval")
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

    if uri in _ready:
        return MlflowClient(tracking_uri=uri)
    with _store_lock(uri):  # constructing the client already creates / migrates a SQLite store
        c = MlflowClient(tracking_uri=uri)
        c.search_experiments(max_results=1)
    _ready.add(uri)
    return c


def probe(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when a tracking server does not answer (MLflow's client retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    from urllib.parse import urlparse

    u = urlparse(uri)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise RuntimeError(
            f"cannot reach the MLflow tracking server at MLFLOW_TRACKING_URI={uri!r} ({e}); start it "
            "(`mlflow server ...`), fix the URI, or unset MLFLOW_TRACKING_URI to log to results/mlflow.db"
        ) from None


def prepare(uri: str, experiments: list[str]) -> None:
    """Check the store and create the experiments before any job starts (the workflow's onstart)."""
    probe(uri)
    c = client(uri)
    with _store_lock(uri):
        for name in experiments:
            retry(lambda: experiment_id(c, name), f"create experiment {name}")


RETRY_ENV = "VITABLATE_TRACKING_RETRY_S"  # tracking.retry_timeout_s, exported by the workflow's onstart
DEFAULT_RETRY_S = 300.0
log = logging.getLogger("vitablate.tracking")


def configure_retries(timeout_s: float) -> None:
    """Cap how long a call waits for a tracking server that does not answer (tracking.retry_timeout_s).

    MLflow's own HTTP client retries 7 times with growing back-off and a 120 s timeout per try, silently
    (up to half an hour); here MLflow tries once (a server that is down refuses at once; one that hangs times out
    after min(120 s, the cap), a bound on socket silence, not on a large upload) and `retry` below waits, with a
    warning per attempt, until the cap. Exported through the environment, so the dispatcher and the private
    cluster's workers (started after this) inherit it; a user's own MLFLOW_HTTP_REQUEST_* settings are kept.
    """
    os.environ[RETRY_ENV] = f"{timeout_s:g}"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(min(120.0, timeout_s)))))


def retry_budget_s() -> float:
    """How long `retry` waits for a tracking server in all (tracking.retry_timeout_s, from the environment)."""
    return float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))


def _server_down(text: str) -> bool:
    return any(m in text for m in ("connection", "max retries exceeded", "timed out", "timeout", " 502", " 503",
                                   " 504", "temporarily unavailable"))


def retry(fn: Callable[[], T], what: str, attempts: int = 8) -> T:
    """Retry transient store errors: a SQLite lock a few times, quickly; a tracking server that does not answer
    with a warning per attempt, for at most tracking.retry_timeout_s seconds in all."""
    budget = retry_budget_s()
    deadline, i = None, 0
    while True:
        try:
            with _lock:
                return fn()
        except Exception as e:  # MlflowException wraps sqlalchemy's OperationalError
            text = str(e).lower()
            if not _server_down(text):
                transient = "locked" in text or "busy" in text or "temporarily" in text
                if not transient or i >= attempts - 1:
                    raise RuntimeError(f"MLflow {what} failed: {e}") from e
                time.sleep(0.05 * 2**i * (1 + random.random()))
                i += 1
                continue
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + budget
            if now >= deadline:
                raise RuntimeError(f"MLflow {what} failed: the tracking server did not answer for {budget:g} s "
                                   f"(tracking.retry_timeout_s): {str(e)[:300]}") from e
            wait = min(2.0**min(i, 4), deadline - now)
            log.warning(f"[vitablate] MLflow {what}: the tracking server does not answer ({str(e)[:200]}); retrying "
                        f"in {wait:.0f} s, giving up in {deadline - now:.0f} s (tracking.retry_timeout_s)")
            time.sleep(wait)
            i += 1


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go beside the database (results/mlartifacts); servers decide their own."""
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(os.path.abspath(uri[len("sqlite:///"):])), "mlartifacts")
    return None


def experiment_id(c, name: str) -> str:
    """Get or create the experiment (another job may create it at the same moment)."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if any(exp.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):  # a store from an older vitablate
            for k, v in EXPERIMENT_KIND.items():
                c.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    root = artifact_root(c.tracking_uri)
    try:
        return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None, tags=EXPERIMENT_KIND)
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


def start_attempt(uri: str, cfg: dict, run_name: str | None = None) -> str:
    """One MLflow run per attempt of a job; called where the job runs (the Ray worker).

    If the job's previous attempt left its run RUNNING (its worker was killed, or the whole
    workflow was), that run is ended KILLED with a note, and the new run says which attempt
    it is. The marker `<output_dir>/mlflow_run.json` remembers the latest run of the job.
    """
    attempt, previous = 1, latest_run(cfg["output_dir"])
    if previous:
        c = client(uri)
        try:
            status = retry(lambda: c.get_run(previous["run_id"]).info.status, "read previous run")
        except RuntimeError:
            status = None  # another store, or the run was deleted
        if status == "RUNNING":
            attempt = previous.get("attempt", 1) + 1
            note = (f"attempt {attempt - 1} was interrupted (its worker died or the workflow was stopped); "
                    f"attempt {attempt} resumes from the last checkpoint")
            retry(lambda: c.set_tag(previous["run_id"], "interrupted", note), "tag interrupted run")
            retry(lambda: c.set_terminated(previous["run_id"], "KILLED"), "end interrupted run")
    run_id = start_run(uri, cfg, run_name=run_name, extra_tags={"attempt": str(attempt)})
    write_json(os.path.join(cfg["output_dir"], "mlflow_run.json"), {"run_id": run_id, "attempt": attempt, "uri": uri})
    return run_id


def latest_run(output_dir: str) -> dict | None:
    marker = os.path.join(output_dir, "mlflow_run.json")
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        return json.load(f)


def start_run(uri: str, cfg: dict, run_name: str | None = None, extra_tags: dict | None = None) -> str:
    """Create the job's run (RUNNING) with its params and tags; returns the run id."""
    from mlflow.entities import Param

    c = client(uri)
    exp = retry(lambda: experiment_id(c, cfg["question"]), "experiment lookup")
    tags = job_tags(cfg) | (extra_tags or {})
    run = retry(lambda: c.create_run(exp, tags=tags, run_name=run_name), "create_run")
    params = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(cfg).items())]
    for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
        retry(lambda: c.log_batch(run.info.run_id, params=params[i:i + 100]), "log params")
    retry(lambda: c.log_inputs(run.info.run_id, datasets=[dataset_input(cfg)]), "log dataset input")
    return run.info.run_id


def dataset_input(cfg: dict):
    """The run's training data as an MLflow dataset input (the runs table's Dataset column): its name,
    where it is read from, and a digest of the data settings that determine it (the same digest means
    the same images and split)."""
    import hashlib

    from mlflow.entities import Dataset, DatasetInput, InputTag

    data = cfg.get("data") or {}
    name = data.get("name", "unknown")
    bundled = name in ("digits", "shapes")  # generated or shipped with a package: no path to point at
    source = f"vitablate:{name}" if bundled else os.path.abspath(str(data.get("root", "")))
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    dataset = Dataset(name=name, digest=digest, source_type="local" if not bundled else "code", source=source)
    return DatasetInput(dataset=dataset, tags=[InputTag(key="mlflow.data.context", value="train")])


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


@contextlib.contextmanager
def system_metrics(uri: str, run_id: str, interval_s: float):
    """While the block runs, MLflow samples this machine every `interval_s` seconds into the run
    (system/cpu_utilization_percentage, system/system_memory_usage_megabytes, disk, network, and
    system/gpu_* where nvidia-ml-py is installed; NVML reports every GPU of the node, not only the
    job's). The monitor is stopped and flushed before the block returns, so before the run ends."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=uri)
    monitor.start()
    try:
        yield monitor
    finally:
        monitor.finish()


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


def log_checkpoints(uri: str, run_id: str, paths: list[str]) -> dict[str, str]:
    """Upload checkpoints other jobs read (execution.shared_fs false) under checkpoints/;
    returns {file name: artifact URI}."""
    c = client(uri)
    for path in paths:
        retry(lambda p=path: c.log_artifact(run_id, p, CHECKPOINT_DIR), f"upload checkpoint {path}")
    base = retry(lambda: c.get_run(run_id).info.artifact_uri, "read run")
    return {os.path.basename(p): f"{base}/{CHECKPOINT_DIR}/{os.path.basename(p)}" for p in paths}


def fetch_artifact(uri: str, run_id: str, artifact_path: str, dest: str) -> str:
    """Download one artifact of a run to the file `dest`, atomically (a retry never sees half a file)."""
    c = client(uri)
    with atomic_path(dest) as tmp, tempfile.TemporaryDirectory(dir=os.path.dirname(dest) or ".") as d:
        got = retry(lambda: c.download_artifacts(run_id, artifact_path, d), f"download {artifact_path} of run {run_id}")
        os.replace(got, tmp)  # MLflow names the download after the artifact: move it to the temp name
    return dest


def fail_run(uri: str, run_id: str, error: str, status: str = "FAILED") -> None:
    """End the run FAILED (or KILLED for an interruption) with the error kept as tag and artifact."""
    c = client(uri)
    retry(lambda: c.set_tag(run_id, "error", error[:5000]), "tag error")
    try:
        _log_json_artifact(c, run_id, "error.json", {"error": error})
    finally:
        retry(lambda: c.set_terminated(run_id, status), "end run")


def end_if_running(uri: str, run_id: str, error: str, status: str = "FAILED") -> bool:
    """End a run the job could not end itself (its worker died): FAILED with the error, or KILLED. True if it was
    RUNNING."""
    c = client(uri)
    if retry(lambda: c.get_run(run_id).info.status, "read run") == "RUNNING":
        fail_run(uri, run_id, error, status)
        return True
    return False


def end_latest(uri: str | None, output_dir: str, error: str, status: str = "FAILED") -> bool:
    """End the job's latest run (its marker) if still RUNNING (True if it was); an unreachable store is left to the
    next attempt."""
    latest = latest_run(output_dir) if uri else None
    if latest:
        with contextlib.suppress(Exception):
            return end_if_running(uri, latest["run_id"], error, status)
    return False
