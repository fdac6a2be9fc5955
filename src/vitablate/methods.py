"""Q3's transfer methods: each one function `run(cfg, on_epoch) -> run record`, registered in
`TRANSFER_METHODS` with what the grid, the config checks and the reports need to know of it.

Metadata of every entry:
- `needs_teacher`: the grid makes one job per teacher (False: one job, teacher "none", as `scratch`);
- `loads_teacher`: the job reads the teacher's checkpoint (an ensemble reads its members instead);
- `layered`: the job takes the `transfer.layers` axis (one job per layer set; others run with "all");
- `teacher_at_test` (default False): the evaluated model runs the teacher at test time (copied attention, the
  probe's frozen features), so the method's shift job reads the teacher too;
- `reads_members` (default False): the job reads other transfer jobs' models (an ensemble: its members), and so
  does its shift job;
- `copy_mode` (copy methods only): what `AttentionCopy` copies ("map", "q", "k"), at training and test time;
- `reads` (default none): the `transfer.*` settings the method reads (`distill_weight`, `distill_temperature`,
  `teacher_drop_path`); the others keep their defaults in its job's params, so changing one re-runs only the
  methods that read it (`vitablate.resolve.transfer_job`);
- `colour`, `label`; registration order is the methods' order in tables and figures.

This module imports no torch (the Snakemake parse and the reports read the registry): each function imports
what it runs. A new method is one function and its `@TRANSFER_METHODS.register(...)` line here, e.g.

    @TRANSFER_METHODS.register("copy_v", needs_teacher=True, loads_teacher=True, layered=True, colour="#17becf")
    def copy_v(cfg, on_epoch=None):
        return student_job(cfg, on_epoch, build_copy_v)  # build_copy_v(cfg, teacher, model, layers, device)

Add its name to config/schema.yaml's enums (tests/test_registry.py checks they agree); the grid, Snakemake's
`method` wildcard, the tables' order, the figures' colours and the summary's layered methods follow.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from .registry import Registry

TRANSFER_METHODS: Registry = Registry("transfer method", "transfer.methods", home="vitablate.methods",
                                      required_meta=("needs_teacher", "loads_teacher", "layered"))


# live views: they follow later registrations
LAYERED = TRANSFER_METHODS.view(lambda e: e.layered)  # the methods the `layers` axis applies to
TEACHERLESS = TRANSFER_METHODS.view(lambda e: not e.needs_teacher)  # one job per dataset and seed, teacher "none"
LOADS_TEACHER = TRANSFER_METHODS.view(lambda e: e.loads_teacher)  # the job reads the teacher's checkpoint
# the tested model runs the teacher (the shift job loads it too)
TEACHER_AT_TEST = TRANSFER_METHODS.view(lambda e: e.meta.get("teacher_at_test", False))
# the shift job reads what the transfer job read: the teacher (TEACHER_AT_TEST) or the members (an ensemble)
SHIFT_READS_TEACHER = TRANSFER_METHODS.view(lambda e: e.meta.get("teacher_at_test", False)
                                            or e.meta.get("reads_members", False))


def student_job(cfg, on_epoch, build: Callable) -> dict:
    """Train the student (`vitablate.jobs.classifier_job`) with the teacher `cfg.transfer.teacher`.

    build(cfg, teacher, model, layers, device) -> (fit_module, loss_fn or None, eval_forward), as
    classifier_job's `build`; `teacher` is the frozen headless teacher, `layers` the block indices of
    cfg.transfer.layers. The teacher is loaded after the student is built (the order of random draws)."""
    from .jobs import classifier_job
    from .models.teachers import load_teacher
    from .objectives import parse_layers

    def _build(model, kw, device):
        teacher = load_teacher(cfg.transfer.teacher, kw)
        return build(cfg, teacher, model, lambda: parse_layers(cfg.transfer.layers, len(model.blocks)), device)

    return classifier_job(cfg, on_epoch, _build)


@TRANSFER_METHODS.register("scratch", needs_teacher=False, loads_teacher=False, layered=False, colour="#8c8c8c",
                           label="the student trained from scratch")
def scratch(cfg, on_epoch=None) -> dict:
    from .jobs import train_classifier

    return train_classifier(cfg, on_epoch)


@TRANSFER_METHODS.register("linear_probe", needs_teacher=True, loads_teacher=True, layered=False, colour="#bcbd22",
                           teacher_at_test=True, label="a linear probe on the frozen teacher")
def linear_probe(cfg, on_epoch=None) -> dict:
    from .jobs import evaluate_encoder

    probe = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, name="linear_probe"))
    return evaluate_encoder(probe, on_epoch, teacher=cfg.transfer.teacher)


def _copy(cfg, teacher, model, layers, device):
    """A copy method's student: the teacher's attention (entry meta `copy_mode`) replaces the student's."""
    from .objectives import AttentionCopy

    mode = TRANSFER_METHODS.entry(cfg.transfer.method).copy_mode
    wrapped = AttentionCopy(teacher, model, layers(), mode=mode,
                            teacher_drop_path=cfg.transfer.teacher_drop_path).to(device)
    return wrapped, None, wrapped  # the teacher runs at test time too (teacher_at_test)


