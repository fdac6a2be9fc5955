"""MLflow as on a cluster: a tracking server with a PostgreSQL backend store and proxied artifacts
(tools/mlflow-server.sh, on free loopback ports), the workflow pointed at it by MLFLOW_TRACKING_URI,
and execution.shared_fs false, so the checkpoints one job hands another (pretext teacher -> students
and evaluations, ensemble members) travel through the artifact store instead of the filesystem."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import REPO, read_config, snakemake, write_config
from vitablate.cluster import free_ports

SCRIPT = REPO / "tools" / "mlflow-server.sh"


def _postgres_installed() -> bool:
    return bool(shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


@pytest.fixture(scope="module")
def mlflow_server():
    """(tracking URI, the server's directory) of a private server, stopped at the end."""
    if not _postgres_installed():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL's server binaries (initdb) are missing on CI; .ci/run installs them "
                        "(apt-get install postgresql)")
        pytest.skip("PostgreSQL's server binaries (initdb) are not installed: apt-get install postgresql")
    # not pytest's tmp_path: as root, PostgreSQL runs as the `postgres` user, which must traverse the
    # directory's parents, and pytest's are private
    base = Path(tempfile.mkdtemp(prefix="vtmlflow", dir="/tmp"))
    os.chmod(base, 0o755)
    port, pg_port = free_ports(2)
    env = dict(os.environ, PYTHON=sys.executable, WORKERS="1")
    try:
        r = subprocess.run([str(SCRIPT), "start", str(base), str(port), str(pg_port)], capture_output=True,
                           text=True, timeout=300, env=env, check=False)
        assert r.returncode == 0, f"tools/mlflow-server.sh start failed:\n{r.stdout}\n{r.stderr}"
        yield f"http://127.0.0.1:{port}", base
    finally:
        subprocess.run([str(SCRIPT), "stop", str(base)], capture_output=True, timeout=120, env=env, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_no_shared_fs_without_a_tracking_server_is_refused(workflow):
    config = read_config(workflow)
    config["execution"]["shared_fs"] = False
    write_config(workflow, config)
    r = snakemake(workflow, "-n", "--cores", "1")  # MLFLOW_TRACKING_URI unset: the local SQLite store
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "execution.shared_fs is false" in out and "MLFLOW_TRACKING_URI=http://" in out, out[-3000:]


def test_shared_fs_is_workflow_wide():
    import yaml

    from vitablate.config import ConfigError
    from vitablate.workflow import check_config

    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["pretext"]["execution"] = {"shared_fs": False}
    with pytest.raises(ConfigError, match="pretext.execution.shared_fs .* workflow-wide"):
        check_config(config)


def _check(r, wf: Path, server_dir: Path) -> None:
    """Snakemake succeeded; otherwise show its output, the logs of the jobs that failed and the server's."""
    if r.returncode == 0:
        return
    logs = [f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((wf / "results/logs").rglob("*.log"))
            if "Error" in p.read_text()]
    server = (server_dir / "logs/mlflow.log").read_text(errors="replace")
    pytest.fail("\n".join([(r.stdout + r.stderr)[-4000:], *logs, f"== MLflow server log\n{server[-4000:]}"]))


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _record(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_grid_through_postgres_server_without_shared_fs(workflow, mlflow_server, ray_cluster):
    uri, server_dir = mlflow_server
    config = read_config(workflow)
    config.pop("architecture")
    config["execution"]["shared_fs"] = False
    p = config["pretext"]
    p.update(pretexts=["mae"], seeds=[0], evals=["knn"])
    p["pretrain"]["epochs"] = 1
    t = config["transfer"]
    t.update(teachers={"mae": "pretext:mae"}, seeds=[0], layers=["all"],
             methods=["finetune", "attn_distill", "ensemble"])
    t["train"]["epochs"] = 1
    write_config(workflow, config)
    env = {"MLFLOW_TRACKING_URI": uri, **ray_cluster}
    teacher_dir = workflow / "results/pretext/digits/mae/seed0"

    # 1. the teacher alone; then its checkpoint is deleted here, as if it had been written on another node
    r = snakemake(workflow, "--cores", "1", "results/pretext/digits/mae/seed0/record.json", env=env)
    _check(r, workflow, server_dir)
    pretrain = _record(teacher_dir / "record.json")
    encoder_sha = _sha(teacher_dir / "encoder.pt")
    for name in ("encoder.pt", "checkpoint.pt"):
        (teacher_dir / name).unlink()

    # 2. its consumers: two students, the ensemble (which reads their model.pt), a pretext evaluation and an
    # analysis; nothing re-runs the teacher (encoder.pt is no declared output without a shared fs)
    # (and the distilled student's and the ensemble's shift jobs: each reads its model from the store too)
    r = snakemake(workflow, "--cores", "1", "results/transfer/digits/mae/ensemble/all/seed0/record.json",
                  "results/transfer/digits/mae/attn_distill/all/seed0/shift/record.json",
                  "results/transfer/digits/mae/ensemble/all/seed0/shift/record.json",
                  "results/pretext/digits/mae/seed0/knn/record.json",
                  "results/pretext/digits/mae/seed0/analysis/record.json", env=env)
    _check(r, workflow, server_dir)
    assert not (teacher_dir / "encoder.pt").exists()

    client = MlflowClient(tracking_uri=uri)
    exps = {name: client.get_experiment_by_name(name) for name in ("pretext", "transfer")}
    runs = {name: client.search_runs([e.experiment_id]) for name, e in exps.items()}
    assert len(runs["pretext"]) == 3 and len(runs["transfer"]) == 3 + 2  # three students, two shift jobs
    every = runs["pretext"] + runs["transfer"]
    assert {r.info.status for r in every} == {"FINISHED"}
    for run in every:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri  # proxied
        job = run.data.tags["job"]
        if job in ("pretrain", "transfer") and run.data.tags.get("method") != "ensemble":  # trained epochs
            for key in ("train_loss", "lr"):
                assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1], (job, key)
        final = {"pretrain": "final_loss", "analysis": "wall_s", "shift": "top1_shift_gaussian_noise"}.get(
            job, "top1_test")
        assert final in run.data.metrics, (job, sorted(run.data.metrics))
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"record.json", "config.json"} <= names, names
        with tempfile.TemporaryDirectory() as d:  # downloadable through the server's proxy
            rec = json.loads(Path(client.download_artifacts(run.info.run_id, "record.json", d)).read_text())
            cfg = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json", d)).read_text())
        assert rec["mlflow_run_id"] == run.info.run_id and cfg["question"] == run.data.tags["question"]
    transfer_runs = {r.data.tags["method"]: r for r in runs["transfer"] if r.data.tags["job"] != "shift"}
    shift_runs = {r.data.tags["method"]: r for r in runs["transfer"] if r.data.tags["job"] == "shift"}
    assert sorted(transfer_runs) == ["attn_distill", "ensemble", "finetune"]
    assert sorted(shift_runs) == ["attn_distill", "ensemble"]
    # the shift jobs read the models the transfer jobs uploaded (no shared fs), and tested them under shift
    for method, run in shift_runs.items():
        rec = _record(workflow / f"results/transfer/digits/mae/{method}/all/seed0/shift/record.json")
        assert rec["checkpoint_sources"] and all(v.startswith("runs:/") for v in rec["checkpoint_sources"].values())
        assert "top1_shift_gaussian_noise" in run.data.metrics

    # the teacher's checkpoint is in the server's artifact store, byte for byte
    run_id = pretrain["mlflow_run_id"]
    exp_id = exps["pretext"].experiment_id
    stored = server_dir / "artifacts" / exp_id / run_id / "artifacts" / "checkpoints" / "encoder.pt"
    assert _sha(stored) == encoder_sha
    assert pretrain["checkpoint_artifacts"]["encoder.pt"].endswith(f"{run_id}/artifacts/checkpoints/encoder.pt")

    # every consumer downloaded it from there and read the downloaded copy
    encoder = str(Path("results/pretext/digits/mae/seed0/encoder.pt"))
    source = f"runs:/{run_id}/checkpoints/encoder.pt"
    consumers = {m: workflow / f"results/transfer/digits/mae/{m}/all/seed0" for m in ("finetune", "attn_distill")}
    for method, out in consumers.items():
        rec = _record(out / "record.json")
        assert rec["checkpoint_sources"] == {encoder: source}, method
        local = rec["config"]["transfer"]["teacher"][len("file:"):]
        assert local == f"{out.relative_to(workflow)}/inputs/{run_id}/encoder.pt"
        assert _sha(workflow / local) == encoder_sha
        assert transfer_runs[method].data.params["transfer.teacher"] == f"file:{encoder}"  # params as Snakemake's
    for ev in ("knn", "analysis"):
        rec = _record(teacher_dir / ev / "record.json")
        assert rec["checkpoint_sources"] == {encoder: source}
        assert _sha(workflow / rec["config"]["init_from"]) == encoder_sha

    # the ensemble's members are the students' model.pt, uploaded by their runs
    ens = _record(workflow / "results/transfer/digits/mae/ensemble/all/seed0/record.json")
    members = {str(Path(consumers[m].relative_to(workflow), "model.pt")): _record(consumers[m] / "record.json")
               for m in ("attn_distill", "finetune")}
    assert ens["checkpoint_sources"] == {p: f"runs:/{rec['mlflow_run_id']}/checkpoints/model.pt"
                                         for p, rec in members.items()}
    assert ens["top1_test"] == transfer_runs["ensemble"].data.metrics["top1_test"]

    # the report rules read the analysis table on the Snakemake host: without a shared fs it comes back
    # from the analysis run's artifacts
    from vitablate.workflow import fetch_host_outputs

    analysis = _record(teacher_dir / "analysis/record.json")
    table = workflow / analysis["analysis_path"]
    table_sha = _sha(table)
    table.unlink()
    cwd = os.getcwd()
    os.chdir(workflow)  # the record's paths are relative to the workflow's directory
    try:
        fetch_host_outputs(analysis, uri)
    finally:
        os.chdir(cwd)
    assert _sha(table) == table_sha
