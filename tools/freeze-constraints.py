#!/usr/bin/env python3
"""Write constraints.txt: the exact installed version of every package vitablate[dev,server] pulls in
(its dependency closure, extras included), as tested. Run after `pip install -e ".[dev]"` in the
environment the tests passed in:

    python tools/freeze-constraints.py > constraints.txt
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: set[str]) -> dict[str, str]:
    seen: dict[str, str] = {}
    todo: list[tuple[str, set[str]]] = [(root, extras)]
    expanded: set[tuple[str, str]] = set()
    while todo:
        name, wanted = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a marker-excluded or optional dependency that is not installed
        key = _name(dist.metadata["Name"])
        seen[key] = dist.version
        for extra in wanted | {""}:
            if (key, extra) in expanded:
                continue
            expanded.add((key, extra))
            for line in dist.requires or []:
                req = Requirement(line)
                env = default_environment() | {"extra": extra}
                if req.marker is not None and not req.marker.evaluate(env):
                    continue
                if req.marker is None and extra:
                    continue  # already taken with extra ""
                todo.append((req.name, set(req.extras)))
    return seen


def main() -> int:
    versions = closure("vitablate", {"dev", "server"})
    versions.pop("vitablate", None)
    print("# Exact versions the tests passed with (tools/freeze-constraints.py; python "
          f"{sys.version_info.major}.{sys.version_info.minor}).")
    print('# pip install -c constraints.txt -e ".[dev]" reproduces them; pyproject.toml states the ranges.')
    for name in sorted(versions):
        print(f"{name}=={versions[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
