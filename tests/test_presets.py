"""Presets (config/presets/*.yaml): each passes the schema and builds its DAG in a dry run with
the job counts its own grid implies, nothing of the default digits grid, and the GPUs it asks for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from conftest import REPO, copy_workflow, job_counts, snakemake
from vitablate import workflow as vw

# reference_recipes.yaml beside them is the papers' recipe table (tests/test_recipes.py), not a preset
PRESETS = sorted(p for p in (REPO / "config" / "presets").glob("*.yaml") if p.name != "reference_recipes.yaml")
# what each preset is for: small runs packed four to a GPU, paper-scale runs on whole GPUs, CPU-only runs
GPUS_PER_JOB = {"cifar100-gpu": 0.25, "imagenet-paper": 1, "fashion-mnist-cpu": 0}
JOB_RULES = {"train_architecture": "architecture", "pretrain": "pretrain", "pretext_eval": "pretext_eval",
             "pretext_analysis": "analysis", "transfer_train": "transfer", "architecture_shift": "architecture_shift",
             "pretext_shift": "pretext_shift"}
LAYERED = ("attn_copy", "attn_distill")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def expected_counts(c: dict) -> dict[str, int]:
    """Jobs per rule, counted from the preset's own grid (written out here, not taken from vitablate)."""
    out: dict[str, int] = {"all": 1, "summary": 1}  # `all` includes the summary (reports/summary.md)

    def own_shift(d: str) -> bool:  # the dataset has shifted sets of its own: extra test folders, or shapes'
        return d == "shapes" or bool(((c.get("datasets") or {}).get(d, {}).get("data") or {}).get("extra_test_dirs"))

    if "architecture" in c:
        a = c["architecture"]
        out["train_architecture"] = len(a["datasets"]) * len(a["mixers"]) * len(a["seeds"])
        out["architecture_report"] = 1
        # each classifier on a dataset with shifted sets of its own is tested on them by its own job
        if shifted := [d for d in a["datasets"] if own_shift(d)]:
            out["architecture_shift"] = len(shifted) * len(a["mixers"]) * len(a["seeds"])
    if "pretext" in c:
        p = c["pretext"]
        n_pretexts = sum(len(p.get("hybrid_lambdas", [0.2])) if name == "hybrid" else 1 for name in p["pretexts"])
        n = len(p["datasets"]) * n_pretexts * len(p["seeds"])
        out |= {"pretrain": n, "pretext_eval": n * len(p["evals"]), "pretext_analysis": n, "pretext_report": 1}
        if shifted := [d for d in p["datasets"] if own_shift(d)]:  # and so is each evaluation
            out["pretext_shift"] = len(shifted) * n_pretexts * len(p["seeds"]) * len(p["evals"])
    if "transfer" in c:
        t = c["transfer"]
        per_teacher = sum(len(t["layers"]) if m in LAYERED else 1 for m in t["methods"] if m != "scratch")
        per_seed = ("scratch" in t["methods"]) + len(t["teachers"]) * per_teacher
        out |= {"transfer_train": len(t["datasets"]) * len(t["seeds"]) * per_seed, "transfer_report": 1}
        # distribution shift is its own job per trained student, where the preset has something to shift to
        # (generated corruptions or extra test folders)
        shifted = [d for d in t["datasets"] if (t.get("shift") or {}).get("corruptions")
                   or ((c.get("datasets") or {}).get(d, {}).get("data") or {}).get("extra_test_dirs")]
        if shifted:
            out["transfer_shift"] = len(shifted) * len(t["seeds"]) * per_seed
    return out


def dry_run_jobs(output: str) -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job a `snakemake -n` listed."""
    jobs, rule = [], None
    for line in output.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):", line):
            rule = m.group(1)
        elif (m := re.match(r"^\s+wildcards: (.*)$", line)) and rule:
            jobs.append((rule, dict(kv.split("=", 1) for kv in m.group(1).split(", "))))
    return jobs


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_passes_the_schema_and_the_cross_checks(path):
    config = load(path)
    validate(config, str(REPO / "config" / "schema.yaml"))
    vw.check_config(config)
    assert path.stem in GPUS_PER_JOB, f"say how many GPUs a job of {path.name} should ask for"


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_dag_and_gpu_requests(tmp_path, path):
    """`snakemake -n --configfile <preset>` schedules exactly the preset's grid: nothing of the default
    config (its digits datasets, its three pretext teachers) is merged in, and every job asks for the
    preset's GPUs. Its data paths do not exist here: a dry run needs none."""
    config = load(path)
    wf = copy_workflow(tmp_path / "wf")
    r = snakemake(wf, "-n", "--cores", "8", "--configfile", f"config/presets/{path.name}")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert job_counts(out) == expected_counts(config)
    assert "digits" not in out
    jobs = dry_run_jobs(out)
    training = [(rule, wc) for rule, wc in jobs if rule in JOB_RULES]
    assert len(training) == sum(n for rule, n in expected_counts(config).items() if rule in JOB_RULES)
    for rule, wc in training:
        # the params Snakemake hands the job: the rule's `params.job` is exactly this call
        params = vw.job_params(config, JOB_RULES[rule], wc)
        # resources are none of the params: the rule body adds them at run time (with_resources)
        assert "num_gpus" not in params["execution"]
        assert vw.with_resources(params, config).execution.num_gpus == GPUS_PER_JOB[path.stem], (rule, wc)
        assert params["train"]["batch_size"] % params["train"]["accum_steps"] == 0
        assert params["output_dir"].startswith(config["results_dir"] + "/")


