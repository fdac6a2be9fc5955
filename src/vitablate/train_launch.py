"""Jobs that span several processes, GPUs or nodes: `execution.workers` > 1 through Ray Train.

The job's Ray task (`execution._execute`) becomes a light launcher: it starts Ray Train's
`TorchTrainer` (Ray Train v2) with `execution.workers` workers of `execution.num_cpus` CPUs and
`execution.num_gpus` GPUs each, and waits. Every worker runs the same `execution._execute` the
single-process path runs: Ray Train has initialised the `torch.distributed` process group (gloo
on CPUs, NCCL on GPUs) by then, so `engine.fit` and `jobs` shard the data, all-reduce gradients
with DDP and let rank 0 alone write checkpoints, the record and the MLflow run (see
`vitablate.distributed`). Training code still never imports Ray.

Failures: when a worker dies, Ray Train stops the group and starts a new one (up to
`execution.max_retries` times); its rank 0 opens a new MLflow attempt (the interrupted one ends
KILLED, as a retried single-process job's does) and every rank resumes from the checkpoint in
the job's output_dir, which rank 0 reads and broadcasts.

Needs: the results directory on a filesystem every worker's node sees (execution.shared_fs true):
rank 0 may land on another node after a restart and must find the last checkpoint.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Optional

from .config import JobConfig, from_dict

log = logging.getLogger("vitablate.jobs")
# eval jobs that train nothing run as one process whatever execution.workers says
_ONE_PROCESS = {("evaluate_encoder", "linear_probe"), ("evaluate_encoder", "knn"), ("analyse_encoder", None),
                ("evaluate_shift", None),
                ("transfer", "linear_probe"), ("transfer", "ensemble")}
_group_placements: list[dict] = []  # every rank's placement, in this worker process (rank order)


def trains(cfg: JobConfig) -> bool:
    """Whether the job trains a network (so several workers help); probes, k-NN, analyses do not."""
    if cfg.execution.dry_jobs:
        return True  # dry jobs show where a group's workers land
    detail = {"evaluate_encoder": cfg.eval.name, "transfer": cfg.transfer.method}.get(cfg.job)
    return (cfg.job, detail) not in _ONE_PROCESS and (cfg.job, None) not in _ONE_PROCESS


def launches_group(cfg: JobConfig) -> bool:
    """Whether this job's Ray task launches a worker group (and is not itself one of its workers)."""
    if cfg.execution.workers <= 1 or not trains(cfg):
        return False  # and a one-process job (a dry one, say) never imports torch here
    import torch.distributed

    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def memory_bytes(cfg: JobConfig) -> Optional[int]:
    """Host memory one worker of the job declares to Ray: execution.memory_gb, else computed for an
    image-folder job (its loader workers' decoded images and prefetched batches, see data/pipeline.py,
    plus 2 GiB for the training process), else None (in-memory data; nothing declared)."""
    ex = cfg.execution
    if ex.memory_gb is not None:
        return int(ex.memory_gb * 2**30)
    if cfg.data.name != "imagefolder":
        return None
    from .data.pipeline import loader_memory_bytes
    from .distributed import check_batch

    micro = check_batch(cfg.train.batch_size, cfg.train.accum_steps, max(1, ex.workers))
    views = {"moco": 2, "hybrid": 3}.get(cfg.pretext.name, 1) if cfg.job == "pretrain" else 1  # loader crops
    return 2 * 2**30 + loader_memory_bytes(micro, cfg.model.img_size or 224, cfg.data.num_workers, views=views)


def task_options(cfg: JobConfig) -> dict:
    """Resources of the job's Ray task: the job itself, or only its launcher when a worker group trains."""
    ex = cfg.execution
    if launches_group(cfg):  # the workers hold the CPUs, GPUs and memory; the launcher waits
        return {"num_cpus": 0, "num_gpus": 0}
    memory = memory_bytes(cfg)
    return {"num_cpus": ex.num_cpus, "num_gpus": ex.num_gpus, **({"memory": memory} if memory else {})}


def group_record() -> dict:
    """What a worker group adds to the job's record: every rank's node, GPUs, host and pid."""
    return {"workers": list(_group_placements)} if _group_placements else {}


