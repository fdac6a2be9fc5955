"""Ray cluster lifecycle: connect to RAY_ADDRESS or start this run's private cluster, its dispatcher and watchdog.

The workflow's `onstart` calls `start_session()`: with RAY_ADDRESS set it only
checks that cluster; without it, it starts a private local cluster (its own temp
dir, no dashboard) and exports its address, so every job of this run, in any
process, goes to it; `stop_session()` at the end stops exactly that cluster.
Submitting jobs to the cluster: `vitablate.submit`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

_PRIVATE_ENV = "VITABLATE_PRIVATE_RAY"  # set while a private cluster started by this run is up
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps a node on 127.0.0.1 (private cluster)
RAY_GRACE_S = 1.0  # a private cluster's SIGTERM-to-SIGKILL wait (why so short: _stop)
# how long a stopped dispatcher may take to end its in-flight jobs' MLflow runs KILLED before it is SIGKILLed: it
# exits as soon as they are ended, so the wait costs nothing then; on a loaded machine (its MLflow import still
# under way, the store busy) 3 s left them RUNNING
DISPATCHER_GRACE_S = 15.0
# What this process started ("ray", "dispatcher", "watchdog"): stop_session and the watchdog's pid file name only
# these, and stop_session signals them through their Popen, whose unreaped exit keeps the pid from going to another
# process. The variables above are inherited by child processes (a `vitablate job` run inside a Snakemake job sees
# the run's), so a pid read from them may name a process this one does not own, or, once that one is gone and the
# pid reused, an unrelated one.
_owned: dict[str, subprocess.Popen] = {}


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


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports that were free a moment ago (all held at once while they are chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _free_port() -> int:
    return free_ports(1)[0]


def start_session(num_cpus: Optional[int] = None, num_gpus: Optional[int] = None, timeout_s: float = 90,
                  dispatcher: bool = True, results_dir: Optional[str] = None, locks: tuple[str, ...] = (),
                  mlflow: Optional[tuple[str, Sequence[str]]] = None) -> str:
    """Connect to RAY_ADDRESS, or start a private local cluster; returns its address.

    `mlflow`: (tracking URI, experiment names) the run logs to. The dispatcher prepares that store and those
    experiments (vitablate.tracking.prepare) while it connects to the cluster, and answers no job before they are
    ready; a failure stops the session and is raised naming the URI. MLflow's import and a new store's migration
    cost ~5 CPU-seconds: done in the dispatcher, which imports MLflow anyway, Snakemake's own process never pays them.

    The private cluster is a `ray start --head --block` child in its own process group,
    with its own temp dir and port and token authentication on, so that Snakemake's own
    process never becomes a Ray driver (its Ctrl-C handling stays Snakemake's) and
    `stop_session` stops exactly this cluster. A watchdog (vitablate.watchdog) stops the
    cluster and the dispatcher if this process dies without calling `stop_session`; its pid
    file goes under `results_dir` (the next run reaps what a dead run left), and it removes
    `locks` (this Snakemake run's lock files) when it has to stop the run's processes.
    """
    if mlflow and not dispatcher:
        raise ValueError("start_session: `mlflow` is prepared by the dispatcher; with dispatcher=False call "
                         "vitablate.tracking.prepare yourself")
    if mlflow:
        from .tracking import probe

        probe(mlflow[0])  # a tracking server that does not answer: say so before any cluster starts
    if os.environ.get("RAY_ADDRESS"):
        _probe(os.environ["RAY_ADDRESS"])
        address = os.environ["RAY_ADDRESS"]
        os.environ.pop(_PRIVATE_ENV, None)  # inherited from a parent's session: not ours to stop
    else:
        address = _start_private_cluster(num_cpus, num_gpus, timeout_s)
    # the dispatcher (for Snakemake's job processes; a caller that submits itself, `vitablate job`, needs none)
    # starts, then the watchdog that stops it and the cluster should this process die, then the wait for it
    proc = _spawn_dispatcher(mlflow) if dispatcher else None
    if "ray" in _owned or proc:
        _start_watchdog(results_dir, locks)
    if proc:
        _await_dispatcher(proc, timeout_s)
    return address


def _dispatcher_env() -> str:
    from .dispatcher import ENV

    return ENV


def _start_watchdog(results_dir: Optional[str], locks: tuple[str, ...]) -> None:
    """Start this run's watchdog (vitablate.watchdog) on this process, with the pid file naming what it started."""
    from . import watchdog

    info = {"snakemake_pid": os.getpid(), "snakemake_started": watchdog.started(os.getpid()),
            "snakemake_locks": [os.path.abspath(p) for p in locks], "results_dir": results_dir}
    private = os.environ.get(_PRIVATE_ENV) if "ray" in _owned else None  # never a parent session's
    disp = os.environ.get(_dispatcher_env()) if "dispatcher" in _owned else None
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
    _owned["watchdog"] = proc  # its last argument is the pid file


def _stop_watchdog() -> None:
    """stop_session: end the watchdog first (it must not mistake the orderly stop for a crash), drop the pid file."""
    proc = _owned.pop("watchdog", None)
    if proc is None:
        return
    path = proc.args[-1]
    proc.kill()  # a no-op once it has exited (it exits by itself once what it watches is gone)
    proc.wait()
    with contextlib.suppress(OSError):
        os.remove(path)
    log = os.path.splitext(path)[0] + ".log"
    with contextlib.suppress(OSError):
        if os.path.getsize(log) == 0:  # the watchdog had nothing to say
            os.remove(log)


def launch_head(num_cpus: Optional[int], num_gpus: Optional[int], timeout_s: float,
                env: Optional[dict] = None) -> tuple[subprocess.Popen, str, str]:
    """Start a single-node Ray cluster on loopback: `ray start --head --block` in its own process group, on a free
    port, with its own temp dir; returns (process, address, temp dir) once its GCS port answers. `env`: the
    environment of its processes (default: this process's). Stop it with `_stop(process.pid, temp dir)`."""
    ray_cli = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    # short path: Ray's unix sockets live under the temp dir and must stay < 108 bytes. Ray makes its temp dir
    # world-writable (0777, re-applied by every process that joins), so it lives inside a 0700 directory of ours.
    temp_dir = tempfile.mkdtemp(prefix="vtr", dir="/tmp")
    # A private cluster is one node that never grows and whose jobs log to files of their own: it runs without the
    # autoscaler's monitor and the log monitor (~4 CPU-s a cluster: two Python processes fewer). Two of Ray's
    # servers have fixed default ports, so they get free ones too: the client server's 10001 (with anything else
    # listening there, the client server exited and `ray start --block` stopped the whole cluster ~9 s in: every
    # job failed as "the dispatcher died") and the dashboard agent's HTTP 52365 (a second cluster retried for 5 s,
    # then ran without it).
    # ray-project/ray: python/ray/_private/node.py, start_head_processes (--no-monitor, --ray-client-server-port),
    # start_ray_processes (--include-log-monitor); python/ray/dashboard/http_server_agent.py, _start_site_with_retry
    port, client_port, agent_port = free_ports(3)
    cmd = [ray_cli, "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp_dir}/r",
           "--include-dashboard=false", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
           "--no-monitor", "--include-log-monitor=false", f"--ray-client-server-port={client_port}",
           f"--dashboard-agent-listen-port={agent_port}"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    with open(os.path.join(temp_dir, "ray_start.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
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
    return proc, f"127.0.0.1:{port}", temp_dir


def _start_private_cluster(num_cpus: Optional[int], num_gpus: Optional[int], timeout_s: float) -> str:
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token":
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))  # inherited by every job
    # Loopback only: Ray resolves --node-ip-address=127.0.0.1 to the machine's network address (and its servers
    # then listen there and on the wildcard address) unless multi-node clusters are off, which a private
    # single-node cluster can afford; every process that joins it inherits the setting.
    # ray-project/ray: python/ray/_private/services.py, resolve_ip_for_localhost / get_node_ip_address
    os.environ[_LOOPBACK_ENV] = "0"
    _refresh_ray_settings(private=True)
    proc, address, temp_dir = launch_head(num_cpus, num_gpus, timeout_s)
    os.environ["RAY_ADDRESS"] = address  # jobs (spawned processes) join this cluster
    os.environ[_PRIVATE_ENV] = f"{proc.pid}:{temp_dir}"
    _owned["ray"] = proc
    return address


def private_cluster_dir() -> Optional[str]:
    """The temp dir of the private cluster this process's session started (None under RAY_ADDRESS)."""
    private = os.environ.get(_PRIVATE_ENV)
    return private.split(":", 1)[1] if private else None


def _spawn_dispatcher(mlflow: Optional[tuple[str, Sequence[str]]]) -> subprocess.Popen:
    """Start the run's single Ray driver (see dispatcher.py) and export where it will listen
    ($VITABLATE_DISPATCHER: job processes, the watchdog and stop_session find it there); `_await_dispatcher`
    waits until it does. With `mlflow` (uri, experiments) it prepares that store first (start_session)."""
    from .dispatcher import ENV

    temp_dir = tempfile.mkdtemp(prefix="vtd", dir="/tmp")
    path = os.path.join(temp_dir, "d.sock")
    cmd = [sys.executable, "-m", "vitablate.dispatcher", "--socket", path]
    if mlflow:
        uri, experiments = mlflow
        cmd += ["--mlflow-uri", uri, *[f"--experiment={name}" for name in experiments]]
    with open(os.path.join(temp_dir, "dispatcher.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    os.environ[ENV] = f"{proc.pid}:{path}"
    _owned["dispatcher"] = proc
    return proc


def _await_dispatcher(proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait until the dispatcher listens; if it exits or times out first, stop the session and raise its cause (the
    last line it logged). Its MLflow set-up may wait for a tracking server up to tracking.retry_timeout_s."""
    from .dispatcher import ENV
    from .tracking import retry_budget_s

    path = os.environ[ENV].split(":", 1)[1]
    deadline = time.monotonic() + timeout_s + retry_budget_s()
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(os.path.join(os.path.dirname(path), "dispatcher.log")) as f:
                cause = f.read().strip().splitlines()[-1:] or ["no output"]
            code = proc.poll()
            how = (f"still not listening after {timeout_s:.0f} s" if code is None
                   else f"ended by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}")
            stop_session()  # the dispatcher, its watchdog and a private cluster
            raise RuntimeError(f"the vitablate dispatcher did not start: {cause[0]} ({how})")
        time.sleep(0.05)


def _stop(pid: int, temp_dir: str, grace_s: float = RAY_GRACE_S) -> None:
    """Stop the process group `pid` (a private cluster's `ray start --block`, a dispatcher): SIGTERM, then SIGKILL
    what is left after `grace_s`. A cluster's grace (RAY_GRACE_S) is short on purpose: once a driver has connected
    its raylet waits ten seconds for its runtime-env agent before it exits, and its GCS was still running 15 s after
    the SIGTERM (Ray 2.60, measured), so the SIGKILL does the stopping whatever the wait; the run's results are on
    disk by now and the cluster's temp dir is removed with it. A dispatcher gets DISPATCHER_GRACE_S."""
    try:
        os.killpg(pid, signal.SIGTERM)  # `ray start --block` stops its Ray processes on SIGTERM
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            _reap(pid)
            os.killpg(pid, 0)  # raises once no process of the group is left
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)
    _kill_stragglers(temp_dir, group=pid)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_stragglers(temp_dir: str, timeout_s: float = 10.0, group: Optional[int] = None) -> None:
    """Wait for, then kill, processes still naming `temp_dir` (Ray daemons outside the process group) or, with
    `group`, still in that process group: a SIGKILLed process whose exit is under way on a loaded machine no longer
    shows its command line, yet runs (the next run's reaper once found the `ray start` it had killed running)."""
    import psutil

    def member(p) -> bool:
        with contextlib.suppress(OSError):
            return group is not None and os.getpgid(p.pid) == group
        return False

    def left() -> list:
        out = []
        for p in psutil.process_iter(["cmdline", "status"]):
            with contextlib.suppress(psutil.Error):
                if (p.pid != os.getpid() and p.info["status"] != psutil.STATUS_ZOMBIE
                        and (temp_dir in " ".join(p.info["cmdline"] or []) or member(p))):
                    out.append(p)
        return out

    deadline = time.monotonic() + timeout_s
    while (procs := left()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    # SIGKILL is delivered asynchronously: on a loaded machine a killed daemon still runs for a moment, and a caller
    # (the next run reaping leftovers, stop_session) must find it gone when this returns
    with contextlib.suppress(psutil.Error):
        psutil.wait_procs(procs, timeout=5)


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
    dispatcher, proc = os.environ.pop(ENV, None), _owned.pop("dispatcher", None)
    if dispatcher and proc:
        _stop(proc.pid, os.path.dirname(dispatcher.split(":", 1)[1]), grace_s=DISPATCHER_GRACE_S)
    ray = sys.modules.get("ray")  # Snakemake's process never imports Ray: keep it that way
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    private, proc = os.environ.pop(_PRIVATE_ENV, None), _owned.pop("ray", None)
    if private and proc:
        temp_dir = private.split(":", 1)[1]
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.pop(_LOOPBACK_ENV, None)
        _refresh_ray_settings(private=False)
        _stop(proc.pid, temp_dir)


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
