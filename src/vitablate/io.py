"""Small file helpers with no heavy imports (the Snakemake side of a job imports these)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", fsync: bool = False) -> Iterator[str]:
    """Write a file atomically: yields a temporary path beside `path` to write to.

    On leaving the block without an error the temporary file replaces `path` (os.replace,
    atomic on one filesystem: a reader sees the old file or the new one, never half of
    one); on an error (a full or read-only disk, an interrupt) the temporary file is
    removed and `path` is left as it was. `suffix` ends the temporary name (writers that
    pick the format from the extension, e.g. matplotlib's ".png"); `fsync` flushes the
    new file to disk before the rename (a checkpoint that must survive a power cut).
    Creates the parent folder.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """Atomic write: a reader never sees half a file."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path: str, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=1, default=str))


def warning_lines(log_path: str | None, start: int = 0) -> list[str]:
    """The `[vitablate] warning:` lines a log file gained after byte `start` (a job's log, written by its
    Ray worker, shown on the Snakemake console once the job is done)."""
    if not log_path or not os.path.exists(log_path):
        return []
    with open(log_path, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    return [line for line in text.splitlines() if "[vitablate] warning:" in line]
