"""Task submission: run one job as a Ray task with its resources, inside an MLflow run; wait; propagate errors.

`run_job` checks that some node can hold the job (`check_resources`), submits `_execute` (the
task's body: `jobs.run` inside an MLflow attempt) and writes the record. Training code never
imports Ray: only this module and `vitablate.cluster` (the cluster's lifecycle) do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import traceback
from typing import Callable, Optional

from . import tracking, train_launch
from .cluster import _PRIVATE_ENV, _ray, connect
from .config import JobConfig, from_dict, replace_checkpoints, to_dict
from .io import write_json

_remote_execute = None  # ray.remote(_execute), made on first submit
# what a job leaves in its output_dir for other jobs to read (probe.pt: a linear probe's head, Q2's or Q3's, which
# its shift job applies)
CHECKPOINTS = ("encoder.pt", "model.pt", "probe.pt")
# record fields naming files the report rules read on the Snakemake host (logged as run artifacts)
HOST_OUTPUTS = ("analysis_path", "attention_maps_path")


class JobFailed(RuntimeError):
    """A job raised or its worker died for good; the message carries the cause."""



def _fetch_checkpoints(uri: str, cfg: JobConfig, sources: dict[str, str]) -> tuple[JobConfig, dict]:
    """No shared filesystem: download each checkpoint the job reads from the MLflow run that uploaded it.

    sources: {checkpoint path as the config names it: producing run id}. Returns the config
    rewritten to read the downloaded copies (under output_dir/inputs/<run id>/) and
    {path: the artifact it came from}, which the record keeps.
    """
    local, fetched = {}, {}
    for path, run_id in sources.items():
        name = os.path.basename(path)
        artifact = f"{tracking.CHECKPOINT_DIR}/{name}"
        try:
            local[path] = tracking.fetch_artifact(uri, run_id, artifact, os.path.join(cfg.output_dir, "inputs", run_id,
                                                                                      name))
        except RuntimeError as e:
            raise RuntimeError(
                f"cannot download {artifact} of MLflow run {run_id} (the job that wrote {path}) from {uri}: {e}. "
                "If that job ran with execution.shared_fs true, its checkpoint was never uploaded: re-run it "
                "(snakemake --forcerun <its rule>)") from e
        fetched[path] = f"runs:/{run_id}/{artifact}"
    return replace_checkpoints(cfg, local), fetched


def placement() -> dict:
    """Where this process runs: Ray node id and IP and the GPU ids Ray gave the task ({} outside Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return {}
        return {"ray_node_id": ray.get_runtime_context().get_node_id(),
                "ray_node_ip": ray.util.get_node_ip_address(),
                "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    except Exception:  # running outside Ray (tests call _execute directly)
        return {}


def where(record: dict) -> str:
    """'on node 10.0.0.5 (1a2b3c4d) gpus [0]' from a placement or a run record."""
    if not record.get("ray_node_id"):
        return f"on {record.get('host') or socket.gethostname()} (not in Ray)"
    return (f"on node {record.get('ray_node_ip')} ({str(record['ray_node_id'])[:8]}) "
            f"gpus [{', '.join(record.get('ray_gpu_ids') or [])}]")


@contextlib.contextmanager
def job_log(path: Optional[str]):
    """Append this job's `vitablate` log records (its start, its per-epoch progress) to `path`, the
    rule's log file; the worker writes it directly, so results_dir must be on a shared filesystem."""
    if not path:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("vitablate")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:  # Ray reuses worker processes: the next task must not write into this log
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def _enter_submitter_dir(cwd: Optional[str], cfg_dict: dict) -> None:
    """Run the job in the directory it was submitted from (the workflow's, where Snakemake runs), against which its
    relative paths (results_dir, data_root, the checkpoints it reads) are written. A private cluster's workers
    start there anyway; those of a cluster at RAY_ADDRESS start wherever its `ray start` ran, and a relative
    results_dir's checkpoints went there, out of the workflow's sight."""
    if not cwd or os.getcwd() == cwd:
        return
    if os.path.isdir(cwd):
        os.chdir(cwd)
    elif cfg_dict["execution"]["shared_fs"] and not os.path.isabs(cfg_dict["output_dir"]):
        raise RuntimeError(
            f"this job's paths ({cfg_dict['output_dir']}) are relative to the workflow directory {cwd}, which node "
            f"{placement().get('ray_node_ip', socket.gethostname())} does not have; with execution.shared_fs true "
            "every node must see the results: make results_dir (and data_root) absolute paths on a filesystem every "
            "node mounts")


def _execute(cfg_dict: dict, uri: Optional[str], run_name: str = "", sources: Optional[dict] = None,
             log_path: Optional[str] = None, system_metrics_s: Optional[float] = None,
             cwd: Optional[str] = None) -> dict:
    """Body of the Ray task: one attempt of the job, tracked as its own MLflow run.

    Tracking happens here, where the job runs, so that an attempt whose worker dies leaves a
    RUNNING run that the next attempt (Ray's retry) marks KILLED before resuming.
    With execution.shared_fs false, the checkpoints the job reads are downloaded first (`sources`),
    and those it leaves for other jobs are uploaded before its run ends FINISHED.
    log_path: the rule's log file, where the job's start and per-epoch progress lines go.
    system_metrics_s: sample MLflow system metrics into the run at this interval (None: off).
    cwd: the submitter's working directory, which the job's relative paths are relative to.
    """
    _enter_submitter_dir(cwd, cfg_dict)
    cfg = from_dict(JobConfig, cfg_dict)
    # a dry job's worker never imports torch (vitablate.dry); a real one imports it here, before its start line
    if cfg.execution.dry_jobs:
        from .dry import noop as run
    else:
        from .jobs import run
    if train_launch.launches_group(cfg):  # execution.workers > 1: this task launches Ray Train's worker group
        return train_launch.run_group(cfg_dict, uri, run_name, sources, log_path, system_metrics_s)
    placed = placement()
    with job_log(log_path):
        logging.getLogger("vitablate.jobs").info(f"[vitablate] {cfg.job} {cfg.output_dir} {where(placed)} "
                                                 f"pid {os.getpid()}")
        run_id = tracking.start_attempt(uri, cfg_dict, run_name) if uri else None
        try:
            if not cfg.execution.shared_fs and not uri:
                raise RuntimeError("execution.shared_fs is false, so checkpoints travel through the MLflow artifact "
                                   "store, but this job has no tracking URI; set MLFLOW_TRACKING_URI to an http(s) "
                                   "MLflow server")
            cfg, fetched = _fetch_checkpoints(uri, cfg, sources) if sources else (cfg, {})
            monitor = (tracking.system_metrics(uri, run_id, system_metrics_s) if run_id and system_metrics_s
                       else contextlib.nullcontext())
            with monitor:
                record = run(cfg, tracking.EpochLogger(uri, run_id) if run_id else None)
            if fetched:
                record["checkpoint_sources"] = fetched
            if run_id and not cfg.execution.shared_fs:
                produced = [os.path.join(cfg.output_dir, n) for n in CHECKPOINTS
                            if os.path.exists(os.path.join(cfg.output_dir, n))]
                if produced:
                    record["checkpoint_artifacts"] = tracking.log_checkpoints(uri, run_id, produced)
        except BaseException as e:
            if run_id:
                _end_failed_run(uri, run_id, e)
            raise
    record["mlflow_run_id"] = run_id
    record |= placed
    record |= train_launch.group_record()  # every rank's node and devices, in a worker group
    write_json(os.path.join(cfg.output_dir, "config.json"), cfg_dict)
    if run_id:
        files = tuple(record[k] for k in HOST_OUTPUTS if record.get(k))
        tracking.finish_run(uri, run_id, record, artifacts=files)
    return record


def _end_failed_run(uri: str, run_id: str, error: BaseException) -> None:
    """End the job's run FAILED with its error; if that fails too (the disk that broke the job holds the store),
    say so beside the job's own error, which stays the one raised."""
    try:
        tracking.fail_run(uri, run_id, f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
    except Exception as e:
        logging.getLogger("vitablate.jobs").warning(f"[vitablate] could not end MLflow run {run_id} FAILED ({e}); "
                                                    "the workflow's onerror ends it")
        error.add_note(f"(ending its MLflow run {run_id} failed too: {e})")


def unschedulable(num_cpus: float, num_gpus: float) -> Optional[str]:
    """None when some alive node of the cluster has the CPUs and GPUs a job asks for, else what it offers.

    Ray would keep such a task pending forever (or until an autoscaler adds a node that fits)."""
    nodes = _alive_node_resources()
    if any(r.get("CPU", 0) >= num_cpus and r.get("GPU", 0) >= num_gpus for r in nodes):
        return None
    short = [f"execution.num_cpus is {num_cpus:g}" if not any(r.get("CPU", 0) >= num_cpus for r in nodes) else "",
             f"execution.num_gpus is {num_gpus:g}" if not any(r.get("GPU", 0) >= num_gpus for r in nodes) else ""]
    offers = "; ".join(f"{r.get('CPU', 0):g} CPUs and {r.get('GPU', 0):g} GPUs" for r in nodes) or "no alive node"
    return (f"{' and '.join(x for x in short if x) or 'execution.num_cpus with execution.num_gpus'}, but no node of "
            f"the Ray cluster has that much (its nodes offer: {offers})")


def _alive_node_resources(wait_s: float = 60.0) -> list[dict]:
    """The resources of every alive node. Right after `ray start` the head node may not have registered its
    resources yet (seen on a loaded machine): wait for a node to appear, then take what it offers."""
    deadline = time.monotonic() + wait_s
    while True:
        nodes = [n.get("Resources") or {} for n in _ray().nodes() if n.get("Alive")]
        if any(nodes) or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


def check_resources(cfg: JobConfig) -> Optional[str]:
    """Before submitting: on the private cluster a request no node can hold is an error (it would wait forever);
    on an external cluster (RAY_ADDRESS), which an autoscaler may grow, it is a warning, returned for repeating."""
    problem = unschedulable(cfg.execution.num_cpus, cfg.execution.num_gpus)
    if problem is None:
        return None
    if os.environ.get(_PRIVATE_ENV):
        raise JobFailed(f"job {cfg.output_dir} cannot start: {problem}. Lower it in the config, or give the "
                        "private cluster more (snakemake --cores N sets its CPUs; GPUs are those of this machine), "
                        "or run on a cluster that has them (RAY_ADDRESS)")
    return f"job {cfg.output_dir} is pending: {problem}; waiting for the cluster (an autoscaler) to add such a node"


def _warn_pending(message: str, log_path: Optional[str]) -> None:
    """A warning for the dispatcher's log and the job's own log file (where the user looks while a job waits)."""
    logging.getLogger("vitablate").warning(f"[vitablate] warning: {message}")
    if log_path:
        with contextlib.suppress(OSError), open(log_path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [vitablate] warning: {message}\n")


def _unwrap(e: BaseException) -> str:
    """The user's error, not Ray's wrapper around it."""
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(e).__name__}: {e}"


def submit(cfg: JobConfig, uri: Optional[str], sources: Optional[dict] = None, log_path: Optional[str] = None,
           system_metrics_s: Optional[float] = None):
    """Submit one job as a Ray task with the resources its config asks for; returns the ObjectRef.

    sources: {checkpoint path: producing MLflow run id} to download first (execution.shared_fs false).

    max_retries re-runs the task when its worker process dies (a system failure); an
    exception raised by the job itself is not retried: it would fail again the same way.
    """
    global _remote_execute
    if _remote_execute is None:  # once per driver: each ray.remote() pickles and exports the function anew
        _remote_execute = _ray().remote(_execute)
    ex = cfg.execution
    task = _remote_execute.options(
        **train_launch.task_options(cfg), max_retries=ex.max_retries, retry_exceptions=False,
        name=f"{cfg.question}:{os.path.basename(cfg.output_dir.rstrip('/'))}",
    )
    return task.remote(to_dict(cfg), uri, _run_name(cfg), sources, log_path, system_metrics_s, os.getcwd())


PENDING_WARNING_S = 60.0  # while a job no node can hold stays pending on an external cluster, warn this often


def _wait(ref, cancelled: Optional[Callable[[], bool]], pending: Optional[Callable[[], Optional[str]]] = None):
    """ray.get, but give up (cancel the task, raise KeyboardInterrupt) once `cancelled()` is true, and while
    `pending()` returns a message (the request fits no node), repeat it every PENDING_WARNING_S seconds."""
    ray = _ray()
    if cancelled is None and pending is None:
        return ray.get(ref)
    next_warning = time.monotonic() + PENDING_WARNING_S
    while not ray.wait([ref], timeout=0.5)[0]:
        if cancelled is not None and cancelled():
            ray.cancel(ref, force=True)
            raise KeyboardInterrupt("the job's Snakemake process went away")
        if pending is not None and time.monotonic() >= next_warning:
            next_warning = time.monotonic() + PENDING_WARNING_S
            pending()
    return ray.get(ref)


def run_job(cfg: JobConfig, record_path: str, uri: Optional[str] = None, sources: Optional[dict] = None,
            log_path: Optional[str] = None, system_metrics_s: Optional[float] = None,
            cancelled: Optional[Callable[[], bool]] = None) -> dict:
    """Run one job on the Ray cluster (tracked in MLflow when `uri` is given); write its record atomically.

    log_path: a file the job appends its start (node, GPUs) and per-epoch progress to.
    system_metrics_s: log MLflow system metrics into the job's run at this interval (None: off).
    Raises JobFailed with the job's own error. Whatever happened, the job's MLflow run does
    not stay RUNNING, and nothing another job finished is touched. `cancelled` (polled while
    waiting) lets the dispatcher drop a job whose Snakemake process is gone.
    """
    connect()
    log_path = log_path and os.path.abspath(log_path)
    waiting = check_resources(cfg)  # raises on the private cluster; a message on an external one
    pending = None
    if waiting:
        _warn_pending(waiting, log_path)

        def pending() -> Optional[str]:
            message = check_resources(cfg)
            if message:
                _warn_pending(message, log_path)
            return message
    try:
        record = _wait(submit(cfg, uri, sources, log_path, system_metrics_s), cancelled, pending)
    except BaseException as e:
        message = _unwrap(e)
        # the worker died on its last attempt, or we were interrupted: end its run
        tracking.end_latest(uri, cfg.output_dir, message, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if isinstance(e, KeyboardInterrupt):
            raise
        raise JobFailed(f"job {cfg.output_dir} failed: {message}") from None
    write_json(record_path, record)
    return record


def _run_name(cfg: JobConfig) -> str:
    parts = [cfg.data.name] + [str(v) for k, v in sorted(cfg.tags.items()) if k not in ("question", "dataset", "job")]
    return "-".join(parts + [f"s{cfg.seed}"])
