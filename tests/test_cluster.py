"""The multi-machine path on loopback: an existing two-node Ray cluster (RAY_ADDRESS), each node
declaring 2 GPUs, token authentication on, jobs asking for half a GPU, or for more than a node holds. The
cluster (conftest.two_node_cluster) is started once for this module's tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_config, snakemake, write_config


def _max_overlap(intervals):
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda t: (t[0], t[1]))
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


@pytest.mark.slow
def test_jobs_spread_over_two_gpu_nodes(workflow, two_node_cluster):
    cluster, auth = two_node_cluster
    config = read_config(workflow)
    config = {k: v for k, v in config.items() if k not in ("pretext", "transfer")}
    # 9 jobs, one more than the 8 the declared GPUs hold at once. Whether all 8 are in flight together depends on
    # how fast this machine starts workers (~2 s apart here, 15 s each), so the test checks Ray's invariants
    # (never more than 2 jobs on a GPU, 8 in all) and that half-GPU jobs did share a GPU, not a count of 8.
    config["architecture"].update(mixers=["attention", "feedforward", "identity"], seeds=[0, 1, 2], seeds_by={})
    config["execution"].update(num_gpus=0.5, num_cpus=0.5, dry_jobs=True, dry_job_sleep_s=15)  # room for 8 starts on 2 cores
    write_config(workflow, config)
    r = snakemake(workflow, "--cores", "9", "architecture", env={"RAY_ADDRESS": cluster.address, **auth})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    records = [json.loads(p.read_text()) for p in Path(workflow, "results/architecture").rglob("record.json")]
    assert len(records) == 9
    nodes = {rec["ray_node_id"] for rec in records}
    assert len(nodes) == 2, "jobs should run on both nodes"
    # each job saw the GPU Ray gave it: half of GPU 0 or 1 of its node
    assert all(rec["cuda_visible_devices"] in ("0", "1") for rec in records), [r["cuda_visible_devices"] for r in records]
    assert all(rec["ray_gpu_ids"] == [rec["cuda_visible_devices"]] for rec in records)
    # each job's log and the console say where it ran: node IP and id, and the GPU it got
    for rec in records:
        line = f"on node {rec['ray_node_ip']} ({rec['ray_node_id'][:8]}) gpus [{rec['cuda_visible_devices']}]"
        log = Path(workflow, "results/logs/architecture/digits", rec["mixer"], f"seed{rec['seed']}.log").read_text()
        assert line in log and line in r.stdout + r.stderr, (line, log)
    overlap = _max_overlap([(rec["start_time"], rec["end_time"]) for rec in records])
    assert overlap <= 8, f"4 declared GPUs / 0.5 per job allow 8 at once; saw {overlap}"
    per_gpu = {}
    for rec in records:
        per_gpu.setdefault((rec["ray_node_id"], rec["cuda_visible_devices"]), []).append(
            (rec["start_time"], rec["end_time"]))
    on_one_gpu = {gpu: _max_overlap(iv) for gpu, iv in per_gpu.items()}
    assert max(on_one_gpu.values()) == 2, f"half-GPU jobs should share a GPU, two at most: {on_one_gpu}"
    out = r.stdout + r.stderr
    assert f"Ray cluster {cluster.address} (RAY_ADDRESS)" in out and "(private," not in out, \
        "with RAY_ADDRESS set the workflow must not start its own Ray"


@pytest.mark.slow
def test_unreachable_ray_address_is_a_clear_error(workflow):
    config = read_config(workflow)
    config = {k: v for k, v in config.items() if k not in ("pretext", "transfer")}
    config["architecture"].update(mixers=["identity"], seeds=[0])
    config["execution"].update(dry_jobs=True)
    write_config(workflow, config)
    r = snakemake(workflow, "--cores", "1", "architecture", env={"RAY_ADDRESS": "127.0.0.1:1"}, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "RAY_ADDRESS" in out and "127.0.0.1:1" in out


@pytest.mark.slow
def test_a_job_no_node_can_hold_on_an_external_cluster_is_reported_while_it_waits(workflow, two_node_cluster):
    """On a cluster at RAY_ADDRESS (which an autoscaler may grow) the job waits rather than fails, but says so in
    its log, naming the key and what the nodes offer (and again every minute while it stays pending).
    (test_faults.py's fault 3, on the external cluster.)"""
    cluster, auth = two_node_cluster
    config = read_config(workflow)
    config = {k: v for k, v in config.items() if k not in ("pretext", "transfer")}
    config["architecture"].update(mixers=["identity"], seeds=[0])
    config["execution"].update(dry_jobs=True, num_gpus=3)
    write_config(workflow, config)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"RAY_ADDRESS": cluster.address, **auth}
    log = workflow / "results/logs/architecture/digits/identity/seed0.log"
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1", "architecture"], cwd=workflow,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (log.exists() and "is pending" in (text := log.read_text())):
            assert proc.poll() is None, "snakemake ended before the pending warning"
            assert time.time() < deadline, "no pending warning within 300 s"
            time.sleep(0.2)
        assert "execution.num_gpus is 3" in text and "4 CPUs and 2 GPUs; 4 CPUs and 2 GPUs" in text, text
        assert "autoscaler" in text and proc.poll() is None  # still waiting, not failed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