@TRANSFER_METHODS.register("attn_copy", needs_teacher=True, loads_teacher=True, layered=True, colour="#1f77b4",
                           teacher_at_test=True, copy_mode="map", reads=("teacher_drop_path",),
                           label="the teacher's attention maps copied into the student")
def attn_copy(cfg, on_epoch=None) -> dict:
    return student_job(cfg, on_epoch, _copy)


@TRANSFER_METHODS.register("copy_q", needs_teacher=True, loads_teacher=True, layered=False, colour="#aec7e8",
                           teacher_at_test=True, copy_mode="q", reads=("teacher_drop_path",),
                           label="the teacher's queries copied into the student")
def copy_q(cfg, on_epoch=None) -> dict:
    return student_job(cfg, on_epoch, _copy)


@TRANSFER_METHODS.register("copy_k", needs_teacher=True, loads_teacher=True, layered=False, colour="#9edae5",
                           teacher_at_test=True, copy_mode="k", reads=("teacher_drop_path",),
                           label="the teacher's keys copied into the student")
def copy_k(cfg, on_epoch=None) -> dict:
    return student_job(cfg, on_epoch, _copy)


@TRANSFER_METHODS.register("attn_distill", needs_teacher=True, loads_teacher=True, layered=True, colour="#2ca02c",
                           reads=("distill_weight", "distill_temperature", "teacher_drop_path"),
                           label="the teacher's attention maps distilled into the student")
def attn_distill(cfg, on_epoch=None) -> dict:
    def build(cfg, teacher, model, layers, device):
        from .objectives import AttentionDistillation

        t = cfg.transfer
        wrapped = AttentionDistillation(teacher, model, layers(), t.distill_weight, t.distill_temperature,
                                        cfg.train.label_smoothing, teacher_drop_path=t.teacher_drop_path).to(device)
        return wrapped, wrapped, model  # the teacher trains the student; evaluation is the student alone

    return student_job(cfg, on_epoch, build)


@TRANSFER_METHODS.register("finetune", needs_teacher=True, loads_teacher=True, layered=False, colour="#d62728",
                           label="the teacher fine-tuned")
def finetune(cfg, on_epoch=None) -> dict:
    def build(cfg, teacher, model, layers, device):
        from .jobs import init_classifier_from_encoder

        init_classifier_from_encoder(model, teacher.state_dict(), f"teacher {cfg.transfer.teacher}")
        model.to(device)
        return model, None, model

    return student_job(cfg, on_epoch, build)


@TRANSFER_METHODS.register("ensemble", needs_teacher=True, loads_teacher=False, layered=False, colour="#9467bd",
                           reads_members=True,
                           label="the fine-tuned teacher and the distilled student, probabilities averaged")
def ensemble(cfg, on_epoch=None) -> dict:
    from .jobs import ensemble as ensemble_job

    return ensemble_job(cfg, on_epoch)


def run_method(cfg, on_epoch: Optional[Callable] = None) -> dict:
    """Run cfg.transfer.method (an unknown name: an error naming transfer.methods and the choices)."""
    return TRANSFER_METHODS.entry(cfg.transfer.method).obj(cfg, on_epoch)
