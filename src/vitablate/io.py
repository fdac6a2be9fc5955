"""Small file helpers with no heavy imports (the Snakemake side of a job imports these)."""

from __future__ import annotations

import json
import os


def write_json(path: str, obj: dict) -> None:
    """Atomic JSON write: a reader never sees half a record."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)
