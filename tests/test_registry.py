"""One registry per kind: a mixer, a pretext, a transfer method and an analysis metric added through the
registries alone run as jobs and reach the reports; the JSON schema's enums and Snakemake's wildcard
constraints agree with the registries."""

import dataclasses
import re
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from torch import nn

from vitablate import figures, jobs, summary, workflow
from vitablate.analysis.registry import EVALS, METRICS
from vitablate.config import DataConfig, JobConfig, PretextConfig, TrainConfig, TransferConfig
from vitablate.methods import LAYERED, TRANSFER_METHODS, student_job
from vitablate.models import VARIANTS, create_model
from vitablate.models.registry import MIXERS
from vitablate.objectives import PretextObjective
from vitablate.objectives.registry import PRETEXTS
from vitablate.registry import Registry, wildcard_constraints

ROOT = Path(__file__).resolve().parents[1]
TRAIN = TrainConfig(epochs=1, batch_size=128, eval_batch_size=256)


@pytest.fixture
def registered():
    """register(registry, name, target, **meta) for the test; every entry is unregistered afterwards."""
    added = []

    def register(registry, name, target, **meta):
        registry.register(name, target, **meta)
        added.append((registry, name))

    yield register
    for registry, name in added:
        registry.unregister(name)
    assert "dummy" not in " ".join(n for r in (MIXERS, PRETEXTS, TRANSFER_METHODS, METRICS) for n in r)


# --- the dummies ------------------------------------------------------------------------------

class ShiftMixer(nn.Module):
    """Mixes tokens by rolling them one position, scaled by a learnable gain (proves the class was built)."""

    def __init__(self, dim: int, **_):
        super().__init__()
        self.dummy_gain = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x, attn_mask=None, is_causal=False):
        return torch.roll(x, 1, dims=1) * self.dummy_gain


def shift_mixer(g):
    from timm.layers import Mlp

    return dict(attn_layer=ShiftMixer, mlp_layer=Mlp)


class MeanPixel(PretextObjective):
    """Predict each image's mean pixel from the pooled features (a pretext with no augmentation)."""

    def __init__(self, encoder, mean, std, **_):
        super().__init__(encoder, mean, std)
        self.head = nn.Linear(encoder.num_features, 1)

    def forward(self, x, y=None, generator=None):
        pred = self.head(self.encoder(self.normalize(x))).squeeze(-1)
        loss = (pred.float() - x.mean(dim=(1, 2, 3))).pow(2).mean()
        return loss, {"loss_mean_pixel": loss.detach()}


def abs_mean(tokens, grid_size):
    """Mean absolute patch-token value (grid_size only checks the geometry reaches the metric)."""
    assert tokens.shape[1] == grid_size[0] * grid_size[1]
    return tokens.abs().mean()


def frozen_embedding(cfg, teacher, model, layers, device):
    """The student starts from the teacher's patch embedding, frozen; it trains the rest from scratch."""
    model.patch_embed.load_state_dict(teacher.patch_embed.state_dict())
    model.patch_embed.requires_grad_(False)
    assert layers() == list(range(len(model.blocks)))  # "all"
    model.to(device)
    return model, None, model


def run_frozen_embedding(cfg, on_epoch=None):
    return student_job(cfg, on_epoch, frozen_embedding) | {"dummy_ran": True}


def _cfg(tmp_path, name, **kw):
    return JobConfig(output_dir=str(tmp_path / name), data=DataConfig(name="digits"),
                     model=dataclasses.replace(JobConfig().model, variant="vit_digits"), train=TRAIN, **kw)


# --- the jobs -----------------------------------------------------------------------------------

def test_dummy_mixer_trains_through_the_registry_alone(tmp_path, registered):
    registered(MIXERS, "dummy_shift", shift_mixer, colour="#123456", label="rolled tokens")
    rec = jobs.run(_cfg(tmp_path, "mix", question="architecture", job="train_classifier", mixer="dummy_shift"))
    assert rec["mixer"] == "dummy_shift" and 0 <= rec["top1_test"] <= 100
    state = torch.load(tmp_path / "mix" / "model.pt", weights_only=True)["model"]
    gains = [k for k in state if k.endswith("attn.dummy_gain")]
    assert len(gains) == VARIANTS["vit_digits"]["depth"]  # every block mixes with the registered class
    assert any(not torch.equal(state[k], torch.full_like(state[k], 0.5)) for k in gains)  # and it trained
    assert figures.color("dummy_shift") == "#123456"
    assert re.fullmatch(wildcard_constraints()["mixer"], "dummy_shift")


