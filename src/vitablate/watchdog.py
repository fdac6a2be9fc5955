"""A run's watchdog: when the Snakemake process that started the private Ray cluster dies without stopping it
(SIGKILL, an OOM kill, a closed terminal), stop what that run started, so nothing keeps training and writing.

`execution.start_session` starts one per run, in its own session (so a signal to Snakemake's process group does not
reach it), and `stop_session` ends it first. Every second it checks that Snakemake is still its parent; once it is
not, it stops the dispatcher (whose SIGTERM handler ends the in-flight jobs' MLflow runs KILLED), then the Ray
cluster, removes the Snakemake lock files that run held (so a plain re-run starts without `--unlock`) and the run's
pid file, and exits. It also exits once everything it watches is gone.

Each run leaves a pid file, ``<results_dir>/.vitablate/cluster-<snakemake pid>.json``, naming what it started;
`reap_leftovers` (the next run's `onstart`) stops what a run left if even its watchdog died.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time

log = logging.getLogger("vitablate.watchdog")
PID_DIR = ".vitablate"  # under results_dir


def alive(pid: int, start: float | None = None) -> bool:
    """Whether process `pid` runs and, given `start` (`started(pid)` when it was recorded), is that same process,
    not a later one given the same pid."""
    import psutil

    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False
        return start is None or started(pid) == start
    except (psutil.Error, OSError):
        return False


def started(pid: int) -> float:
    """When process `pid` started, as a value no change of the wall clock moves: on Linux its start in clock ticks
    since boot (/proc/<pid>/stat, field 22, `starttime`), elsewhere psutil's create_time (a start time stored with
    the process). Equal for the same process whenever it is read; another process given the pid later differs.

    Not psutil's create_time on Linux: it adds the boot time that /proc/stat's `btime` gives in whole seconds, and
    that is wall time minus uptime, so a step of the wall clock (a VM's clock corrected after a pause) moves it, and
    moves every create_time with it: compared to within a second, as the watchdog once did, a live run looked dead
    whenever `btime` moved by a second, and its dispatcher and cluster were stopped under it."""
    if sys.platform.startswith("linux"):
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])  # fields from 3 (state) on; the name may hold spaces
    import psutil

    return psutil.Process(pid).create_time()


def pid_file(results_dir: str, owner: int) -> str:
    return os.path.join(os.path.abspath(results_dir), PID_DIR, f"cluster-{owner}.json")


def write_pid_file(path: str, info: dict) -> None:
    from .io import write_json

    write_json(path, info)


def stop_all(info: dict) -> None:
    """Stop the dispatcher, then the Ray cluster, that a run's pid file names (only processes that still name their
    own temp dir: a pid reused by an unrelated process is never signalled)."""
    from .cluster import DISPATCHER_GRACE_S, RAY_GRACE_S, _kill_stragglers, _stop

    for key in ("dispatcher", "ray"):
        entry = info.get(key)
        if not entry:
            continue
        pid, where = int(entry["pid"]), entry["dir"]
        if _names(pid, where):
            _stop(pid, where, grace_s=DISPATCHER_GRACE_S if key == "dispatcher" else RAY_GRACE_S)
        else:
            _kill_stragglers(where, timeout_s=0)
            import shutil

            shutil.rmtree(where, ignore_errors=True)


def _names(pid: int, where: str) -> bool:
    import psutil

    with contextlib.suppress(psutil.Error):
        return where in " ".join(psutil.Process(pid).cmdline())
    return False


def reap_leftovers(results_dir: str) -> list[str]:
    """Before a run starts its cluster: stop clusters that earlier runs on this results directory left running
    (their Snakemake is gone); name the ones whose Snakemake still runs. Returns one line per pid file found."""
    folder = os.path.join(os.path.abspath(results_dir), PID_DIR)
    lines = []
    if not os.path.isdir(folder):
        return lines
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not (name.startswith("cluster-") and name.endswith(".json")):
            continue
        try:
            with open(path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            os.remove(path)
            continue
        owner = info.get("snakemake_pid")
        # a pid file without a start (an older vitablate's) counts a live pid as its run: named, never stopped
        if owner and alive(owner, info.get("snakemake_started")):
            lines.append(f"snakemake pid {owner} is still running on this results directory with its own Ray "
                         f"cluster ({info.get('ray', {}).get('dir', 'RAY_ADDRESS')}); its jobs and this run's must "
                         "not overlap (Snakemake's lock refuses overlapping outputs)")
            continue
        stop_all(info)
        with contextlib.suppress(OSError):
            os.remove(path)
        lines.append(f"stopped what the run of snakemake pid {owner} left behind (it ended without stopping it): "
                     f"Ray cluster {info.get('ray', {}).get('dir', '-')}, dispatcher "
                     f"{info.get('dispatcher', {}).get('pid', '-')}")
    return lines


def watch(info_path: str, poll_s: float = 1.0) -> int:
    """The watchdog's loop (see the module docstring); `info_path` is the run's pid file."""
    with open(info_path) as f:
        info = json.load(f)
    owner = info["snakemake_pid"]
    watched = [(int(e["pid"]), e["dir"]) for e in (info.get("dispatcher"), info.get("ray")) if e]
    # the run's Snakemake started this watchdog (cluster._start_watchdog): while it lives it is the parent; once it
    # is gone, even before this line first runs, the watchdog is re-parented (to init or a subreaper) for good. No
    # pid or clock is compared, so neither a reused pid nor a step of the wall clock can make a live run look dead.
    while os.getppid() == owner:
        if not any(alive(pid) for pid, _ in watched):
            return 0  # stopped by stop_session
        time.sleep(poll_s)
    log.warning(f"snakemake pid {owner} is gone without stopping its Ray cluster; stopping it")
    stop_all(info)
    for lock in info.get("snakemake_locks") or []:  # the dead run's own lock files, never another run's
        with contextlib.suppress(OSError):
            os.remove(lock)
    with contextlib.suppress(OSError):
        os.remove(info_path)
    log.warning("stopped: the next `snakemake` run resumes the interrupted jobs from their checkpoints")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vitablate's per-run watchdog (started by start_session)")
    parser.add_argument("pid_file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vitablate watchdog: %(message)s")
    return watch(args.pid_file)


if __name__ == "__main__":
    sys.exit(main())
