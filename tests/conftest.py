"""Shared fixtures: a private copy of the workflow to run Snakemake in."""

from __future__ import annotations

import copy

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ["Snakefile", "rules", "config", "envs", "reports/captions"]


def copy_workflow(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.csv", "*.md", "*.png"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


# options under which Snakemake executes no job: such a call runs in a fork of a process that has imported
# Snakemake already (tests/forked.py), the rest in a fresh interpreter
NO_JOBS = {"-n", "--dry-run", "--dryrun", "--lint", "--dag", "--rulegraph", "--list-rules", "--summary"}


def snakemake(cwd: Path, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real snakemake CLI in `cwd`; never raises on a non-zero exit."""
    full_env = dict(os.environ)
    full_env.pop("RAY_ADDRESS", None)
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.update(env or {})
    if NO_JOBS & set(args):
        import forked

        return forked.snakemake(cwd, list(args), full_env, timeout)
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def job_counts(output: str) -> dict[str, int]:
    """Parse the 'Job stats' table of a dry run into {rule: count}."""
    counts: dict[str, int] = {}
    in_table = False
    for line in output.splitlines():
        if line.strip().startswith("job") and "count" in line:
            in_table = True
            continue
        if in_table:
            if line.strip().startswith("total"):
                break
            m = re.match(r"^\s*([A-Za-z_][\w]*)\s+(\d+)\s*$", line)
            if m:
                counts[m.group(1)] = int(m.group(2))
    return counts


@pytest.fixture(scope="module")
def two_node_cluster():
    """An existing two-node Ray cluster on loopback (each node 4 CPUs and 2 declared GPUs, token authentication
    on), shared by every test of a module that asks for it (tests/test_cluster.py holds them all, so one
    cluster starts per session and none idles beside the rest of the suite). Yields (cluster, the auth
    environment a driver needs); a test reaches it with RAY_ADDRESS=cluster.address and that environment."""
    import secrets

    token = secrets.token_hex(16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "token")  # every process of the cluster and every driver
        mp.setenv("RAY_AUTH_TOKEN", token)
        from ray.cluster_utils import Cluster  # after the env: Ray reads RAY_AUTH_MODE when imported

        cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=4, num_gpus=2))
        try:
            cluster.add_node(num_cpus=4, num_gpus=2)
            cluster.wait_for_nodes()
            yield cluster, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        finally:
            cluster.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs, no GPU: what `snakemake --cores 2` starts privately), shared by the slow
    tests that only need somewhere to run their jobs, so that each of their Snakemake runs joins it
    (RAY_ADDRESS) instead of starting and stopping a cluster of its own. Yields the environment a run needs
    (`snakemake(..., env=ray_cluster)`). The tests of the private cluster's lifecycle (test_e2e_architecture,
    test_faults, test_resilience) and of missing data (which RAY_ADDRESS turns into a warning: the cluster's
    nodes may have it) run without it. Loopback only, token authentication on, as a private cluster.

    A run whose concurrency is not under test uses `--cores 1`: its jobs then share one Ray worker. On the 2-core
    CI machine the suite is CPU-bound, and each further worker costs ~10 CPU-seconds importing torch, timm and
    MLflow before its first job (measured: the tiny pretext run took 86 CPU-s at --cores 2, 76 at --cores 1)."""
    import secrets

    from vitablate.cluster import _stop, launch_head

    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # as vitablate.cluster starts a private one: loopback only
    proc, address, temp = launch_head(2, 0, 120, env={**os.environ, **env})
    try:
        yield {"RAY_ADDRESS": address, **env}
    finally:
        _stop(proc.pid, temp)  # SIGTERM, SIGKILL what is left, then any straggler naming its temp dir


@pytest.fixture
def workflow(tmp_path: Path) -> Path:
    return copy_workflow(tmp_path / "wf")


def write_config(wf: Path, config: dict) -> None:
    (wf / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def read_config(wf: Path) -> dict:
    return yaml.safe_load((wf / "config" / "config.yaml").read_text())


def e2e_config(name: str) -> dict:
    """The tiny end-to-end config `.test/config/<name>.yaml` (a person runs it by hand with
    `snakemake --configfile .test/config/<name>.yaml -n` from the repository root)."""
    return yaml.safe_load((REPO / ".test" / "config" / f"{name}.yaml").read_text())


def expected_transfer_runs(config: dict) -> int:
    """Transfer jobs of a grid, counted here from the config's lists (not by vitablate): per dataset, scratch
    once per seed, every other method once per teacher and seed, and attn_copy/attn_distill once per layer set.
    Assumes no seeds_by."""
    t = config["transfer"]
    assert not t.get("seeds_by"), "this count assumes every job runs every seed"
    methods, layered = t["methods"], {"attn_copy", "attn_distill"}
    per_teacher = sum(len(t.get("layers", ["all"])) if m in layered else 1 for m in methods if m != "scratch")
    per_dataset = ("scratch" in methods) + len(t["teachers"]) * per_teacher
    return len(t["datasets"]) * len(t["seeds"]) * per_dataset


def set_dotted(config: dict, dotted: str, value) -> dict:
    """A copy of `config` with the key at the dotted path ("transfer.shift.severity") set to `value`."""
    config = copy.deepcopy(config)
    *path, last = dotted.split(".")
    node = config
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value
    return config
