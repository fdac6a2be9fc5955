"""A job's params are what determines its result: resources, other evaluations' settings and the shift
settings change no training job's params, so Snakemake re-runs exactly the jobs whose results could change."""

from __future__ import annotations


import pytest
import yaml

from conftest import REPO, job_counts, set_dotted, snakemake, write_config
from vitablate import workflow as vw

KINDS = ("architecture", "architecture_shift", "pretrain", "pretext_eval", "pretext_shift", "analysis", "transfer",
         "shift")
RULES = {"architecture": "train_architecture", "architecture_shift": "architecture_shift", "pretrain": "pretrain",
         "pretext_eval": "pretext_eval", "pretext_shift": "pretext_shift", "analysis": "pretext_analysis",
         "transfer": "transfer_train", "shift": "transfer_shift"}
SHIFT_KINDS = ("architecture_shift", "pretext_shift", "shift")


def tiny_config(results: str = "results") -> dict:
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["results_dir"] = results
    config["reports_dir"] = f"{results}/reports"
    config["architecture"].update(mixers=["attention", "feedforward"], seeds=[0, 1], seeds_by={})
    config["pretext"].update(pretexts=["mae", "moco"], seeds=[0], seeds_by={},
                             evals=["linear_probe", "finetune", "knn"])
    config["transfer"].update(teachers={"mae": "pretext:mae"}, seeds=[0, 1], seeds_by={}, layers=["all", "first:2"],
                              methods=["scratch", "finetune", "linear_probe", "attn_copy", "attn_distill", "ensemble"])
    return config


def all_params(config: dict) -> dict:
    return {(kind, tuple(sorted(wc.items()))): vw.job_params(config, kind, wc)
            for kind in KINDS for wc in vw.grid(config, kind)}


