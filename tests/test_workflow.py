"""Workflow: dry-run DAG tests with the real Snakemake, config validation, lint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO, job_counts, read_config, set_dotted, snakemake, write_config


def seeds_of(section: dict, *values: str) -> set:
    """A grid cell's seeds: `seeds` minus those any `seeds_by` entry naming one of its values leaves out."""
    out = set(section["seeds"])
    for v in values:
        out &= set(section.get("seeds_by", {}).get(v, section["seeds"]))
    return out


def grid_size(config: dict) -> int:
    a = config["architecture"]
    return len(a["datasets"]) * sum(len(seeds_of(a, m)) for m in a["mixers"])


def test_default_dag_has_one_job_per_grid_point(workflow):
    r = snakemake(workflow, "-n", "--cores", "2")
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout + r.stderr)
    assert counts["train_architecture"] == grid_size(read_config(workflow))
    assert counts["architecture_report"] == 1


def test_changing_the_config_changes_the_dag(workflow):
    config = read_config(workflow)
    config["architecture"]["mixers"] = ["attention", "feedforward"]
    config["architecture"]["seeds"] = [0, 1, 2, 3]
    config["architecture"]["seeds_by"] = {}
    config["architecture"]["datasets"] = ["digits", "shapes"]
    write_config(workflow, config)
    r = snakemake(workflow, "-n", "--cores", "2")
    assert r.returncode == 0, r.stderr
    a = config["architecture"]
    assert job_counts(r.stdout + r.stderr)["train_architecture"] == len(a["mixers"]) * len(a["seeds"]) * len(
        a["datasets"])


def test_architecture_target_and_finished_jobs_are_not_rerun(workflow):
    """The `architecture` target plans Q1 only; a record already on disk (and newer than nothing it depends
    on) is not scheduled again."""
    n = grid_size(read_config(workflow))
    r = snakemake(workflow, "-n", "--cores", "2", "architecture")
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout + r.stderr)
    assert counts["train_architecture"] == n
    assert set(counts) == {"train_architecture", "architecture_report", "architecture"}
    done = workflow / "results/architecture/digits/attention/seed0/record.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    r = snakemake(workflow, "-n", "--cores", "2", "architecture")
    assert job_counts(r.stdout + r.stderr)["train_architecture"] == n - 1


BAD_CONFIGS = [
    # (key, value, words the error must contain)
    ("architecture.mixers", ["attention", "convolution"], ["convolution", "attention", "feedforward"]),
    ("architecture.seeds", "three", ["seeds", "array"]),
    ("architecture.train.lr", -1.0, ["lr", "minimum"]),
    ("architecture.train.epcohs", 3, ["epcohs"]),
    ("execution.precision", "fp16", ["precision", "bf16"]),
    ("execution.num_gpus", "one", ["num_gpus", "number"]),
    ("architecture.datasets", ["mnist"], ["mnist", "digits"]),
    ("datasets.digits.model.variant", "vit_huge", ["vit_huge", "vit_digits"]),
    ("datasets.digits.train.augment.flip", "yes", ["flip", "boolean"]),
    ("architecture.seeds", [0, 0], ["seeds"]),
]


def _validate_in_process(config: dict) -> str:
    """What the Snakefile checks before any job, in this process: the raw-config checks, the JSON schema (by
    Snakemake's own validate), the cross-field checks. Returns the error message ("" when valid)."""
    from snakemake.utils import validate

    from vitablate import workflow as vw

    try:
        vw.check_raw_config(config)
        validate(config, str(REPO / "config" / "schema.yaml"))
        vw.check_config(config)
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        return str(e)
    return ""


@pytest.mark.parametrize("key, value, words", BAD_CONFIGS, ids=[b[0] + "=" + str(b[1]) for b in BAD_CONFIGS])
def test_bad_config_is_refused_naming_the_key(key, value, words):
    default = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert _validate_in_process(default) == ""
    message = _validate_in_process(set_dotted(default, key, value))
    assert message, f"{key}={value!r} was accepted"
    for w in words:
        assert w in message, f"error for {key}={value!r} does not mention {w!r}:\n{message[-2000:]}"


@pytest.mark.parametrize("key, value, words", [BAD_CONFIGS[0], BAD_CONFIGS[3]], ids=["mixer", "typo"])
def test_bad_config_stops_snakemake_before_any_job(workflow, key, value, words):
    """End to end for two of them: Snakemake itself stops, naming the key, and starts nothing."""
    write_config(workflow, set_dotted(read_config(workflow), key, value))
    r = snakemake(workflow, "--cores", "2")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    for w in words:
        assert w in out, f"error for {key}={value!r} does not mention {w!r}:\n{out[-2000:]}"
    assert not (workflow / "results").exists(), "a job started despite the bad config"


def test_lint_is_clean(workflow):
    r = snakemake(workflow, "--lint")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "good condition" in r.stdout + r.stderr


