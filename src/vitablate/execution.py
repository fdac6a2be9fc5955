"""Ray: connect or start, submit each job with its resources, wait, propagate errors.

The workflow's `onstart` calls `start_session()`: with RAY_ADDRESS set it only
checks that cluster; without it, it starts a private local cluster (its own temp
dir, no dashboard) and exports its address, so every job of this run, in any
process, goes to it; `stop_session()` at the end stops exactly that cluster.

`run_job` wraps `jobs.run` in a Ray task and `tracking` in an MLflow run.
Training code never imports Ray: only this module does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional

from . import tracking, train_launch
from .config import JobConfig, from_dict, replace_checkpoints, to_dict
from .io import write_json

_remote_execute = None  # ray.remote(_execute), made on first submit
_PRIVATE_ENV = "VITABLATE_PRIVATE_RAY"  # set while a private cluster started by this run is up
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps a node on 127.0.0.1 (private cluster)
_WATCHDOG_ENV = "VITABLATE_WATCHDOG"  # "<pid>:<pid file>" of this run's watchdog (vitablate.watchdog)
CHECKPOINTS = ("encoder.pt", "model.pt")  # what a job leaves in its output_dir for other jobs to read
# record fields naming files the report rules read on the Snakemake host (logged as run artifacts)
HOST_OUTPUTS = ("analysis_path", "attention_maps_path")


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
    _probe(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except Exception as e:
        raise RuntimeError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address!r} ({type(e).__name__}: {e}); "
            "check the address (`ray status` on the head node) or unset RAY_ADDRESS to run locally"
        ) from e


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at host:port (ray.init retries for long)."""
    host_port = address.split("://")[-1]
    if host_port in ("auto", "local") or ":" not in host_port:
        return
    host, port = host_port.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise RuntimeError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address!r} ({e}); check the head node's address "
            "(`ray status` there) and that its GCS port is open, or unset RAY_ADDRESS to run locally"
        ) from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_session(num_cpus: Optional[int] = None, num_gpus: Optional[int] = None, timeout_s: float = 90,
                  dispatcher: bool = True, results_dir: Optional[str] = None, locks: tuple[str, ...] = ()) -> str:
    """Connect to RAY_ADDRESS, or start a private local cluster; returns its address.

    The private cluster is a `ray start --head --block` child in its own process group,
    with its own temp dir and port and token authentication on, so that Snakemake's own
    process never becomes a Ray driver (its Ctrl-C handling stays Snakemake's) and
    `stop_session` stops exactly this cluster. A watchdog (vitablate.watchdog) stops the
    cluster and the dispatcher if this process dies without calling `stop_session`; its pid
    file goes under `results_dir` (the next run reaps what a dead run left), and it removes
    `locks` (this Snakemake run's lock files) when it has to stop the run's processes.
    """
    if os.environ.get("RAY_ADDRESS"):
        _probe(os.environ["RAY_ADDRESS"])
        address = os.environ["RAY_ADDRESS"]
        os.environ.pop(_PRIVATE_ENV, None)  # inherited from a parent's session: not ours to stop
    else:
        address = _start_private_cluster(num_cpus, num_gpus, timeout_s)
    if dispatcher:  # for Snakemake's job processes; a caller that submits itself (`vitablate job`) needs none
        _start_dispatcher(timeout_s)
    if os.environ.get(_PRIVATE_ENV) or os.environ.get(_dispatcher_env()):
        _start_watchdog(results_dir, locks)
    return address


def _dispatcher_env() -> str:
    from .dispatcher import ENV

    return ENV


def _start_watchdog(results_dir: Optional[str], locks: tuple[str, ...]) -> None:
    """Start this run's watchdog (vitablate.watchdog) on this process, with the pid file naming what it started."""
    from . import watchdog

    info = {"snakemake_pid": os.getpid(), "snakemake_create_time": watchdog.create_time(os.getpid()),
            "snakemake_locks": [os.path.abspath(p) for p in locks], "results_dir": results_dir}
    private, disp = os.environ.get(_PRIVATE_ENV), os.environ.get(_dispatcher_env())
    if private:
        pid, temp_dir = private.split(":", 1)
        info["ray"] = {"pid": int(pid), "dir": temp_dir}
    if disp:
        pid, path = disp.split(":", 1)
        info["dispatcher"] = {"pid": int(pid), "dir": os.path.dirname(path)}
    path = (watchdog.pid_file(results_dir, os.getpid()) if results_dir
            else os.path.join(info.get("dispatcher", info.get("ray"))["dir"], "owner.json"))
    watchdog.write_pid_file(path, info)
    with open(os.path.splitext(path)[0] + ".log", "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vitablate.watchdog", path], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    os.environ[_WATCHDOG_ENV] = f"{proc.pid}:{path}"