def test_dummy_pretext_and_metric_run_and_reach_the_figure(tmp_path, registered):
    registered(PRETEXTS, "dummy_pixel", MeanPixel, family="MIM", colour="#654321", loss_label="MSE, mean pixel")
    registered(METRICS, "dummy_abs", abs_mean, input="tokens", needs=("grid_size",), per_head=False,
               label="mean |token|")
    pre = _cfg(tmp_path, "pre", question="pretext", job="pretrain", pretext=PretextConfig(name="dummy_pixel"),
               tags={"pretext": "dummy_pixel"})
    rec = jobs.run(pre)
    assert rec["pretext"] == "dummy_pixel" and "loss_mean_pixel" in rec["history"][-1]
    encoder_pt = tmp_path / "pre" / "encoder.pt"
    assert "head.weight" not in torch.load(encoder_pt, weights_only=True)["model"]  # the encoder alone is kept
    assert "dummy_pixel" in summary.MIM and summary._pretext_order(["dummy_pixel", "moco"]) == ["moco", "dummy_pixel"]
    assert figures.color("dummy_pixel") == "#654321" and figures.loss_label("dummy_pixel") == "MSE, mean pixel"

    ana = dataclasses.replace(pre, job="analyse_encoder", init_from=str(encoder_pt), output_dir=str(tmp_path / "ana"),
                              eval=dataclasses.replace(pre.eval, analysis_images=16))
    rec = jobs.run(ana)
    table = pl.read_parquet(rec["analysis_path"])
    got = table.filter(pl.col("metric") == "dummy_abs").sort("layer")
    # independent: the same images through the encoder block by block, the metric by hand
    encoder, _, _ = jobs.load_encoder(str(encoder_pt))
    data = jobs.load_data(ana, torch.device("cpu"))
    _, eval_transform = jobs.make_transforms(ana, data, torch.device("cpu"))
    x = eval_transform(next(iter(data.test.batches(16)))[0])
    with torch.no_grad():
        t = encoder.norm_pre(encoder.patch_drop(encoder._pos_embed(encoder.patch_embed(x))))
        expected = [t[:, encoder.num_prefix_tokens:].abs().mean().item()]
        for blk in encoder.blocks:
            t = blk(t)
            expected.append(t[:, encoder.num_prefix_tokens:].abs().mean().item())
    assert got["layer"].to_list() == list(range(len(expected))) and set(got["head"].to_list()) == {-1}
    assert got["value"].to_list() == pytest.approx(expected, rel=1e-5)
    assert {"attention_distance", "nmi", "token_cosine", "fourier_hf", "layer_probe_top1"} <= set(table["metric"])

    rep = table.with_columns(pl.lit("digits").alias("dataset"), pl.lit("dummy_pixel").alias("pretext")).group_by(
        ["dataset", "pretext", "layer", "metric"]).agg(pl.col("value").mean().alias("value_mean"),
                                                       pl.lit(0.0).alias("value_std"))
    fig = figures.plot_representation(rep, str(tmp_path / "representation.png"))
    titles = [ax.get_title() for ax in fig.axes]
    assert "digits: dummy_abs" in titles and len(titles) == len(METRICS)  # every registered metric, a panel each
    assert "mean |token|" in [ax.get_ylabel() for ax in fig.axes]


def test_dummy_transfer_method_runs_and_takes_the_layers_axis(tmp_path, registered):
    registered(TRANSFER_METHODS, "dummy_embed", run_frozen_embedding, needs_teacher=True, loads_teacher=True,
               layered=True, colour="#abcdef")
    torch.manual_seed(0)
    teacher = create_model(mixer="attention", **dict(VARIANTS["vit_digits"], in_chans=1, num_classes=0))
    path = tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), path)
    cfg = _cfg(tmp_path, "tr", question="transfer", job="transfer",
               transfer=TransferConfig(method="dummy_embed", teacher=f"file:{path}", teacher_name="t"))
    rec = jobs.run(cfg)
    assert rec["method"] == "dummy_embed" and rec["dummy_ran"] and 0 <= rec["top1_test"] <= 100
    student = torch.load(tmp_path / "tr" / "model.pt", weights_only=True)["model"]
    for k, v in teacher.patch_embed.state_dict().items():  # the frozen embedding is the teacher's, bit for bit
        torch.testing.assert_close(student[f"patch_embed.{k}"], v, rtol=0, atol=0)
    assert not torch.equal(student["blocks.0.attn.qkv.weight"], teacher.state_dict()["blocks.0.attn.qkv.weight"])
    # the grid, the consumed checkpoints, the tables and the figures follow the registry
    assert "dummy_embed" in workflow.LAYERED_METHODS and "dummy_embed" in LAYERED
    from vitablate.config import consumed_checkpoints
    assert consumed_checkpoints(cfg) == [str(path)]
    from vitablate import aggregate
    assert aggregate.method_rank("dummy_embed") == len(TRANSFER_METHODS) - 1 < aggregate.method_rank("unknown")
    assert figures.color("dummy_embed") == "#abcdef"
    assert re.fullmatch(wildcard_constraints()["method"], "dummy_embed")


