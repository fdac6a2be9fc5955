"""Attention transfer: copy reproduces the teacher, only chosen layers are overridden,
distillation's minimum and gradient flow, mismatched teachers are refused."""

import copy

import pytest
import torch

from vitablate.models import attention_maps, create_model
from vitablate.objectives import AttentionCopy, attention_distillation_loss
from vitablate.objectives.transfer import AttentionDistillation, IncompatibleTeacher, parse_layers

SIZE = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=3)


def _pair(seed_t=0, seed_s=1, **student_overrides):
    torch.manual_seed(seed_t)
    teacher = create_model(mixer="attention", **SIZE)
    torch.manual_seed(seed_s)
    student = create_model(mixer="attention", **(SIZE | student_overrides))
    return teacher, student


def test_copy_into_identical_student_reproduces_teacher_logits():
    teacher, _ = _pair()
    student = copy.deepcopy(teacher)
    x = torch.randn(4, 3, 16, 16)
    wrapped = AttentionCopy(teacher, student).eval()
    torch.testing.assert_close(wrapped(x), teacher.eval()(x), atol=1e-5, rtol=1e-5)


def test_copy_overrides_only_the_chosen_layers():
    teacher, student = _pair()
    x = torch.randn(2, 3, 16, 16)
    wrapped = AttentionCopy(teacher, student, layers=[0, 2]).eval()
    seen = {}
    hooks = [blk.attn.register_forward_hook(
        lambda m, i, o, k=k: seen.__setitem__(k, m.override_map is not None)) for k, blk in enumerate(student.blocks)]
    wrapped(x)
    for h in hooks:
        h.remove()
    assert seen == {0: True, 1: False, 2: True, 3: False}
    # and the copied layers hold exactly the teacher's maps
    t_maps = attention_maps(teacher, x)
    given = wrapped.teacher_attention(x)
    torch.testing.assert_close(given[0], t_maps[0])
    torch.testing.assert_close(given[1], t_maps[2])
    # overrides are cleared afterwards: the student alone is its own model again
    assert all(blk.attn.override_map is None for blk in student.blocks)


def test_copy_ignores_student_queries_and_keys_in_copied_layers():
    teacher, student = _pair()
    x = torch.randn(2, 3, 16, 16)
    wrapped = AttentionCopy(teacher, student).eval()
    before = wrapped(x)
    with torch.no_grad():
        for blk in student.blocks:
            blk.attn.qkv.weight[: 2 * 32].normal_()
    torch.testing.assert_close(wrapped(x), before)


@pytest.mark.parametrize("mode", ["q", "k"])
def test_copy_q_or_k_uses_the_students_other_half(mode):
    teacher, _ = _pair()
    student = copy.deepcopy(teacher)
    x = torch.randn(2, 3, 16, 16)
    wrapped = AttentionCopy(teacher, student, mode=mode).eval()
    torch.testing.assert_close(wrapped(x), teacher.eval()(x), atol=1e-5, rtol=1e-5)  # same weights: same output
    half = slice(0, 32) if mode == "k" else slice(32, 64)  # scramble the half that is NOT copied
    with torch.no_grad():
        for blk in student.blocks:
            blk.attn.qkv.weight[half].normal_()
    assert not torch.allclose(wrapped(x), teacher(x), atol=1e-4)


def test_distillation_loss_is_smallest_at_the_teacher_and_grads_reach_only_the_student():
    torch.manual_seed(0)
    t = [torch.randn(2, 2, 5, 5) for _ in range(3)]
    at_teacher = attention_distillation_loss([v.clone() for v in t], t)
    for scale in (0.3, 1.0, 3.0):
        other = [v + scale * torch.randn_like(v) for v in t]
        assert attention_distillation_loss(other, t) > at_teacher
    # the minimum equals the teacher's entropy (CE(p, p) = H(p))
    entropy = sum(-(v.softmax(-1) * v.log_softmax(-1)).sum(-1).mean() for v in t)
    torch.testing.assert_close(at_teacher, entropy)

    teacher, student = _pair()
    wrapped = AttentionDistillation(teacher, student, layers=None, weight=3.0)
    loss, logs = wrapped(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert logs["loss_distill"] > 0


def test_distillation_runs_teacher_only_in_training():
    teacher, student = _pair()
    wrapped = AttentionDistillation(teacher, student)
    calls = []
    teacher.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    wrapped(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    assert calls == [1]
    student.eval()(torch.randn(2, 3, 16, 16))  # evaluation is the student alone
    assert calls == [1]


@pytest.mark.parametrize("override, field", [(dict(depth=3), "depth"), (dict(num_heads=4), "num_heads"),
                                             (dict(patch_size=2), "patch_size"), (dict(img_size=24), "num_tokens")])
def test_mismatched_teacher_is_refused_naming_both_shapes(override, field):
    teacher, student = _pair(**override)
    with pytest.raises(IncompatibleTeacher) as e:
        AttentionCopy(teacher, student)
    msg = str(e.value)
    assert field in msg and "teacher (depth=4" in msg and "student (" in msg
    with pytest.raises(IncompatibleTeacher):
        AttentionDistillation(teacher, student)


def test_width_matters_only_for_q_and_k():
    teacher, student = _pair(embed_dim=64, num_heads=2)
    AttentionCopy(teacher, student)  # maps: same heads and tokens suffice
    with pytest.raises(IncompatibleTeacher, match="embed_dim"):
        AttentionCopy(teacher, student, mode="q")


@pytest.mark.parametrize("spec, expected", [("all", [0, 1, 2, 3]), ("first:2", [0, 1]), ("last:1", [3]),
                                            ("0,2", [0, 2]), ("-1", [3])])
def test_layer_specs(spec, expected):
    assert parse_layers(spec, 4) == expected


@pytest.mark.parametrize("spec", ["first:0", "last:9", "middle", "0,7"])
def test_bad_layer_specs(spec):
    with pytest.raises(ValueError):
        parse_layers(spec, 4)


def test_copy_runs_the_teacher_at_evaluation():
    teacher, student = _pair()
    wrapped = AttentionCopy(teacher, student, layers=[0]).eval()
    calls = []
    teacher.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        wrapped(torch.randn(2, 3, 16, 16))
    assert calls == [1]
    # only the layers it needs: a first-layer copy never runs the teacher's later blocks
    later = []
    teacher.blocks[1].register_forward_hook(lambda *a: later.append(1))
    wrapped(torch.randn(2, 3, 16, 16))
    assert later == []