def _stop_watchdog() -> None:
    """stop_session: end the watchdog first (it must not mistake the orderly stop for a crash), drop the pid file."""
    entry = os.environ.pop(_WATCHDOG_ENV, None)
    if not entry:
        return
    pid, path = entry.split(":", 1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(int(pid), 0)
    with contextlib.suppress(OSError):
        os.remove(path)
    log = os.path.splitext(path)[0] + ".log"
    with contextlib.suppress(OSError):
        if os.path.getsize(log) == 0:  # the watchdog had nothing to say
            os.remove(log)


def _start_private_cluster(num_cpus: Optional[int], num_gpus: Optional[int], timeout_s: float) -> str:
    ray_cli = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    # short path: Ray's unix sockets live under the temp dir and must stay < 108 bytes. Ray makes its temp dir
    # world-writable (0777, re-applied by every process that joins), so it lives inside a 0700 directory of ours.
    temp_dir = tempfile.mkdtemp(prefix="vtr", dir="/tmp")
    port = _free_port()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token":
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))  # inherited by every job
    # Loopback only: Ray resolves --node-ip-address=127.0.0.1 to the machine's network address (and its servers
    # then listen there and on the wildcard address) unless multi-node clusters are off, which a private
    # single-node cluster can afford; every process that joins it inherits the setting.
    # ray-project/ray: python/ray/_private/services.py, resolve_ip_for_localhost / get_node_ip_address
    os.environ[_LOOPBACK_ENV] = "0"
    _refresh_ray_settings(private=True)
    cmd = [ray_cli, "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp_dir}/r",
           "--include-dashboard=false", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    with open(os.path.join(temp_dir, "ray_start.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc.pid, temp_dir)
                raise RuntimeError(f"the private Ray cluster did not start (see {temp_dir}/ray_start.log)") from None
            time.sleep(0.2)
    os.environ["RAY_ADDRESS"] = address  # jobs (spawned processes) join this cluster
    os.environ[_PRIVATE_ENV] = f"{proc.pid}:{temp_dir}"
    return address


def private_cluster_dir() -> Optional[str]:
    """The temp dir of the private cluster this process's session started (None under RAY_ADDRESS)."""
    private = os.environ.get(_PRIVATE_ENV)
    return private.split(":", 1)[1] if private else None


def _start_dispatcher(timeout_s: float) -> None:
    """The run's single Ray driver (see dispatcher.py); job processes find it through $VITABLATE_DISPATCHER."""
    from .dispatcher import ENV

    temp_dir = tempfile.mkdtemp(prefix="vtd", dir="/tmp")
    path = os.path.join(temp_dir, "d.sock")
    log_path = os.path.join(temp_dir, "dispatcher.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vitablate.dispatcher", "--socket", path],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(log_path) as f:
                cause = f.read().strip().splitlines()[-1:] or ["no output"]
            _stop(proc.pid, temp_dir)
            stop_session()
            raise RuntimeError(f"the vitablate dispatcher did not start: {cause[0]}")
        time.sleep(0.05)
    os.environ[ENV] = f"{proc.pid}:{path}"


def _stop(pid: int, temp_dir: str) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)  # `ray start --block` stops its Ray processes on SIGTERM
        for _ in range(100):
            _reap(pid)
            os.killpg(pid, 0)  # raises once no process of the group is left
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)
    _kill_stragglers(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_stragglers(temp_dir: str, timeout_s: float = 10.0) -> None:
    """Wait for, then kill, processes still naming `temp_dir` (Ray daemons outside the process group)."""
    import psutil

    def left() -> list:
        out = []
        for p in psutil.process_iter(["cmdline", "status"]):
            with contextlib.suppress(psutil.Error):
                if (p.pid != os.getpid() and p.info["status"] != psutil.STATUS_ZOMBIE
                        and temp_dir in " ".join(p.info["cmdline"] or [])):
                    out.append(p)
        return out

    deadline = time.monotonic() + timeout_s
    while (procs := left()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _reap(pid: int) -> None:
    """Collect the exit status of our child `pid` if it has exited (a zombie still counts as alive)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child (started by another process) or already reaped
        pass


def stop_session() -> None:
    """Stop the private cluster started by `start_session` (an external one is left running)."""
    from .dispatcher import ENV

    _stop_watchdog()
    dispatcher = os.environ.pop(ENV, None)
    if dispatcher:
        pid, path = dispatcher.split(":", 1)
        _stop(int(pid), os.path.dirname(path))
    ray = sys.modules.get("ray")  # Snakemake's process never imports Ray: keep it that way
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    private = os.environ.pop(_PRIVATE_ENV, None)
    if private:
        pid, temp_dir = private.split(":", 1)
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.pop(_LOOPBACK_ENV, None)
        _refresh_ray_settings(private=False)
        _stop(int(pid), temp_dir)


def _refresh_ray_settings(private: bool) -> None:
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is imported, and caches the auth token the
    first time it uses one: a process that imported Ray before starting its private cluster (a test session,
    a notebook) would still resolve 127.0.0.1 to the machine's address and present an old token, and never
    join the loopback-only cluster. Where Ray is already loaded, set the constant it read and drop its token
    cache, so the next ray.init reads this cluster's settings from the environment."""
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = not private
    raylet = sys.modules.get("ray._raylet")
    if raylet is not None and not sys.modules["ray"].is_initialized():
        # ray-project/ray: python/ray/_private/authentication_test_utils.py, reset_auth_token_state
        raylet.Config.initialize("")
        raylet.AuthenticationTokenLoader.instance().reset_cache()


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


def _execute(cfg_dict: dict, uri: Optional[str], run_name: str = "", sources: Optional[dict] = None,
             log_path: Optional[str] = None, system_metrics_s: Optional[float] = None) -> dict:
    """Body of the Ray task: one attempt of the job, tracked as its own MLflow run.

    Tracking happens here, where the job runs, so that an attempt whose worker dies leaves a
    RUNNING run that the next attempt (Ray's retry) marks KILLED before resuming.
    With execution.shared_fs false, the checkpoints the job reads are downloaded first (`sources`),
    and those it leaves for other jobs are uploaded before its run ends FINISHED.
    log_path: the rule's log file, where the job's start and per-epoch progress lines go.
    system_metrics_s: sample MLflow system metrics into the run at this interval (None: off).
    """
    from . import jobs

    cfg = from_dict(JobConfig, cfg_dict)
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
                record = jobs.run(cfg, tracking.EpochLogger(uri, run_id) if run_id else None)
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
    return task.remote(to_dict(cfg), uri, _run_name(cfg), sources, log_path, system_metrics_s)


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