def test_unknown_names_are_errors_naming_the_key_and_the_choices():
    for registry, key in ((MIXERS, "architecture.mixers"), (PRETEXTS, "pretext.pretexts"),
                          (TRANSFER_METHODS, "transfer.methods"), (EVALS, "pretext.evals")):
        with pytest.raises(ValueError) as e:
            registry.entry("nope")
        assert "nope" in str(e.value) and key in str(e.value) and next(iter(registry)) in str(e.value)
    r = Registry("thing", "things", home="here", required_meta=("family",))
    with pytest.raises(ValueError, match="family"):
        r.register("a", object())
    r.register("a", object(), family="x")
    with pytest.raises(ValueError, match="already registered"):
        r.register("a", object(), family="x")
    with pytest.raises(ValueError, match="lower-case"):
        r.register("Bad-Name", object(), family="x")


# --- the schema and Snakemake's wildcards agree with the registries ------------------------------

def _schema():
    return yaml.safe_load((ROOT / "config" / "schema.yaml").read_text())["properties"]


@pytest.mark.parametrize("section, key, registry", [
    ("architecture", "mixers", MIXERS), ("pretext", "pretexts", PRETEXTS), ("pretext", "evals", EVALS),
    ("transfer", "methods", TRANSFER_METHODS),
])
def test_schema_list_enums_are_the_registries(section, key, registry):
    enum = _schema()[section]["properties"][key]["items"]["enum"]
    assert sorted(enum) == sorted(registry), f"config/schema.yaml {section}.{key} and the {registry.kind} registry"


@pytest.mark.parametrize("section, key, registry", [
    ("architecture", "by_mixer", MIXERS), ("pretext", "by_pretext", PRETEXTS),
    ("transfer", "by_method", TRANSFER_METHODS),
])
def test_schema_per_setting_sections_are_the_registries(section, key, registry):
    enum = _schema()[section]["properties"][key]["propertyNames"]["enum"]
    assert sorted(enum) == sorted(registry), f"config/schema.yaml {section}.{key} and the {registry.kind} registry"


def test_wildcard_constraints_come_from_the_registries():
    text = (ROOT / "rules" / "common.smk").read_text()
    block = text[text.index("wildcard_constraints:"):]
    for name in ("mixer", "pretext", "eval", "method"):
        assert re.search(rf"^\s+{name}=REGISTERED\[\"{name}\"\],", block, re.M), f"{name} is not generated"
    patterns = wildcard_constraints()
    for name, registry in (("mixer", MIXERS), ("pretext", PRETEXTS), ("eval", EVALS), ("method", TRANSFER_METHODS)):
        for n in registry:
            assert re.fullmatch(patterns[name], n)
        assert not re.fullmatch(patterns[name], "clone")
        assert not re.fullmatch(patterns[name], f"{next(iter(registry))}x")
    assert re.fullmatch(patterns["pretext"], "hybrid_0.2") and not re.fullmatch(patterns["pretext"], "hybrid_x")


def test_registries_import_no_torch():
    import subprocess
    import sys

    code = ("import sys, vitablate.registry as r, vitablate.workflow, vitablate.summary, vitablate.figures; "
            "r.wildcard_constraints(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the Snakemake parse and the reports stay fast


@pytest.mark.slow  # MLflow's store is created: ~10 s
def test_a_dry_job_runs_its_task_body_without_importing_torch(tmp_path):
    """execution.dry_jobs (orchestration benchmarks, cluster smoke tests): the Ray task's body runs the dry job,
    tracked in MLflow, in a process that never imports torch, so its worker starts in about a second."""
    import json
    import subprocess
    import sys

    cfg = {"job": "train_classifier", "question": "architecture", "output_dir": str(tmp_path / "job"),
           "data": {"name": "digits"}, "model": {"variant": "vit_digits"}, "execution": {"dry_jobs": True}}
    code = ("import json, sys; from vitablate.config import JobConfig, from_dict, to_dict; "
            "from vitablate.submit import _execute; "
            f"cfg = to_dict(from_dict(JobConfig, json.loads({json.dumps(json.dumps(cfg))}))); "
            f"r = _execute(cfg, 'sqlite:///{tmp_path}/mlflow.db', 'dry'); "
            "print(json.dumps([r['dry'], bool(r['mlflow_run_id']), 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, True, False]