def pretext_grid(config: dict) -> tuple[int, int]:
    p = config["pretext"]
    cells = [(name,) for name in p["pretexts"] if name != "hybrid"] + [
        ("hybrid", f"hybrid_{lam:g}") for lam in p.get("hybrid_lambdas", [0.2]) if "hybrid" in p["pretexts"]]
    n = len(p["datasets"]) * sum(len(seeds_of(p, *cell)) for cell in cells)
    return n, n * len(p["evals"])


def test_pretext_dag_covers_pretext_eval_analysis_grid(workflow):
    config = read_config(workflow)
    n_pretrain, n_eval = pretext_grid(config)
    r = snakemake(workflow, "-n", "--cores", "2", "pretext")
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout + r.stderr)
    assert counts["pretrain"] == n_pretrain and counts["pretext_eval"] == n_eval
    assert counts["pretext_analysis"] == n_pretrain and counts["pretext_report"] == 1
    assert "train_architecture" not in counts


def test_pretext_grid_axes_change_the_dag(workflow):
    config = read_config(workflow)
    config.pop("transfer")  # its default teachers name pretexts this grid leaves out
    config["pretext"].update(pretexts=["moco", "hybrid"], hybrid_lambdas=[0.2, 0.5, 0.8], seeds=[0, 1, 2],
                             evals=["knn"], seeds_by={})
    write_config(workflow, config)
    r = snakemake(workflow, "-n", "--cores", "2", "pretext")
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout + r.stderr)
    n_pretrain, n_eval = pretext_grid(config)
    assert (n_pretrain, n_eval) == (4 * 3, 4 * 3)  # moco and three hybrids, 3 seeds, 1 evaluation
    assert counts["pretrain"] == n_pretrain and counts["pretext_eval"] == n_eval
    assert "hybrid_0.5" in r.stdout + r.stderr


def test_evaluations_depend_on_their_pretraining(workflow):
    """Every evaluation and analysis job of a (pretext, seed) waits on that pre-training's encoder."""
    config = read_config(workflow)
    config.pop("transfer")
    config["pretext"].update(pretexts=["mae"], seeds=[0])
    write_config(workflow, config)
    r = snakemake(workflow, "--cores", "2", "pretext", "--dag", "dot")
    assert r.returncode == 0, r.stderr
    dot = r.stdout
    labels = dict(re.findall(r'(\d+)\[label = "([a-z_]+)', dot))
    edges = re.findall(r"(\d+) -> (\d+)", dot)
    pre = [n for n, lab in labels.items() if lab == "pretrain"]
    assert len(pre) == 1
    children = [labels[b] for a, b in edges if a == pre[0]]
    assert set(children) == {"pretext_eval", "pretext_analysis", "pretext_report"}  # the report: loss curves
    assert sum(1 for c in children if c != "pretext_report") == 4  # 3 evals + 1 analysis


def test_transfer_dag_grid_and_dependency_on_pretext_checkpoints(workflow):
    config = read_config(workflow)
    t = config["transfer"]
    expected = len(seeds_of(t, "scratch")) + sum(
        len(seeds_of(t, teacher, m, *([layers] if m in ("attn_copy", "attn_distill") else [])))
        for teacher in t["teachers"] for m in t["methods"] if m != "scratch"
        for layers in (t["layers"] if m in ("attn_copy", "attn_distill") else ["all"]))
    r = snakemake(workflow, "-n", "--cores", "2", "transfer")
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout + r.stderr)
    assert counts["transfer_train"] == expected
    # the transfer target builds the teachers' pre-training (seed-matched), not the pretext evaluations
    assert counts["pretrain"] == sum(len(seeds_of(t, teacher)) for teacher in t["teachers"])
    assert "pretext_eval" not in counts and "train_architecture" not in counts
    dot = snakemake(workflow, "--cores", "2", "transfer", "--dag", "dot").stdout
    labels = dict(re.findall(r'(\d+)\[label = "([a-z_]+)', dot))
    edges = re.findall(r"(\d+) -> (\d+)", dot)
    pretrain_children = {labels[b] for a, b in edges if labels.get(a) == "pretrain"}
    # the students, and the shift jobs of the methods that run the teacher at test time
    assert pretrain_children == {"transfer_train", "transfer_shift"}


def test_transfer_with_file_teacher_needs_no_pretext(workflow, tmp_path):
    config = read_config(workflow)
    teacher = tmp_path / "t.pth"
    teacher.write_bytes(b"x")
    config["transfer"]["teachers"] = {"mine": f"file:{teacher}"}
    config["transfer"]["seeds"], config["transfer"]["seeds_by"] = [0, 1], {}
    write_config(workflow, config)
    r = snakemake(workflow, "-n", "--cores", "2", "transfer")
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout + r.stderr)
    t = config["transfer"]
    layered = sum(m in ("attn_copy", "attn_distill") for m in t["methods"])
    scratch = "scratch" in t["methods"]
    per_seed = scratch + (len(t["methods"]) - scratch - layered) + layered * len(t["layers"])
    assert "pretrain" not in counts and counts["transfer_train"] == len(t["seeds"]) * per_seed