def test_imagenet_preset_resolves_each_papers_recipe():
    config = load(REPO / "config" / "presets" / "imagenet-paper.yaml")

    def train(kind, **wc):
        return vw.job_params(config, kind, wc)["train"]

    base = dict(dataset="imagefolder", seed=0)
    epochs = {p: train("pretrain", pretext=p, **base)["epochs"] for p in ("supervised", "moco", "simmim", "mae")}
    assert epochs == {"supervised": 300, "moco": 300, "simmim": 800, "mae": 1600}
    assert train("pretrain", pretext="mae", **base)["batch_size"] == 4096
    assert train("pretrain", pretext="mae", **base)["betas"] == [0.9, 0.95]
    assert train("pretrain", pretext="hybrid_0.2", **base)["epochs"] == 300
    assert train("pretext_eval", pretext="moco", eval="finetune", **base)["epochs"] == 150
    assert train("pretext_eval", pretext="mae", eval="finetune", **base)["epochs"] == 100
    # frozen evaluations train nothing: they read the shared recipe, so by_pretext cannot re-run them
    assert train("pretext_eval", pretext="moco", eval="knn", **base) == train("pretext_eval", pretext="mae",
                                                                              eval="knn", **base)
    t = dict(dataset="imagefolder", teacher="mae_large", seed=0)
    assert train("transfer", method="attn_copy", layers="first21", **t)["epochs"] == 100
    assert train("transfer", method="attn_distill", layers="first18", **t)["epochs"] == 200
    assert train("transfer", method="finetune", layers="all", **t)["epochs"] == 50
    job = vw.job_params(config, "transfer", dict(method="attn_copy", layers="first21", **t))
    assert job["transfer"]["teacher"] == "timm:vit_large_patch16_224.mae"
    assert job["transfer"]["layers"] == "first:21" and job["model"]["variant"] == "vit_large_patch16_224"
    ensemble = vw.job_params(config, "transfer", dict(method="ensemble", layers="all", **t))
    assert [Path(p).parts[-4:-2] for p in ensemble["transfer"]["ensemble_members"]] == [
        ("attn_distill", "first21"), ("finetune", "all")]  # the reference layer set: the released code's first 21
    assert vw.reference_layers(config) == "first:21"


@pytest.mark.slow  # a real (non-dry) Snakemake run
def test_a_real_run_without_the_data_stops_before_any_job_naming_the_path(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    r = snakemake(wf, "--cores", "2", "--configfile", "config/presets/cifar100-gpu.yaml", timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "data/cifar-100-python" in out and "not found" in out, out[-3000:]
    assert not (wf / "results" / "cifar100-gpu" / "cifar100").exists()


def test_fashion_mnist_preset_gives_every_headline_arm_five_seeds():
    config = load(REPO / "config" / "presets" / "fashion-mnist-cpu.yaml")
    counts = {}
    for rule, kind in (("train_architecture", "architecture"), ("pretrain", "pretrain"),
                       ("pretext_eval", "pretext_eval"), ("transfer_train", "transfer")):
        for wc in vw.grid(config, kind):
            key = (rule, wc.get("mixer"), wc.get("pretext"), wc.get("eval"), wc.get("teacher"), wc.get("method"),
                   wc.get("layers"))
            counts[key] = counts.get(key, 0) + 1
    headline = [("train_architecture", m, None, None, None, None, None) for m in ("attention", "feedforward")]
    headline += [("pretext_eval", None, p, e, None, None, None) for p in ("moco", "mae")
                 for e in ("linear_probe", "finetune")]
    headline += [("transfer_train", None, None, None, "none", "scratch", "all")]
    headline += [("transfer_train", None, None, None, "mae", m, "all") for m in ("finetune", "attn_copy", "attn_distill")]
    assert all(counts.get(k, 0) >= 5 for k in headline), {k: counts.get(k, 0) for k in headline}
    assert config["execution"]["num_gpus"] == 0 and config["datasets"]["fashion_mnist"]["data"]["n_train"] >= 1000


@pytest.mark.slow  # a real (non-dry) Snakemake run
def test_fashion_mnist_with_a_truncated_file_stops_before_any_job(tmp_path):
    """The files are checked before the first job: a download cut short names the file and the fix."""
    src = Path("/usr/share/datasets/fashion-mnist")
    if not (src / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"{src} lacks Fashion-MNIST: tools/get-data.sh fashion-mnist (.ci/run installs it)")
    bad = tmp_path / "data"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    blob = (bad / "t10k-images-idx3-ubyte.gz").read_bytes()
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 3])
    wf = copy_workflow(tmp_path / "wf")
    r = snakemake(wf, "--cores", "2", "--configfile", "config/presets/fashion-mnist-cpu.yaml",
                  "--config", f"data_root={bad}", timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert f"{bad}/t10k-images-idx3-ubyte.gz is truncated" in out, out[-3000:]
    assert "tools/get-data.sh fashion-mnist" in out
    assert not list((wf / "results").rglob("record.json"))
