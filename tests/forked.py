"""One forkserver for the suite: processes forked from a server that has imported Snakemake and MLflow.

A fresh interpreter spends seconds importing Snakemake (and its plugins) or MLflow before it does any
work. `context()` is a multiprocessing context whose server imports them once (`PRELOAD`); a process
it starts is a fork of that server, so it imports neither again. Python has one forkserver per
process, so every test that wants one uses this one.

`snakemake`: the real Snakemake CLI, forked. A dry run of the tests' tiny configs takes little longer
than importing Snakemake, and the suite runs dozens, so `conftest.snakemake` runs those that execute no
job (`-n`, `--lint`, `--dag`) here. Each is a fork that enters the entry point `python -m snakemake`
enters (`snakemake.cli.main`, all that `snakemake/__main__.py` calls) with its own working directory,
environment, argv and output files. Runs that execute jobs still start a fresh interpreter, as a
user's do.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile

# what the forkserver imports once, so no fork imports it again (vitablate is what the Snakefile imports;
# mlflow what tests/test_tracking_concurrency.py's jobs log with)
PRELOAD = ["snakemake.cli", "vitablate.workflow", "vitablate.registry", "vitablate.tracking", "mlflow"]
_context = None


def context():
    """The suite's forkserver context (started on first use, preloading `PRELOAD`)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _main(cwd: str, argv: list[str], env: dict, out: str, err: str) -> None:
    """In the fork: become `python -m snakemake <argv>` in `cwd` with exactly `env`, writing to `out`/`err`."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["snakemake", *argv]
    from snakemake.cli import main

    main(argv)  # exits: multiprocessing turns its SystemExit code into the fork's exit code


def snakemake(cwd, argv: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run([python, -m, snakemake, *argv], capture_output=True, text=True)`, forked."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = context().Process(target=_main, args=(str(cwd), list(argv), dict(env), out, err))
        proc.start()
        proc.join(timeout)
        cmd = [sys.executable, "-m", "snakemake", *argv]
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(cmd, timeout)
        with open(out) as f, open(err) as g:
            return subprocess.CompletedProcess(cmd, proc.exitcode, f.read(), g.read())
