"""Transfer jobs in-process on digits with a file: teacher (a saved timm-compatible state dict)."""

import dataclasses

import pytest
import torch

from vitablate import jobs
from vitablate.config import JobConfig, ShiftConfig, TrainConfig, TransferConfig
from vitablate.models import VARIANTS, create_model
from vitablate.objectives import IncompatibleTeacher


def _teacher_file(tmp_path, **override):
    torch.manual_seed(0)
    kw = dict(VARIANTS["vit_digits"], in_chans=1, num_classes=0) | override
    teacher = create_model(mixer="attention", **kw)
    path = tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), path)  # a plain timm state dict, as users would bring
    return path, teacher.state_dict()


def _cfg(tmp_path, method, teacher, layers="all", **tr):
    return JobConfig(question="transfer", job="transfer", seed=0, output_dir=str(tmp_path / method),
                     model=dataclasses.replace(JobConfig().model, variant="vit_digits"),
                     train=TrainConfig(epochs=1, batch_size=64),
                     transfer=TransferConfig(method=method, teacher=f"file:{teacher}", teacher_name="t",
                                             layers=layers, **tr),
                     shift=ShiftConfig(corruptions=["gaussian_noise"], severity=1))


@pytest.mark.parametrize("method", ["attn_copy", "attn_distill",  # copy_q/copy_k share attn_copy's path: slow only
                                    pytest.param("copy_q", marks=pytest.mark.slow),
                                    pytest.param("copy_k", marks=pytest.mark.slow)])
def test_teacher_weights_unchanged_by_training(tmp_path, method):
    path, original = _teacher_file(tmp_path)
    record = jobs.run(_cfg(tmp_path, method, path, layers="first:2"))
    assert record["method"] == method and 0 <= record["top1_test"] <= 100
    assert "top1_shift_gaussian_noise" in record
    state = torch.load(tmp_path / method / "checkpoint.pt", weights_only=False)["modules"]["model"]
    teacher_after = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
    assert teacher_after, "the checkpoint should hold the frozen teacher beside the student"
    for k, v in teacher_after.items():
        torch.testing.assert_close(v, original[k], rtol=0, atol=0)
    student = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    assert any(not torch.equal(v, original[k]) for k, v in student.items() if k in original)


def test_finetune_changes_the_teachers_copy_and_linear_probe_reads_it(tmp_path):
    path, original = _teacher_file(tmp_path)
    rec = jobs.run(_cfg(tmp_path, "finetune", path))
    tuned = torch.load(tmp_path / "finetune" / "model.pt", weights_only=False)["model"]
    assert not torch.equal(tuned["blocks.0.attn.qkv.weight"], original["blocks.0.attn.qkv.weight"])
    assert rec["method"] == "finetune"
    probe = jobs.run(_cfg(tmp_path, "linear_probe", path))
    assert 0 <= probe["top1_test"] <= 100 and "top1_shift_gaussian_noise" in probe


@pytest.mark.parametrize("method, override, field", [
    ("attn_copy", dict(depth=3), "depth"),
    ("attn_distill", dict(depth=5), "depth"),
    ("attn_copy", dict(patch_size=4), "num_tokens"),
    ("copy_q", dict(embed_dim=32), "embed_dim"),  # maps need equal heads/tokens only; Q/K also equal width
])
def test_mismatched_teacher_refused_before_training(tmp_path, method, override, field):
    path, _ = _teacher_file(tmp_path, **override)
    with pytest.raises(IncompatibleTeacher) as e:
        jobs.run(_cfg(tmp_path, method, path))
    msg = str(e.value)
    assert field in msg and "teacher (" in msg and "student (" in msg
    assert not (tmp_path / method / "checkpoint.pt").exists(), "training started anyway"


def test_missing_teacher_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher checkpoint .*does not exist"):
        jobs.run(_cfg(tmp_path, "attn_distill", tmp_path / "nope.pth"))


def test_truncated_teacher_file_is_named(tmp_path):
    path, _ = _teacher_file(tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="truncated"):
        jobs.run(_cfg(tmp_path, "attn_copy", path))


@pytest.mark.parametrize("method", ["finetune", "attn_copy"])
def test_token_pooled_teacher_fits_an_avg_pooled_student(tmp_path, method):
    """timm's MAE encoders (timm:vit_large_patch16_224.mae) end in `norm` and pool the CLS token; the
    student pools by average through `fc_norm`. Fine-tuning starts that final LayerNorm fresh, as MAE does."""
    path, original = _teacher_file(tmp_path, global_pool="token")
    assert "norm.weight" in original and "fc_norm.weight" not in original
    rec = jobs.run(_cfg(tmp_path, method, path))
    assert rec["method"] == method and 0 <= rec["top1_test"] <= 100
    if method == "finetune":
        tuned = torch.load(tmp_path / method / "model.pt", weights_only=False)["model"]
        assert "fc_norm.weight" in tuned and "norm.weight" not in tuned
