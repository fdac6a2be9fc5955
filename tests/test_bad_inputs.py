"""A catalogue of bad inputs. Each ends with an error that names the problem and the fix, before
any training starts; the workflow-level ones (config keys, types, values, unknown names, an
unreachable RAY_ADDRESS, a failing job next to a finished one) live in test_workflow.py,
test_cluster.py and test_e2e_architecture.py, and are counted in this catalogue's docstring:
config: unknown key, wrong type, out-of-range value, unknown mixer, unknown dataset, unknown
variant, duplicate seeds, unknown pretext teacher, bad layer spec (schema); cluster:
unreachable RAY_ADDRESS; job next to finished job: batch larger than the data.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vitablate import jobs
from vitablate.config import ConfigError, JobConfig, ModelConfig, TrainConfig, TransferConfig, from_dict
from vitablate.data import corrupt, load_dataset
from vitablate.engine import NonFiniteLossError


def _cfg(tmp_path, **kw) -> JobConfig:
    base = JobConfig(output_dir=str(tmp_path / "job"), model=ModelConfig(variant="vit_digits"),
                     train=TrainConfig(epochs=1, batch_size=64))
    return dataclasses.replace(base, **kw)


def _corrupt_png_folder(root):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray((np.random.rand(8, 8, 3) * 255).astype(np.uint8)).save(root / split / cls / f"{i}.png")
    (root / "val" / "a" / "0.png").write_bytes(b"not a png")


CASES = {
    "unknown job key": (lambda t: from_dict(JobConfig, {"trian": {}}), ConfigError, ["trian", "allowed"]),
    "wrong type in job config": (lambda t: from_dict(JobConfig, {"train": {"epochs": "ten"}}), ConfigError,
                                 ["train.epochs", "integer"]),
    "unknown model variant": (lambda t: jobs.run(_cfg(t, model=ModelConfig(variant="vit_huge"))), ValueError,
                              ["vit_huge", "vit_digits"]),
    "unknown dataset": (lambda t: load_dataset("mnist"), ValueError, ["mnist", "digits"]),
    "missing CIFAR files": (lambda t: load_dataset("cifar10", root=str(t)), FileNotFoundError,
                            ["cifar-10-batches-py", "never downloads"]),
    "corrupt image file": (lambda t: (_corrupt_png_folder(t), [0 for _ in load_dataset(
        "imagefolder", root=str(t), img_size=8).test.batches(8)]), RuntimeError, ["0.png", "replace or delete"]),
    "truncated checkpoint": (lambda t: (os.makedirs(t / "job"), (t / "job" / "checkpoint.pt").write_bytes(b"\x80junk"),
                                        jobs.run(_cfg(t))), RuntimeError, ["checkpoint.pt", "delete it"]),
    "non-finite loss": (lambda t: jobs.run(_cfg(t, train=TrainConfig(epochs=2, batch_size=64, lr=1e12, grad_clip=None,
                                                                     warmup_epochs=0))),
                        NonFiniteLossError, ["train.lr", "checkpoint"]),
    "batch larger than the data": (lambda t: jobs.run(_cfg(t, train=TrainConfig(batch_size=100_000))), ValueError,
                                   ["batch_size 100000", "lower it"]),
    "unknown job kind": (lambda t: jobs.run(_cfg(t, job="train_gan")), ValueError, ["train_gan", "train_classifier"]),
    "unknown transfer method": (lambda t: jobs.run(_cfg(t, job="transfer", transfer=TransferConfig(method="clone"))),
                                ValueError, ["clone", "attn_copy"]),
    "missing teacher checkpoint": (lambda t: jobs.run(_cfg(t, job="transfer", transfer=TransferConfig(
        method="attn_copy", teacher=f"file:{t}/none.pt"))), FileNotFoundError, ["none.pt", "does not exist"]),
    "bad teacher spec": (lambda t: jobs.run(_cfg(t, job="transfer", transfer=TransferConfig(
        method="attn_distill", teacher="hub:vit"))), ValueError, ["hub:vit", "file:<checkpoint>"]),
    "missing pre-trained encoder": (lambda t: jobs.run(_cfg(t, job="evaluate_encoder", init_from=f"{t}/enc.pt")),
                                    FileNotFoundError, ["enc.pt", "pre-training"]),
    "unknown corruption": (lambda t: corrupt(torch.rand(1, 1, 8, 8), "fog", 1), ValueError, ["fog", "contrast"]),
    "bad layer spec": (lambda t: jobs.run(_cfg(t, job="transfer", transfer=TransferConfig(
        method="attn_copy", teacher=f"file:{_teacher(t)}", layers="first:9"))), ValueError, ["first:9", "1..4"]),
}


def _teacher(t):
    from vitablate.models import VARIANTS, create_model

    path = t / "teacher.pth"
    torch.save(create_model(mixer="attention", in_chans=1, num_classes=0, **VARIANTS["vit_digits"]).state_dict(), path)
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_has_a_clear_error(tmp_path, name):
    fn, exc, words = CASES[name]
    with pytest.raises(exc) as e:
        fn(tmp_path)
    for w in words:
        assert w in str(e.value), f"{name}: {w!r} not in {e.value}"
    assert not (tmp_path / "job" / "model.pt").exists()


def test_unreachable_tracking_server_fails_fast_and_clearly(tmp_path):
    code = "from vitablate.tracking import prepare; prepare('http://127.0.0.1:1', ['architecture'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "MLFLOW_TRACKING_URI" in r.stderr and "127.0.0.1:1" in r.stderr
