"""Ray: connect or start, submit each job with its resources, wait, propagate errors.

The workflow's `onstart` calls `start_session()`: with RAY_ADDRESS set it only
checks that cluster; without it, it starts a private local cluster (its own temp
dir, no dashboard) and exports its address, so every job of this run, in any
process, goes to it; `stop_session()` at the end stops exactly that cluster.

`run_job` wraps `jobs.run` in a Ray task and `tracking` in an MLflow run.
Training code never imports Ray: only this module does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import traceback
from typing import Optional

from . import tracking
from .config import JobConfig, from_dict, to_dict
from .io import write_json

_PRIVATE_ENV = "VITABLATE_PRIVATE_RAY"  # set while a private cluster started by this run is up


class JobFailed(RuntimeError):
    """A job raised or its worker died for good; the message carries the cause."""


def _ray():
    import ray

    return ray


def connect(address: Optional[str] = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS) unless this process already has."""
    ray = _ray()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise RuntimeError(
            "no Ray cluster to submit to: set RAY_ADDRESS to a cluster's address, "
            "or run through `snakemake`, which starts a private local cluster"
        )
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except Exception as e:
        raise RuntimeError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address!r} ({type(e).__name__}: {e}); "
            "check the address (`ray status` on the head node) or unset RAY_ADDRESS to run locally"
        ) from e


def start_session(num_cpus: Optional[int] = None, num_gpus: Optional[int] = None) -> str:
    """Connect to RAY_ADDRESS, or start a private local cluster; returns its address."""
    ray = _ray()
    if os.environ.get("RAY_ADDRESS"):
        connect()
        return os.environ["RAY_ADDRESS"]
    # short path: Ray's unix sockets live under the temp dir and must stay < 108 bytes
    temp_dir = tempfile.mkdtemp(prefix="vtr", dir="/tmp")
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             _temp_dir=temp_dir, log_to_driver=False, logging_level="ERROR")
    address = ray.get_runtime_context().gcs_address
    os.environ["RAY_ADDRESS"] = address  # jobs in spawned processes join this cluster
    os.environ[_PRIVATE_ENV] = temp_dir
    return address


def stop_session() -> None:
    """Stop the private cluster started by `start_session` (an external one is left running)."""
    ray = _ray()
    temp_dir = os.environ.pop(_PRIVATE_ENV, None)
    if ray.is_initialized():
        ray.shutdown()
    if temp_dir:
        os.environ.pop("RAY_ADDRESS", None)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _execute(cfg_dict: dict, uri: Optional[str], run_id: Optional[str]) -> dict:
    """Body of the Ray task: rebuild the config, run the job, note where it ran."""
    from . import jobs

    cfg = from_dict(JobConfig, cfg_dict)
    on_epoch = tracking.EpochLogger(uri, run_id) if uri and run_id else None
    record = jobs.run(cfg, on_epoch)
    try:
        import ray

        ctx = ray.get_runtime_context()
        record["ray_node_id"] = ctx.get_node_id()
        record["ray_gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # running outside Ray (tests call _execute directly)
        pass
    return record


def _unwrap(e: BaseException) -> str:
    """The user's error, not Ray's wrapper around it."""
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(e).__name__}: {e}"


def submit(cfg: JobConfig, uri: Optional[str], run_id: Optional[str]):
    """Submit one job as a Ray task with the resources its config asks for; returns the ObjectRef."""
    ray = _ray()
    ex = cfg.execution
    task = ray.remote(_execute).options(
        num_cpus=ex.num_cpus, num_gpus=ex.num_gpus, max_retries=ex.max_retries, retry_exceptions=False,
        name=f"{cfg.question}:{os.path.basename(cfg.output_dir.rstrip('/'))}",
    )
    return task.remote(to_dict(cfg), uri, run_id)


def run_job(cfg: JobConfig, record_path: str, uri: Optional[str] = None) -> dict:
    """Run one job on the Ray cluster inside an MLflow run; write its record atomically.

    uri: the MLflow tracking URI (None: no tracking). Raises JobFailed with the job's
    own error; the MLflow run then ends FAILED and nothing another job finished is touched.
    """
    connect()
    ray = _ray()
    cfg_dict = to_dict(cfg)
    track = uri is not None
    run_id = tracking.start_run(uri, cfg_dict, run_name=_run_name(cfg)) if track else None
    try:
        record = ray.get(submit(cfg, uri, run_id))
    except BaseException as e:
        message = _unwrap(e)
        if track:
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            tracking.fail_run(uri, run_id, message + "\n" + traceback.format_exc(), status)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise JobFailed(f"job {cfg.output_dir} failed: {message}") from None
    record["mlflow_run_id"] = run_id
    write_json(os.path.join(cfg.output_dir, "config.json"), cfg_dict)
    write_json(record_path, record)
    if track:
        files = tuple(record[k] for k in ("analysis_path",) if record.get(k))
        tracking.finish_run(uri, run_id, record, artifacts=files)
    return record


def _run_name(cfg: JobConfig) -> str:
    parts = [cfg.data.name, cfg.mixer] + [str(v) for k, v in sorted(cfg.tags.items()) if k != "question"]
    return "-".join(parts + [f"s{cfg.seed}"])
