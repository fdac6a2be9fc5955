"""Jobs that span several workers: torch.distributed (gloo) on this CPU, and the real Ray Train on a
private local cluster. Models and data are tiny: this machine has two cores."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import psutil
import pytest
import torch
import torch.nn.functional as F

from conftest import read_config, snakemake, write_config
from vitablate.config import JobConfig, from_dict
from vitablate.data.datasets import batch_plan


def test_the_shards_of_a_step_make_up_the_one_worker_batch():
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    whole = list(batch_plan(50, 8, shuffle=True, generator=gen(), drop_last=True))
    parts = [list(batch_plan(50, 8, shuffle=True, generator=gen(), drop_last=True, shard=(r, 2), micro=2))
             for r in range(2)]
    assert len(whole) == 6 and all(len(p) == 12 for p in parts)  # 6 steps x 2 micro-batches of 2 images
    for s, batch in enumerate(whole):
        joined = torch.cat([parts[r][2 * s + m] for r in range(2) for m in range(2)])
        assert torch.equal(joined, batch)


def test_workers_must_divide_the_batch():
    from vitablate.distributed import check_batch

    with pytest.raises(ValueError, match=r"train.batch_size 10 .*execution.workers \(4\)"):
        check_batch(10, 1, 4)
    assert check_batch(64, 2, 4) == 8


# --------------------------------------------------------------------- gloo, two processes, no Ray


def _moco_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from vitablate.distributed import CrossRankBatchNorm1d
    from vitablate.models import create_model
    from vitablate.objectives.pretext import MoCo

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same global batch on every rank
    q, k = torch.randn(8, 16), torch.randn(8, 16)
    enc = create_model(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=0, in_chans=1)
    moco = MoCo(enc, (0.5,), (0.25,), dim=16, mlp_dim=32, temperature=0.2)
    per = 8 // world
    mine = slice(rank * per, (rank + 1) * per)
    loss = moco.contrastive_loss(q[mine], k[mine])
    bn = CrossRankBatchNorm1d(16, affine=False)
    z = bn(q[mine])
    torch.save({"loss": loss, "keys": moco.last_num_keys, "bn": z}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_worker_moco_sees_the_keys_of_the_global_batch(tmp_path):
    """2 workers x 4 images: each query meets all 8 keys (7 negatives), twice a 1-worker step at 4 images."""
    import torch.multiprocessing as mp

    from vitablate.execution import _free_port

    mp.spawn(_moco_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    assert r[0]["keys"] == r[1]["keys"] == 8
    # independent: InfoNCE of the whole batch of 8, the mean over the two workers' queries (what DDP averages)
    torch.manual_seed(0)
    q, k = torch.randn(8, 16), torch.randn(8, 16)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.2
    expected = F.cross_entropy(logits, torch.arange(8)) * 0.4
    torch.testing.assert_close((r[0]["loss"] + r[1]["loss"]) / 2, expected)
    # a 1-worker step at the per-worker batch of 4 has 4 keys (3 negatives)
    from vitablate.models import create_model
    from vitablate.objectives.pretext import MoCo

    enc = create_model(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=0, in_chans=1)
    one = MoCo(enc, (0.5,), (0.25,), dim=16, mlp_dim=32)
    one.contrastive_loss(q[:4], k[:4])
    assert one.last_num_keys == 4
    # synchronised BatchNorm: each worker's rows normalised with the statistics of all 8
    mean, var = q.mean(0), q.var(0, unbiased=False)
    torch.testing.assert_close(torch.cat([r[0]["bn"], r[1]["bn"]]), (q - mean) / torch.sqrt(var + 1e-5))


# --------------------------------------------------------------------- Ray Train on a private cluster


def _job(workers: int, out, epochs: int = 3) -> JobConfig:
    """A tiny digits classifier with no augmentation and no BatchNorm: the same maths on 1 or 2 workers."""
    return from_dict(JobConfig, {
        "job": "train_classifier", "output_dir": str(out), "data": {"name": "digits"}, "question": "architecture",
        "model": {"variant": "vit_digits", "depth": 1, "embed_dim": 16, "num_heads": 2},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 2e-3, "warmup_epochs": 1, "augment": {"pad_crop": 0}},
        "execution": {"workers": workers, "num_cpus": 1, "max_retries": 2}})


@pytest.fixture(scope="module")
def private_cluster():
    from vitablate import execution

    saved = {k: os.environ.pop(k, None) for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    execution.start_session(num_cpus=4, dispatcher=False)
    try:
        yield
    finally:
        execution.stop_session()
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def _epoch_done(path) -> int:
    try:
        return torch.load(path, weights_only=False)["epoch"]
    except Exception:  # not there yet (replaced atomically)
        return 0


@pytest.mark.slow
def test_two_workers_match_one_and_survive_a_killed_worker(private_cluster, tmp_path):
    """One Ray Train job of 2 workers, its rank 0 SIGKILLed after epoch 2 of 5: Ray Train restarts the
    group, which resumes from the checkpoint; every epoch's loss, those before the kill and those after the
    resume, equals a 1-worker run's of the same global batch (float32 all-reduce order: within 1e-5 relative;
    a resume from the wrong state or a lost epoch is off by far more), and so do the final metrics (at most one
    image of ~360 flips). An uninterrupted 2-worker run is not repeated: each group start imports torch in 2 new
    processes, and the workflow's path to a 2-worker group is test_workflow_pretrains_moco_on_two_workers_..."""
    from mlflow import MlflowClient

    from vitablate import execution, jobs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    killed_dir = tmp_path / "killed"
    log_path = tmp_path / "killed.log"
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(record=execution.run_job(
        _job(2, killed_dir, epochs=5), str(killed_dir / "record.json"), uri=uri, log_path=str(log_path))))
    thread.start()
    deadline = time.time() + 400
    while _epoch_done(killed_dir / "checkpoint.pt") < 2:
        assert thread.is_alive() and time.time() < deadline, "the job ended or stalled before epoch 2"
        time.sleep(0.2)
    pid = int(re.findall(r"pid (\d+)", log_path.read_text())[-1])  # rank 0 logs its start line
    psutil.Process(pid).send_signal(signal.SIGKILL)
    thread.join(timeout=600)
    record = box["record"]
    assert record["resumed_from_epoch"] >= 2 and len(record["history"]) == 5
    assert [w["rank"] for w in record["workers"]] == [0, 1] and record["workers"][0]["pid"] != pid
    assert all(w["ray_node_id"] and w["device"] == "cpu" for w in record["workers"])

    one = jobs.run(_job(1, tmp_path / "one", epochs=5))  # one process, the same global batch of 64
    assert "workers" not in one and len(one["history"]) == 5
    for a, b in zip(record["history"], one["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["top1_val"] == pytest.approx(b["top1_val"], abs=0.5)  # at most one image of ~360 flips
    assert record["top1_test"] == pytest.approx(one["top1_test"], abs=0.5)

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("architecture").experiment_id])
    by_attempt = {r.data.tags["attempt"]: r for r in runs}
    assert set(by_attempt) == {"1", "2"}
    assert by_attempt["1"].info.status == "KILLED"
    assert by_attempt["2"].info.status == "FINISHED"
    assert by_attempt["2"].data.metrics["top1_test"] == record["top1_test"]