def _check_cluster_fits(total: dict, workers: int, per_worker: dict) -> None:
    """A group the whole cluster cannot hold would wait forever: refuse it with the numbers."""
    short = {k: (workers * v, total.get(k, 0)) for k, v in per_worker.items() if workers * v > total.get(k, 0)}
    if short:
        need = ", ".join(f"{workers * per_worker[k]:g} {k} (the cluster has {have:g})"
                         for k, (_, have) in short.items())
        raise ValueError(f"execution.workers {workers} x execution.num_cpus/num_gpus/memory_gb needs {need}; "
                         "lower execution.workers or the per-worker resources, or add nodes")


class _Mailbox:
    """Holds rank 0's record for the launcher (workers may run on other nodes)."""

    def __init__(self) -> None:
        self.record = None

    def put(self, record: dict) -> None:
        self.record = record

    def get(self):
        return self.record


def _worker_loop(config: dict) -> None:
    """One rank of the group: the job as `execution._execute` runs it; rank 0 posts the record."""
    import ray
    import ray.train
    import torch

    from . import distributed, jobs
    from .submit import _execute, placement

    os.chdir(config["cwd"])  # Ray Train starts workers in its own directory; the job's paths are the launcher's
    if torch.cuda.is_available() and config["cfg"]["execution"]["num_gpus"] > 0:
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())  # this rank's GPU: torch.device("cuda") means it
    rank = distributed.rank()
    here = placement() | {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
                          "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                          "device": str(torch.device("cuda", torch.cuda.current_device())) if (
                              torch.cuda.is_available() and config["cfg"]["execution"]["num_gpus"] > 0) else "cpu"}
    _group_placements[:] = distributed.all_gather_object(here)
    if rank == 0:
        record = _execute(config["cfg"], config["uri"], config["run_name"], None, config["log_path"],
                          config["system_metrics_s"])
        ray.get(config["mailbox"].put.remote(record))
    else:
        jobs.run(from_dict(JobConfig, config["cfg"]))
    distributed.barrier()


def run_group(cfg_dict: dict, uri: Optional[str], run_name: str, sources: Optional[dict], log_path: Optional[str],
              system_metrics_s: Optional[float]) -> dict:
    """Train the job with `execution.workers` data-parallel workers (Ray Train's TorchTrainer); its record."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # the v2 API (ray.train.v2), default since 2.5x
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = from_dict(JobConfig, cfg_dict)
    ex = cfg.execution
    if not ex.shared_fs or sources:
        raise ValueError(f"execution.workers is {ex.workers} but execution.shared_fs is false; a worker group "
                         "resumes from the checkpoint in the job's output_dir, which every node must see. Put "
                         "results_dir on a shared filesystem and set execution.shared_fs: true, or use workers: 1")
    from .distributed import check_batch

    check_batch(cfg.train.batch_size, cfg.train.accum_steps, ex.workers)  # fail here, not in every worker
    use_gpu = ex.num_gpus > 0
    per_worker = {"CPU": ex.num_cpus, **({"GPU": ex.num_gpus} if use_gpu else {})}
    memory = memory_bytes(cfg)
    if memory:
        per_worker["memory"] = memory
    _check_cluster_fits(ray.cluster_resources(), ex.workers, per_worker)
    mailbox = ray.remote(num_cpus=0)(_Mailbox).remote()
    output_dir = os.path.abspath(cfg.output_dir)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": cfg_dict, "uri": uri, "run_name": run_name, "log_path": log_path,
                           "system_metrics_s": system_metrics_s, "mailbox": mailbox, "cwd": os.getcwd()},
        scaling_config=ScalingConfig(num_workers=ex.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=os.path.basename(output_dir.rstrip("/")) or "job",
                             storage_path=os.path.join(output_dir, "ray_train"),
                             failure_config=FailureConfig(max_failures=ex.max_retries)),
    )
    log.info(f"[vitablate] {cfg.job} {cfg.output_dir}: {ex.workers} workers x ({ex.num_cpus} CPUs, "
             f"{ex.num_gpus} GPUs) through Ray Train")
    try:
        trainer.fit()
        record = ray.get(mailbox.get.remote())
    finally:
        ray.kill(mailbox)
    if record is None:
        raise RuntimeError(f"the worker group of {cfg.output_dir} finished without a record from rank 0")
    return record
