"""Faults found by injecting them into the real workflow (issue 14): each ends in a clear message naming the key
or path, before any job where it can be seen before, and in a state a plain re-run fixes.

Stale reports (a run that plans nothing and leaves old files), validation holes (NaN, huge seeds, an alias bomb,
a config that is not a mapping, unreadable records, empty image classes, absurd grids).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import job_counts, read_config, snakemake, write_config
from vitablate import aggregate
from vitablate.config import ConfigError
from vitablate.workflow import check_config, check_data


def _architecture_only(workflow, **execution) -> dict:
    config = read_config(workflow)
    config = {k: v for k, v in config.items() if k not in ("pretext", "transfer")}
    config["architecture"].update(mixers=["identity"], seeds=[0])
    config["execution"].update(dry_jobs=True, **execution)
    return config


def _check(tmp_path, text: str, timeout: int = 60) -> subprocess.CompletedProcess:
    """`vitablate check` on a config file holding `text` (the repository's schema)."""
    from conftest import REPO

    path = tmp_path / "config.yaml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "vitablate.cli", "check", str(path), "--schema",
                           str(REPO / "config/schema.yaml")], capture_output=True, text=True, timeout=timeout)


# --- 1. stale results are never reported as fresh ------------------------------------------------------------

def _fresh_clone(dest):
    """Every file git tracks, as a fresh clone has them (committed reports included, wherever they live)."""
    import shutil

    from conftest import REPO

    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.mark.parametrize("value", ["results", "results/", "./results//"])
def test_a_fresh_clone_plans_every_job_whatever_the_results_dir_spelling(tmp_path, value):
    """With the example reports committed at the rules' output paths, a fresh clone planned nothing (the report
    existed, so its missing records did not matter) and showed the committed report as the run's; and
    `results_dir: "results/"` changed every path. Both must plan every job of the grid."""
    clone = _fresh_clone(tmp_path / "clone")
    config = _architecture_only(clone)
    config["architecture"]["seeds"] = [0, 1]
    config["results_dir"] = value
    write_config(clone, config)
    r = snakemake(clone, "-n", "--cores", "1", "architecture")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    counts = job_counts(r.stdout + r.stderr)
    assert counts.get("train_architecture") == 2 and counts.get("architecture_report") == 1, counts


@pytest.mark.parametrize("key", ["results_dir", "reports_dir", "data_root"])
def test_empty_path_setting_is_refused_naming_the_key(workflow, key):
    config = _architecture_only(workflow)
    config[key] = ""
    write_config(workflow, config)
    r = snakemake(workflow, "-n", "--cores", "1", "architecture")
    assert r.returncode != 0 and key in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]


def test_missing_file_teacher_stops_before_any_job(workflow):
    """A missing `file:` teacher once made Snakemake plan nothing for Q3 (exit 0, old report kept)."""
    config = read_config(workflow)
    config = {k: v for k, v in config.items() if k not in ("pretext", "architecture")}
    config["transfer"].update(teachers={"mine": "file:teachers/missing.pth"}, methods=["scratch", "attn_copy"],
                              seeds=[0])
    write_config(workflow, config)
    r = snakemake(workflow, "-n", "--cores", "1", "transfer")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "transfer.teachers.mine" in out and "teachers/missing.pth" in out, out[-3000:]


def test_reports_dir_inside_the_committed_examples_is_refused(workflow):
    config = _architecture_only(workflow)
    config["reports_dir"] = "examples/default"
    write_config(workflow, config)
    r = snakemake(workflow, "-n", "--cores", "1", "architecture")
    assert r.returncode != 0 and "reports_dir" in r.stdout + r.stderr and "examples" in r.stdout + r.stderr


def test_default_reports_go_under_the_ignored_results_directory():
    from conftest import REPO

    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert config["reports_dir"] == "results/reports"
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/reports/tables/architecture.csv"], cwd=REPO)
    assert ignored.returncode == 0, "generated reports must be git-ignored"
    assert not list((REPO / "reports").glob("tables/*")) and not (REPO / "reports/summary.md").exists()
    assert (REPO / "examples/default/summary.md").exists()


# --- 5. validation holes, each before any job, each naming the key -------------------------------------------

@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_number_is_refused_naming_the_key(tmp_path, value):
    from conftest import REPO

    text = (REPO / "config/config.yaml").read_text().replace("lr: 2.0e-3                # peak AdamW lr",
                                                              f"lr: {value}")
    assert f"lr: {value}" in text
    r = _check(tmp_path, text)
    assert r.returncode != 0 and "architecture.train.lr" in r.stderr and "finite" in r.stderr, r.stderr[-2000:]


def test_seed_above_int32_is_refused(tmp_path):
    from conftest import REPO

    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["architecture"]["seeds"] = [0, 2**31]
    with pytest.raises(ConfigError, match=r"architecture\.seeds"):
        check_config(config)
    r = _check(tmp_path, yaml.safe_dump(config))
    assert r.returncode != 0 and "seeds" in r.stderr and "2147483648" in r.stderr, r.stderr[-2000:]


BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [
    f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]) + "\nresults_dir: *a8\n"


def test_yaml_alias_bomb_is_refused_quickly(tmp_path, workflow):
    """9^9 values once expanded: the schema check (and its message, the whole config) never finished."""
    r = _check(tmp_path, BOMB, timeout=60)
    assert r.returncode != 0 and "aliases" in r.stderr and len(r.stderr) < 5000, r.stderr[-2000:]
    (workflow / "config/config.yaml").write_text(BOMB)
    r = snakemake(workflow, "-n", "--cores", "1", timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "aliases" in out and len(out) < 20000, out[-3000:]


def test_config_that_is_not_a_mapping_is_a_clear_error(tmp_path):
    r = _check(tmp_path, "- results_dir: results\n- execution: {}\n")
    assert r.returncode != 0 and "not a mapping" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_absurd_grid_is_warned_about_with_its_job_count(tmp_path):
    from conftest import REPO

    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config = {k: v for k, v in config.items() if k not in ("pretext", "transfer")}
    config["architecture"]["seeds"] = list(range(20_000))
    r = _check(tmp_path, yaml.safe_dump(config))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "100,000 jobs" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("content", [b"", b'{"top1_test": 9', b"\xff\xfe\x00", b"[1, 2]"])
def test_unreadable_record_is_named_by_path(tmp_path, content):
    good = tmp_path / "a/record.json"
    good.parent.mkdir()
    good.write_text(json.dumps({"dataset": "digits", "mixer": "attention", "seed": 0, "top1_test": 90.0}))
    bad = tmp_path / "b/record.json"
    bad.parent.mkdir()
    bad.write_bytes(content)
    with pytest.raises(ValueError) as e:
        aggregate.load_records([str(good), str(bad)])
    assert str(bad) in str(e.value) and "delete it" in str(e.value)


def test_image_folder_class_without_images_is_named_before_any_job(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            if not (split == "val" and cls == "dog"):
                Image.fromarray((np.random.rand(8, 8, 3) * 255).astype(np.uint8)).save(root / split / cls / "0.png")
    (root / "val/dog/notes.txt").write_text("no images here")
    config = {"data_root": str(root), "datasets": {"imagefolder": {}},
              "architecture": {"datasets": ["imagefolder"], "mixers": ["attention"], "seeds": [0]}}
    with pytest.raises(ConfigError) as e:
        check_data(config)
    assert str(root / "val/dog") in str(e.value) and "no images" in str(e.value)