def _moco(workers: int, batch: int, out) -> JobConfig:
    return from_dict(JobConfig, {
        "job": "pretrain", "question": "pretext", "output_dir": str(out), "data": {"name": "digits"},
        "model": {"variant": "vit_digits", "depth": 1, "embed_dim": 16, "num_heads": 2},
        "pretext": {"name": "moco", "moco_dim": 16, "moco_mlp_dim": 32},
        "train": {"epochs": 1, "batch_size": batch, "lr": 1e-3, "warmup_epochs": 0},
        "execution": {"workers": workers, "num_cpus": 1}})


@pytest.mark.slow
def test_workflow_pretrains_moco_on_two_workers_that_gather_keys(workflow, ray_cluster, tmp_path):
    """Snakemake -> the dispatcher -> a Ray task -> Ray Train's 2 workers pre-training MoCo v3 on 2 x 8 images:
    every query meets the 16 keys of the global batch, where one worker at the per-worker batch of 8 meets 8. The
    heads' BatchNorm is synchronised (CPU: all-reduced); the record names both ranks. (One job: each group start
    imports torch in 2 new processes; the classifier's 2-worker path is test_two_workers_match_one_...)"""
    from vitablate import jobs

    config = read_config(workflow)
    config = {k: v for k, v in config.items() if k not in ("architecture", "transfer")}
    p = config["pretext"]
    p.update(datasets=["digits"], pretexts=["moco"], seeds=[0], seeds_by={})
    p["objective"].update(moco_dim=16, moco_mlp_dim=32)
    p["pretrain"].update(epochs=1, batch_size=16, lr=1e-3, warmup_epochs=0)
    config["datasets"]["digits"]["model"].update(depth=1, embed_dim=16, num_heads=2)
    config["execution"]["workers"] = 2
    write_config(workflow, config)
    target = "results/pretext/digits/moco/seed0/record.json"
    r = snakemake(workflow, "--cores", "1", target, timeout=900, env=ray_cluster)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    record = json.loads((workflow / target).read_text())
    assert record["config"]["execution"]["workers"] == 2
    ranks = record["workers"]
    assert [w["rank"] for w in ranks] == [0, 1] and len({w["pid"] for w in ranks}) == 2
    assert all(w["ray_node_id"] and w["ray_node_ip"] and w["device"] == "cpu" for w in ranks)
    assert record["history"][0]["moco_keys"] == 16 and record["history"][0]["train_loss"] > 0
    assert (workflow / "results/pretext/digits/moco/seed0/encoder.pt").exists()  # relative paths resolve
    one = jobs.run(_moco(1, 8, tmp_path / "one"))  # one process at the per-worker batch
    assert one["history"][0]["moco_keys"] == 8


def test_a_group_larger_than_the_cluster_is_refused():
    from vitablate.train_launch import _check_cluster_fits

    _check_cluster_fits({"CPU": 4.0, "GPU": 2.0}, 2, {"CPU": 2, "GPU": 1})
    with pytest.raises(ValueError, match=r"execution.workers 4 .*4 GPU \(the cluster has 2\)"):
        _check_cluster_fits({"CPU": 64.0, "GPU": 2.0}, 4, {"CPU": 2, "GPU": 1})
