"""One Ray driver per workflow run: Snakemake's job processes hand their jobs to it over a socket.

Why: every Snakemake job is a short Python process. Were each one a Ray driver, each would
be a new Ray *job*, and Ray never reuses a worker across jobs: every training job would pay
for a fresh worker process importing torch and MLflow (about 5 s on a laptop CPU) plus a
driver connection (about 1-2 s). Through one long-lived driver, the workers that ran one
job are reused by the next, and a Snakemake job process only imports the standard library
and sends one line of JSON.

Protocol (a Unix socket, one connection per job): the client sends one JSON line
``{"cfg": <resolved JobConfig dict>, "record_path": str, "uri": str | null, ...}`` (plus the other
keyword arguments of `execution.run_job`: sources, log_path, system_metrics_s); the server
runs the job with `execution.run_job` and answers one JSON line ``{"record": {...}}`` or
``{"error": str}``. If the client goes away (Snakemake cancelled the job, Ctrl-C), its Ray
task is cancelled and its MLflow run ends KILLED.

Started and stopped by `execution.start_session` / `stop_session`; without it (the
`vitablate job --ray` CLI, direct calls) jobs are submitted from their own process as before.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import socketserver
import sys
import threading

ENV = "VITABLATE_DISPATCHER"  # "<pid>:<socket path>" while a dispatcher serves this run
_inflight: dict[int, tuple[str | None, str]] = {}  # handler thread -> (tracking uri, job output_dir)


class DispatcherGone(RuntimeError):
    """The dispatcher process died or closed the connection before answering."""


def _peer_closed(conn: socket.socket) -> bool:
    """True once the client has hung up (readable with nothing to read)."""
    readable, _, _ = select.select([conn], [], [], 0)
    if not readable:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        from .config import JobConfig, from_dict
        from .submit import JobFailed, run_job

        key = threading.get_ident()
        try:
            request = json.loads(self.rfile.readline())
            cfg = from_dict(JobConfig, request["cfg"])
            _inflight[key] = (request.get("uri"), cfg.output_dir)
            record = run_job(cfg, request["record_path"], uri=request.get("uri"), sources=request.get("sources"),
                             log_path=request.get("log_path"), system_metrics_s=request.get("system_metrics_s"),
                             cancelled=lambda: _peer_closed(self.connection))
            reply = {"record": record}
        except JobFailed as e:
            reply = {"error": str(e)}
        except KeyboardInterrupt:  # run_job's signal that the client left: nobody to answer
            return
        except Exception as e:  # a bad request or a bug here: the client must hear it
            reply = {"error": f"dispatcher: {type(e).__name__}: {e}"}
        finally:
            _inflight.pop(key, None)
        try:
            self.wfile.write((json.dumps(reply) + "\n").encode())
        except OSError:
            pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _terminate(*_) -> None:
    """stop_session's SIGTERM: end the MLflow runs of jobs still in flight KILLED, then exit at once.

    Ray cancels the tasks of a driver that exits, so the jobs stop; their checkpoints stay and
    the next run resumes them.
    """
    from . import tracking

    for uri, output_dir in list(_inflight.values()):
        tracking.end_latest(uri, output_dir, "the workflow was stopped", "KILLED")
    os._exit(0)


def serve(path: str, mlflow_uri: str | None = None, experiments: tuple[str, ...] = ()) -> None:
    """Connect to RAY_ADDRESS, then answer jobs on the Unix socket `path` until terminated.

    With `mlflow_uri`, first prepare that store and `experiments` (vitablate.tracking.prepare: a new store's
    migration, the experiments and their tags) in a thread while connecting; no job is answered before both are
    done, and a failure of either ends this process before it listens (start_session reports the last line)."""
    from .cluster import connect

    outcome: dict = {}

    def set_up() -> None:
        try:
            if mlflow_uri:
                from . import tracking

                tracking.prepare(mlflow_uri, list(experiments))
            else:
                __import__("mlflow.tracking")
        except Exception as e:  # noqa: BLE001 (raised in the main thread below)
            outcome["error"] = e

    # MLflow's client is imported while connecting: a SIGTERM (stop_session, the watchdog) must end the in-flight
    # runs KILLED within the grace period, not spend it importing MLflow
    thread = threading.Thread(target=set_up, daemon=True)
    thread.start()
    connect()  # fail before binding: start_session waits for the socket, so it sees the error
    if mlflow_uri:
        thread.join()
        if "error" in outcome:
            e = outcome["error"]
            raise RuntimeError(f"the MLflow store at {mlflow_uri} could not be prepared "
                               f"({type(e).__name__}: {' '.join(str(e).split())})")
    signal.signal(signal.SIGTERM, _terminate)
    with _Server(path, _Handler) as server:
        server.serve_forever()


def submit(cfg_dict: dict, record_path: str, uri: str | None, sources: dict | None = None,
           log_path: str | None = None, system_metrics_s: float | None = None) -> dict:
    """Client side: send one job to the dispatcher at $VITABLATE_DISPATCHER and wait.

    Returns the job's record, or raises `execution.JobFailed` with the job's own error.
    """
    from .submit import JobFailed

    path = os.environ[ENV].split(":", 1)[1]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError as e:
            raise DispatcherGone(
                f"the vitablate dispatcher at {path} is not answering ({e}); it runs while `snakemake` runs: "
                "re-run snakemake (finished jobs are kept)") from None
        request = {"cfg": cfg_dict, "record_path": record_path, "uri": uri, "sources": sources,
                   "log_path": log_path, "system_metrics_s": system_metrics_s}
        sock.sendall((json.dumps(request) + "\n").encode())
        with sock.makefile("r") as reply_file:
            line = reply_file.readline()
    if not line:
        raise DispatcherGone("the vitablate dispatcher died before the job ended; re-run snakemake "
                             "(finished jobs are kept, this one resumes from its last checkpoint)")
    reply = json.loads(line)
    if "error" in reply:
        raise JobFailed(reply["error"])
    return reply["record"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vitablate's per-run Ray driver (started by start_session)")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--mlflow-uri", help="prepare this tracking store before answering jobs")
    parser.add_argument("--experiment", action="append", default=[], help="an experiment to prepare (repeatable)")
    args = parser.parse_args(argv)
    try:
        serve(args.socket, args.mlflow_uri, tuple(args.experiment))
    except KeyboardInterrupt:
        pass
    except Exception as e:
        print(f"vitablate dispatcher: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
