"""32 jobs logging at once to the default SQLite store: no metric lost, no job failed."""

from __future__ import annotations

import forked
import pytest
from mlflow import MlflowClient

EPOCHS = 15
JOBS = 32


def _job(args):
    uri, out_dir, i, barrier = args
    from vitablate import tracking

    cfg = {"question": "architecture", "job": "train_classifier", "seed": i, "mixer": "attention",
           "output_dir": out_dir, "data": {"name": "digits"}, "train": {"epochs": EPOCHS, "lr": 1e-3}, "tags": {}}
    barrier.wait()  # everyone starts writing at the same moment
    run_id = tracking.start_attempt(uri, cfg, run_name=f"job{i}")
    log = tracking.EpochLogger(uri, run_id)
    for epoch in range(1, EPOCHS + 1):
        log(epoch, {"epoch": epoch, "train_loss": 1.0 / epoch + i, "top1_val": float(epoch)})
    tracking.finish_run(uri, run_id, {"top1_test": float(i), "epochs": EPOCHS, "config": cfg})
    return run_id


@pytest.mark.slow
def test_32_concurrent_jobs_lose_no_metric(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"  # fresh store: its creation races too
    ctx = forked.context()  # 32 forks of a process that imported MLflow once, not 32 imports of it
    with ctx.Manager() as manager:
        barrier = manager.Barrier(JOBS)
        with ctx.Pool(JOBS) as pool:
            run_ids = pool.map(_job, [(uri, str(tmp_path / f"j{i}"), i, barrier) for i in range(JOBS)])
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("architecture").experiment_id], max_results=100)
    assert len(runs) == JOBS and {r.info.run_id for r in runs} == set(run_ids)
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        i = int(r.data.tags["seed"])
        hist = client.get_metric_history(r.info.run_id, "train_loss")
        assert sorted(m.step for m in hist) == list(range(1, EPOCHS + 1))
        assert r.data.metrics["top1_test"] == i
        assert len(client.get_metric_history(r.info.run_id, "top1_val")) == EPOCHS