def test_unknown_pretext_teacher_is_refused(workflow):
    config = read_config(workflow)
    config["transfer"]["teachers"]["dino"] = "pretext:dino"
    write_config(workflow, config)
    r = snakemake(workflow, "-n", "--cores", "2", "transfer")
    assert r.returncode != 0 and "dino" in r.stdout + r.stderr and "pretext.pretexts" in r.stdout + r.stderr


def test_pretext_teacher_must_name_a_pretrained_hybrid_lambda():
    from vitablate import workflow as vw
    from vitablate.config import ConfigError

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["transfer"]["teachers"] = {"h": "pretext:hybrid_0.2"}  # the default grid pre-trains hybrid_0.2
    vw.check_config(config)
    config["transfer"]["teachers"] = {"h": "pretext:hybrid_0.5"}
    with pytest.raises(ConfigError, match=r"hybrid_0\.5.*hybrid_lambdas"):
        vw.check_config(config)


def test_recipe_layers_by_pretext_and_by_method():
    """pretext.by_pretext / transfer.by_method change one pretext's or method's recipe only; the
    dataset's own entry still wins; frozen evaluations do not read by_pretext (they train nothing)."""
    from vitablate import workflow as vw
    from vitablate.config import ConfigError

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["pretext"]["by_pretext"] = {"mae": {"pretrain": {"epochs": 7, "lr": 1e-4}, "finetune": {"epochs": 3}}}
    config["transfer"]["by_method"] = {"attn_copy": {"train": {"epochs": 5}}}
    config["datasets"]["digits"]["train"]["warmup_epochs"] = 0.5

    def train(kind, **wc):
        return vw.job_params(config, kind, dict(dataset="digits", seed=0, **wc))["train"]

    assert (train("pretrain", pretext="mae")["epochs"], train("pretrain", pretext="mae")["lr"]) == (7, 1e-4)
    assert train("pretrain", pretext="moco")["epochs"] == config["pretext"]["pretrain"]["epochs"]
    assert train("pretrain", pretext="mae")["warmup_epochs"] == 0.5  # the dataset's entry
    assert train("pretext_eval", pretext="mae", eval="finetune")["epochs"] == 3
    assert train("pretext_eval", pretext="mae", eval="knn") == train("pretext_eval", pretext="moco", eval="knn")
    assert train("transfer", teacher="moco", method="attn_copy", layers="all")["epochs"] == 5
    assert train("transfer", teacher="moco", method="attn_distill", layers="all")["epochs"] == 12
    config["pretext"]["by_pretext"]["mae"]["pretrain"]["accum_steps"] = 3
    with pytest.raises(ConfigError, match="accum_steps 3 does not divide batch_size 128"):
        train("pretrain", pretext="mae")


def test_ensemble_averages_the_student_distilled_over_the_first_layers_value():
    from vitablate import workflow as vw

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["transfer"]["layers"] = ["first:2", "all"]
    inputs = vw.transfer_inputs(config, "digits", "moco", "ensemble", "all", 0)
    assert [Path(p).parts[-4:-2] for p in inputs] == [("attn_distill", "first2"), ("finetune", "all")]


def test_seeds_by_narrows_each_axis_value_and_keeps_ensembles_whole():
    from vitablate import workflow as vw

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    t = config["transfer"]
    t.update(seeds=[0, 1, 2], layers=["all", "first:2"], methods=["scratch", "attn_copy", "finetune", "attn_distill",
                                                                  "ensemble"],
             teachers={"mae": "pretext:mae", "moco": "pretext:moco"},
             seeds_by={"moco": [0, 2], "first:2": [1, 2], "ensemble": [0]})
    jobs = {(j["teacher"], j["method"], j["layers"], j["seed"]) for j in vw.grid(config, "transfer")}
    assert {s for te, m, lay, s in jobs if (te, m, lay) == ("none", "scratch", "all")} == {0, 1, 2}
    assert {s for te, m, lay, s in jobs if (te, m, lay) == ("mae", "attn_copy", "all")} == {0, 1, 2}
    assert {s for te, m, lay, s in jobs if (te, m, lay) == ("mae", "attn_copy", "first2")} == {1, 2}
    assert {s for te, m, lay, s in jobs if (te, m, lay) == ("moco", "attn_copy", "first2")} == {2}  # both apply
    assert {s for te, m, lay, s in jobs if (te, m) == ("moco", "ensemble")} == {0}
    # a teacher encoder is the seed-matched pre-training
    assert vw.teacher_checkpoint(config, "digits", "mae", 2).endswith("pretext/digits/mae/seed2/encoder.pt")
    vw.check_config(config)
    # an ensemble needs its members at its own seeds
    t["seeds_by"].update(ensemble=[1], attn_distill=[0])
    with pytest.raises(vw.ConfigError, match="ensemble of teacher 'mae', seed 1, needs attn_distill"):
        vw.check_config(config)
