"""The real Snakemake CLI, forked from a process that has already imported it.

`python -m snakemake` spends over a second importing Snakemake (and its plugins) before it reads the
Snakefile; a dry run of the tests' tiny configs spends little more than that. The suite runs dozens
of dry runs, so `conftest.snakemake` runs those that execute no job (`-n`, `--lint`, `--dag`) here:
a multiprocessing forkserver imports `snakemake.cli` once, and each call is a fresh fork of it that
enters the same entry point as `python -m snakemake` (`snakemake.cli.main`, which is all that
`snakemake/__main__.py` calls) with its own working directory, environment, argv and output files.
Runs that execute jobs still start a fresh interpreter, as a user's do.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile

# what the forkserver imports once, so no fork imports it again (vitablate is what the Snakefile imports)
PRELOAD = ["snakemake.cli", "vitablate.workflow", "vitablate.registry", "vitablate.tracking"]
_context = None


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


def run(cwd, argv: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run([python, -m, snakemake, *argv], capture_output=True, text=True)`, forked."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _context.Process(target=_main, args=(str(cwd), list(argv), dict(env), out, err))
        proc.start()
        proc.join(timeout)
        cmd = [sys.executable, "-m", "snakemake", *argv]
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(cmd, timeout)
        with open(out) as f, open(err) as g:
            return subprocess.CompletedProcess(cmd, proc.exitcode, f.read(), g.read())