def changed(before: dict, after: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, params in before.items():
        if after[key] != params:
            out[key[0]] = out.get(key[0], 0) + 1
    return out


# (setting, new value, the grid kinds whose every job's params change; all others keep theirs; an evaluation's
# name stands for its pretext_eval jobs, <name>_shift for its pretext_shift jobs)
CHANGES = [
    ("execution.num_gpus", 1, ()),
    ("execution.num_cpus", 2, ()),
    ("execution.max_retries", 0, ()),
    ("execution.memory_gb", 4, ()),
    ("execution.data_on_device", False, ()),
    ("execution.dry_job_sleep_s", 1.0, ()),
    ("pretext.execution", {"num_cpus": 2}, ()),
    ("pretext.eval.knn_k", 5, ("knn", "knn_shift")),  # the k-NN evaluations and their shift jobs (which vote so)
    ("pretext.eval.analysis_images", 64, ("analysis",)),
    ("pretext.eval.probe_weight_decay", [1.0e-3], ("linear_probe", "analysis")),
    ("transfer.shift.severity", 2, ("shift",)),
    ("transfer.shift.corruptions", ["contrast"], ("shift",)),
    ("execution.precision", "fp32", KINDS),  # numerics: every job
]


def expected(config: dict, kinds: tuple) -> dict[str, int]:
    out: dict[str, int] = {}
    for kind in KINDS:
        wcs = vw.grid(config, kind)
        if kind == "pretext_eval":
            wcs = [wc for wc in wcs if kind in kinds or wc["eval"] in kinds]
        elif kind == "pretext_shift":
            wcs = [wc for wc in wcs if kind in kinds or f"{wc['eval']}_shift" in kinds]
        elif kind not in kinds:
            wcs = []
        if wcs:
            out[kind] = len(wcs)
    return out


@pytest.mark.parametrize("key, value, kinds", CHANGES, ids=[c[0] for c in CHANGES])
def test_changing_a_setting_changes_the_params_of_exactly_the_jobs_that_read_it(key, value, kinds):
    config = tiny_config()
    vw.check_config(config)
    changed_config = set_dotted(config, key, value)
    vw.check_config(changed_config)
    assert changed(all_params(config), all_params(changed_config)) == expected(config, kinds)


def test_evaluation_params_hold_only_their_own_settings():
    config = tiny_config()
    wc = dict(dataset="digits", pretext="mae", seed=0)
    knn = vw.job_params(config, "pretext_eval", dict(wc, eval="knn"))
    finetune = vw.job_params(config, "pretext_eval", dict(wc, eval="finetune"))
    from vitablate.config import EvalConfig, ExecutionConfig

    default = EvalConfig()
    assert knn["eval"]["knn_k"] == config["pretext"]["eval"]["knn_k"]
    assert knn["eval"]["probe_weight_decay"] == default.probe_weight_decay  # not the configured list: unread
    assert {k: v for k, v in finetune["eval"].items() if k != "name"} == {
        k: v for k, v in vars(default).items() if k != "name"}
    for params in (knn, finetune):
        assert not set(params["execution"]) & set(vw.RESOURCE_KEYS)
    # the rule body adds the resources back from the workflow config
    config["execution"]["num_cpus"] = 3
    config["pretext"]["execution"] = {"max_retries": 7}
    job = vw.with_resources(knn, config)
    assert (job.execution.num_cpus, job.execution.max_retries) == (3, 7)
    assert job.execution.precision == ExecutionConfig().precision == "auto"


def test_transfer_training_holds_no_shift_settings_and_the_shift_job_reads_its_model():
    config = tiny_config()
    config["datasets"]["digits"]["data"] = {"extra_test_dirs": {"mine": "/somewhere"}}
    for wc in vw.grid(config, "transfer"):
        train = vw.transfer_job(config, **wc)
        assert train.shift.corruptions == [] and not train.shift.in_job and train.data.extra_test_dirs == {}
        shift = vw.shift_job(config, **wc)
        assert shift.shift.corruptions == config["transfer"]["shift"]["corruptions"] and shift.shift.in_job
        assert shift.data.extra_test_dirs == {"mine": "/somewhere"}
        saved = {"ensemble": None, "linear_probe": "probe.pt"}.get(wc["method"], "model.pt")
        assert shift.init_from == (f"{train.output_dir}/{saved}" if saved else None)
        inputs = vw.shift_inputs(config, **wc)
        assert inputs[0] == f"{train.output_dir}/record.json"
        if wc["method"] in ("attn_copy", "linear_probe"):  # the teacher runs at test time
            assert shift.transfer.teacher == train.transfer.teacher and len(inputs) == 2
        if wc["method"] == "ensemble":
            assert [m.rsplit("/", 1)[0] + "/record.json" for m in shift.transfer.ensemble_members] == inputs[1:]
    assert len(vw.grid(config, "shift")) == len(vw.grid(config, "transfer"))
    config["transfer"]["shift"]["corruptions"] = []
    del config["datasets"]["digits"]["data"]
    assert vw.grid(config, "shift") == []  # nothing to shift to: no shift jobs


def _with_extra_test_dirs(config: dict, dirs: dict) -> dict:
    return set_dotted(config, "datasets.digits.data", {"extra_test_dirs": dirs})


def test_extra_test_dirs_change_the_params_of_exactly_the_shift_jobs_of_every_question():
    """A dataset's extra_test_dirs are read by the shift jobs alone: Q1's classifiers, Q2's evaluations and Q3's
    students are tested on them by jobs of their own, so no training, pre-training or evaluation job moves."""
    config = _with_extra_test_dirs(tiny_config(), {"mine": "/somewhere"})
    vw.check_config(config)
    # one shift job per Q1 classifier, Q2 evaluation and Q3 student on the dataset (counted from the grid)
    assert len(vw.grid(config, "architecture_shift")) == len(vw.grid(config, "architecture")) == 4
    assert len(vw.grid(config, "pretext_shift")) == len(vw.grid(config, "pretext_eval")) == 6
    for dirs in ({"mine": "/elsewhere"}, {"mine": "/somewhere", "more": "/there"}):
        moved = changed(all_params(config), all_params(_with_extra_test_dirs(config, dirs)))
        assert moved == {kind: len(vw.grid(config, kind)) for kind in SHIFT_KINDS}, dirs
    # from none at all: Q3's shift jobs (the corruptions gave it some) move; Q1's and Q2's are new; nothing else
    plain, after = all_params(tiny_config()), all_params(config)
    assert changed(plain, after) == {"shift": len(vw.grid(config, "shift"))}
    new = sorted(key[0] for key in set(after) - set(plain))
    assert new == sorted(["architecture_shift"] * 4 + ["pretext_shift"] * 6)
    # each shift job reads the dirs; nothing else does
    for kind in KINDS:
        for wc in vw.grid(config, kind):
            dirs = vw.job_params(config, kind, wc)["data"]["extra_test_dirs"]
            assert dirs == ({"mine": "/somewhere"} if kind in SHIFT_KINDS else {}), (kind, wc)


def test_q1_and_q2_shift_jobs_come_from_the_dataset_alone_and_read_what_their_job_saved():
    config = tiny_config()
    # transfer.shift's corruptions are Q3's: they give no Q1 or Q2 job a shift job
    assert config["transfer"]["shift"]["corruptions"] and vw.grid(config, "shift")
    assert vw.grid(config, "architecture_shift") == [] and vw.grid(config, "pretext_shift") == []
    # shapes brings its cue-conflict set: every classifier and evaluation on it has a shift job
    config["architecture"]["datasets"] = config["pretext"]["datasets"] = ["shapes"]
    assert len(vw.grid(config, "architecture_shift")) == len(vw.grid(config, "architecture"))
    assert len(vw.grid(config, "pretext_shift")) == len(vw.grid(config, "pretext_eval"))
    wc = dict(dataset="shapes", mixer="attention", seed=0)
    trained, shift = vw.architecture_job(config, **wc), vw.architecture_shift_job(config, **wc)
    assert not trained.shift.in_job and shift.shift.in_job and shift.shift.corruptions == []
    assert shift.init_from == f"{trained.output_dir}/model.pt" and shift.output_dir == f"{trained.output_dir}/shift"
    assert vw.architecture_shift_inputs(config, **wc) == [f"{trained.output_dir}/record.json"]
    assert (shift.job, shift.tags["job"], shift.tags["question"]) == ("evaluate_shift", "shift", "architecture")
    base = dict(dataset="shapes", pretext="mae", seed=0)
    encoder = vw.pretext_eval_job(config, eval="knn", **base).init_from
    saved = {"finetune": "model.pt", "linear_probe": "probe.pt", "knn": None}
    for name in ("finetune", "linear_probe", "knn"):
        evaluated = vw.pretext_eval_job(config, eval=name, **base)
        shift = vw.pretext_shift_job(config, eval=name, **base)
        assert not evaluated.shift.in_job and shift.shift.in_job and shift.tags["eval"] == name
        assert shift.init_from == (f"{evaluated.output_dir}/{saved[name]}" if saved[name] else encoder)
        inputs = vw.pretext_shift_inputs(config, eval=name, **base)
        assert inputs == [f"{evaluated.output_dir}/record.json"] + ([encoder] if name != "finetune" else [])
        # the checkpoints a job without a shared filesystem downloads: what it tests, and the frozen encoder
        from vitablate.config import consumed_checkpoints

        assert consumed_checkpoints(shift) == [shift.init_from] + ([encoder] if name == "linear_probe" else [])
    # k-NN's shift job reads the evaluation's k and temperature, the others no evaluation setting
    knn = vw.job_params(config, "pretext_shift", dict(base, eval="knn"))
    assert (knn["eval"]["knn_k"], knn["eval"]["knn_temperature"]) == (config["pretext"]["eval"]["knn_k"], 0.07)
    moved = changed(all_params(config), all_params(set_dotted(config, "pretext.eval.knn_k", 5)))
    n_knn = len(vw.grid(config, "pretrain"))  # one k-NN evaluation per encoder
    assert moved == {"pretext_eval": n_knn, "pretext_shift": n_knn}


def _targets(config: dict) -> list[str]:
    """Every job's record (the report rules need trained models: dry jobs train none)."""
    patterns = {"architecture": "{r}/architecture/{dataset}/{mixer}/seed{seed}/record.json",
                "architecture_shift": "{r}/architecture/{dataset}/{mixer}/seed{seed}/shift/record.json",
                "pretrain": "{r}/pretext/{dataset}/{pretext}/seed{seed}/record.json",
                "pretext_eval": "{r}/pretext/{dataset}/{pretext}/seed{seed}/{eval}/record.json",
                "pretext_shift": "{r}/pretext/{dataset}/{pretext}/seed{seed}/{eval}/shift/record.json",
                "analysis": "{r}/pretext/{dataset}/{pretext}/seed{seed}/analysis/record.json",
                "transfer": "{r}/transfer/{dataset}/{teacher}/{method}/{layers}/seed{seed}/record.json",
                "shift": "{r}/transfer/{dataset}/{teacher}/{method}/{layers}/seed{seed}/shift/record.json"}
    return [patterns[kind].format(r=config["results_dir"], **wc) for kind in KINDS for wc in vw.grid(config, kind)]


@pytest.mark.slow
def test_snakemake_reruns_exactly_the_jobs_a_change_affects(workflow, ray_cluster):
    """A really tiny real run of every job (one epoch each) through Snakemake and Ray; then, for each change,
    `snakemake -n` plans exactly the jobs whose params it changes, counted from the grid."""
    config = tiny_config()
    config["architecture"].update(mixers=["attention"])
    config["pretext"].update(pretexts=["mae"])
    config["transfer"].update(methods=["scratch", "attn_copy", "linear_probe"], layers=["all"], seeds=[0])
    for section, recipe in (("architecture", "train"), ("pretext", "pretrain"), ("pretext", "finetune"),
                            ("transfer", "train")):
        config[section][recipe]["epochs"] = 1
    folders = {name: _digit_folder(workflow / name) for name in ("ood", "ood2")}  # a shifted set, and another
    config = _with_extra_test_dirs(config, {"ood": folders["ood"]})
    write_config(workflow, config)
    targets = _targets(config)
    r = snakemake(workflow, "--cores", "1", *targets, env=ray_cluster)  # one Ray worker (conftest.ray_cluster)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    r = snakemake(workflow, "-n", "--cores", "2", *targets)
    assert r.returncode == 0 and job_counts(r.stdout + r.stderr) == {}, (r.stdout + r.stderr)[-3000:]
    for key, value, kinds in [c for c in CHANGES if c[0] in (
            "execution.num_gpus", "execution.num_cpus", "execution.max_retries", "pretext.eval.knn_k",
            "transfer.shift.severity")]:
        write_config(workflow, set_dotted(config, key, value))
        r = snakemake(workflow, "-n", "--cores", "2", *targets)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        want = {RULES[k]: n for k, n in expected(config, kinds).items()}
        assert job_counts(r.stdout + r.stderr) == want, (key, (r.stdout + r.stderr)[-3000:])
    # another shifted set: exactly the shift jobs of Q1, Q2 and Q3 on the dataset re-run (counted from the grid)
    write_config(workflow, _with_extra_test_dirs(config, {"ood": folders["ood2"]}))
    r = snakemake(workflow, "-n", "--cores", "2", *targets)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    want = {RULES[k]: len(vw.grid(config, k)) for k in SHIFT_KINDS}
    assert all(want.values()) and job_counts(r.stdout + r.stderr) == want, (r.stdout + r.stderr)[-3000:]


def _digit_folder(root) -> str:
    """A tiny ImageFolder of two digit classes (as tests/test_data.py writes one): 2 grey images each."""
    from PIL import Image

    for c in ("3", "7"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (20, 20), color=60 * i + 40 * int(c == "7")).save(root / c / f"{i}.png")
    return str(root)


@pytest.mark.parametrize("key, value, methods", [
    ("transfer.distill_weight", 1.0, {"attn_distill"}),
    ("transfer.distill_temperature", 2.0, {"attn_distill"}),
    ("transfer.teacher_drop_path", True, {"attn_distill", "attn_copy"}),
])
def test_a_transfer_setting_changes_only_the_students_of_the_methods_that_read_it(key, value, methods):
    config = tiny_config()
    changed_config = set_dotted(config, key, value)
    vw.check_config(changed_config)
    moved = sorted(wc["method"] for wc in vw.grid(config, "transfer")
                   if vw.job_params(config, "transfer", wc) != vw.job_params(changed_config, "transfer", wc))
    # the students of those methods, every layer set and seed (counted from the grid); nothing else
    assert moved == sorted(wc["method"] for wc in vw.grid(config, "transfer") if wc["method"] in methods)
    # a shift job's params hold none of the training settings: it re-runs when its student's model.pt does
    assert all(vw.job_params(config, "shift", wc) == vw.job_params(changed_config, "shift", wc)
               for wc in vw.grid(config, "shift"))


@pytest.mark.parametrize("key, value, switch", [
    ("architecture.train.ema_decay", 0.9, ("architecture.train.ema", True)),
    ("architecture.train.lr_batch_ref", 512, ("datasets.digits.train.blr", 1.0e-3)),
    ("architecture.train.mix_prob", 0.5, ("architecture.train.mixup_alpha", 0.8)),
    ("architecture.train.lr_step_gamma", 0.5, None),
])
def test_a_setting_read_only_when_switched_on_changes_no_params_while_off(key, value, switch):
    config = tiny_config()
    before = all_params(config)
    assert changed(before, all_params(set_dotted(config, key, value))) == {}  # off: nothing moves
    if switch is not None:  # on: every architecture job reads it
        on = set_dotted(config, *switch)
        assert changed(all_params(on), all_params(set_dotted(on, key, value))) == {
            "architecture": len(vw.grid(config, "architecture"))}
