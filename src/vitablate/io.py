"""Small file helpers with no heavy imports (the Snakemake side of a job imports these)."""

from __future__ import annotations

import contextlib
import json
import os


def write_text(path: str, text: str) -> None:
    """Atomic write: a reader never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:  # a full or read-only disk: leave no temp file behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=1, default=str))
