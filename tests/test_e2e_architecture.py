"""A tiny real run of the `report` target for Q1 on a private cluster: Snakemake -> Ray -> jobs -> MLflow -> Polars
-> the summary, then Snakemake's HTML report opened in headless Chromium. One run serves every check of it.

The report is a React app: its results and captions are JSON in <script> tags until JavaScript renders them, so
every check of it reads what the browser rendered, never the HTML source. What Snakemake renders inline is images
and HTML; CSV and markdown tables are embedded as downloadable data URIs. The tables are seen inline through
results/reports/summary.html.
"""

from __future__ import annotations

import base64
import json
import os
import re
import statistics
import subprocess
import urllib.parse

import numpy as np
import polars as pl
import psutil
import pytest
from mlflow import MlflowClient

from conftest import copy_workflow, e2e_config, snakemake, write_config
from headless_chromium import HEADLESS_FLAGS, Chromium, chromium_binary

CHROMIUM = chromium_binary()
IN_CI = os.environ.get("CI") == "true"
pytestmark = pytest.mark.slow

def _tiny(workflow, mixers=None, seeds=None):
    """.test/config/architecture.yaml (attention and feedforward, seeds 0 and 1, 1 epoch), with these mixers and
    seeds."""
    config = e2e_config("architecture")
    if mixers is not None:
        config["architecture"]["mixers"] = list(mixers)
    if seeds is not None:
        config["architecture"]["seeds"] = list(seeds)
    write_config(workflow, config)
    return config


def _private_ray_processes(output: str) -> list[str]:
    """Processes of the private Ray cluster the run in `output` started (the Snakefile prints its temp dir)."""
    started = re.findall(r"\[vitablate\] Ray cluster \S+ \(private, (/tmp/vtr\w+)\)", output)
    assert started, "the run did not say which private Ray cluster it started"
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(d in cmd for d in started):
            out.append(cmd[:120])
    return out


def test_tiny_run_fills_tables_mlflow_the_summary_and_the_html_report(tmp_path):
    """`snakemake --cores 2 report` on the tiny config with system metrics on, on the run's own private cluster,
    then `snakemake --report`; one run, read by each check below (one test, so that pytest-xdist never splits the
    checks over two workers that would each pay for the run)."""
    wf = copy_workflow(tmp_path / "wf")
    config = _tiny(wf)
    config["tracking"] = {"system_metrics": True, "system_metrics_interval_s": 0.2}  # a job lasts seconds
    write_config(wf, config)
    r = snakemake(wf, "--cores", "2", "report")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    out = r.stdout + r.stderr
    r = snakemake(wf, "--report", "results/reports/report.html")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    _check_tables_and_mlflow(wf, config, out)
    _check_summary(wf)
    if CHROMIUM is None and not IN_CI:  # under CI the check runs, and fails without Chromium
        pytest.skip("the tables, MLflow and the summary were checked; the HTML report needs chromium on PATH "
                    "(Debian: apt-get install chromium; .ci/run does)")
    _check_html_report(wf, tmp_path)


def _check_tables_and_mlflow(workflow, config, out) -> None:

    table = pl.read_csv(workflow / "results/reports/tables/architecture.csv")
    assert table.columns == ["dataset", "mixer", "model", "params_m", "n_seeds", "top1_mean", "top1_std"]
    mixers = config["architecture"]["mixers"]
    assert sorted(table["mixer"].to_list()) == sorted(mixers)
    assert table["n_seeds"].to_list() == [len(config["architecture"]["seeds"])] * len(mixers)
    assert all(0 <= v <= 100 for v in table["top1_mean"].to_list())
    assert (workflow / "results/reports/tables/architecture.md").exists()
    for fig in ("architecture.png", "architecture_curves.png"):
        assert (workflow / "results/reports/figures" / fig).read_bytes()[:4] == b"\x89PNG"

    # every job ran as a Ray task, and left its record, config, checkpoint and weights
    seeds = config["architecture"]["seeds"]
    for mixer, seed in [(m, s) for m in mixers for s in seeds]:
        d = workflow / "results/architecture/digits" / mixer / f"seed{seed}"
        record = json.loads((d / "record.json").read_text())
        assert record["ray_node_id"] and record["mixer"] == mixer and record["epochs"] == 1
        assert {"config.json", "checkpoint.pt", "model.pt"} <= {p.name for p in d.iterdir()}
        # the centre query's attention maps, where the model has attention to show
        assert ("attention_maps_path" in record) == (mixer == "attention")
        # the rule's log: the worker's start line (where it runs) and its progress, then the result;
        # the console: where each job ran
        log = (workflow / "results/logs/architecture/digits" / f"{mixer}/seed{seed}.log").read_text()
        assert re.search(rf"train_classifier \S+/{mixer}/seed{seed} on node [0-9.]+ \(\w{{8}}\) gpus \[\]", log), log
        assert re.search(r"epoch 1/1 loss \S+ top1_val \S+ lr \S+ \d+ img/s eta 0:00:00", log), log
        assert f"[vitablate] done results/architecture/digits/{mixer}/seed{seed} on node" in out

    client = MlflowClient(tracking_uri=f"sqlite:///{workflow}/results/mlflow.db")
    exp = client.get_experiment_by_name("architecture")
    runs = client.search_runs([exp.experiment_id])
    assert sorted((r.data.tags["mixer"], int(r.data.tags["seed"])) for r in runs) == sorted(
        (m, s) for m in mixers for s in seeds)
    for run in runs:
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert (tags["question"], tags["dataset"], tags["job"]) == ("architecture", "digits", "train_classifier")
        assert run.data.params["train.epochs"] == "1" and run.data.params["data.name"] == "digits"
        assert {"top1_test", "top1_val", "train_loss", "params_m", "images_per_s", "eta_s"} <= set(run.data.metrics)
        assert "system/cpu_utilization_percentage" in run.data.metrics  # tracking.system_metrics reached the job
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 1  # one per epoch
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"record.json", "config.json"} <= artifacts
    assert not _private_ray_processes(out), "the private Ray cluster outlived the run"


def _mean_std(wf) -> dict[str, str]:
    """'mean ± std' of top-1 per mixer, straight from the run records."""
    records = [json.loads(p.read_text()) for p in wf.glob("results/architecture/digits/*/seed*/record.json")]
    by_mixer = {m: [r["top1_test"] for r in records if r["mixer"] == m] for m in {r["mixer"] for r in records}}
    assert sorted(by_mixer) == ["attention", "feedforward"] and all(len(v) == 2 for v in by_mixer.values())
    return {m: f"{statistics.fmean(v):.2f} ± {statistics.stdev(v):.2f}" for m, v in by_mixer.items()}


def _check_summary(report) -> None:
    """The report target writes the summary of the configured questions."""
    md = (report / "results/reports/summary.md").read_text()
    assert "## Q1 architecture" in md and "## Q2" not in md and "## Q3" not in md
    assert "**Answer.**" in md and "Welch's t" in md and "n = 2 vs 2" in md
    for mixer, cell in _mean_std(report).items():  # the records' numbers, as the summary's table prints them
        assert re.search(rf"\| `{mixer}` \| [0-9.]+ \| {re.escape(cell)} \| 2 \|", md), (mixer, cell)
    assert "79.9" in md and "74.9" in md  # the paper's reference numbers (DeiT-B, FF-base) beside this run's
    assert (report / "results/reports/summary.html").read_text().startswith("<!DOCTYPE html>")


def _visible_dom(html: str) -> str:
    """Text of the DOM outside <script>/<style> (where the report keeps its data as JSON)."""
    html = re.sub(r"<(script|style)\b[^>]*>.*?</\1>", "", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def _check_html_report(report, tmp_path) -> None:
    """Snakemake's HTML report, rendered in headless Chromium."""
    assert CHROMIUM is not None, "CI=true but no chromium on PATH: .ci/run installs Debian's chromium"
    page = report / "results/reports/report.html"
    url = page.resolve().as_uri()

    # 1. the plain command-line way: the DOM after JavaScript ran shows the report's menu
    dom = subprocess.run([CHROMIUM, *HEADLESS_FLAGS, "--virtual-time-budget=10000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    visible = _visible_dom(dom)
    for name in ("Snakemake Report", "Q1 architecture", "Summary"):
        assert name in visible, f"{name!r} not rendered; visible DOM starts: {visible[:500]}"
    assert "Q2 pretext" not in visible  # not in this config, so not in the report

    with Chromium(CHROMIUM) as browser:
        browser.open(url)
        browser.wait_for("typeof app !== 'undefined' && document.body.innerText.includes('Q1 architecture')")

        # 2. the Q1 category lists its table and figure, the table embedded as data
        browser.click_link("Q1 architecture")
        text = browser.wait_for("document.body.innerText.includes('architecture.csv') && document.body.innerText")
        for name in ("results/reports/tables/architecture.csv", "results/reports/tables/architecture.md",
                     "results/reports/figures/architecture.png"):
            assert name in text
        href = browser.eval("""Array.from(document.querySelectorAll('td')).find(
            t => t.innerText.trim() === 'results/reports/tables/architecture.csv').parentElement.querySelector('a').href""")
        assert href.startswith("data:text/csv")
        embedded = base64.b64decode(urllib.parse.unquote(href.split("base64,", 1)[1]))
        assert embedded == (report / "results/reports/tables/architecture.csv").read_bytes()

        # its figure opens inline
        browser.eval("""Array.from(document.querySelectorAll('td')).find(
            t => t.innerText.trim() === 'results/reports/figures/architecture.png').parentElement.querySelector('a').click()""")
        assert browser.wait_for("(document.querySelector('img[src^=\"data:image/png\"]') || {}).naturalWidth > 100")

        # 3. the summary, with the tables, renders inline (an iframe of results/reports/summary.html)
        browser.click_link("Results")
        browser.click_link("Summary")
        browser.wait_for("document.body.innerText.includes('results/reports/summary.html')")
        browser.eval("""Array.from(document.querySelectorAll('td')).find(
            t => t.innerText.trim() === 'results/reports/summary.html').parentElement.querySelector('a').click()""")
        inner = browser.wait_in_frame("document.body && document.body.innerText.includes('Answer') && "
                                      "document.body.innerText")
        assert "Q1 architecture: do you even need attention?" in inner
        for cell in _mean_std(report).values():
            assert cell in inner
        assert browser.wait_in_frame("document.querySelectorAll('table td').length") >= 2 * 5

        shot = tmp_path / "report.png"
        browser.screenshot(str(shot))

    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (900, 1400)
    assert shot.stat().st_size > 20_000
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50  # text and tables, not a blank page


def test_failed_job_ends_its_mlflow_run_failed_and_loses_nothing(workflow):
    config = _tiny(workflow, ["attention"], seeds=[0])
    config["datasets"]["digits"]["execution"] = {"dry_jobs": True}  # the finished job needs no training here
    write_config(workflow, config)
    r = snakemake(workflow, "--cores", "2", "architecture")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    done = workflow / "results/architecture/digits/attention/seed0/record.json"
    before = done.read_text()

    # add a second dataset whose job fails at start (batch larger than its training set)
    config["architecture"]["datasets"] = ["digits", "shapes"]
    config["datasets"]["shapes"]["train"]["batch_size"] = 5000
    write_config(workflow, config)
    r = snakemake(workflow, "--cores", "2", "architecture")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert done.read_text() == before, "a finished job was re-run or its record touched"
    assert not (workflow / "results/architecture/shapes/attention/seed0/record.json").exists()
    log = (workflow / "results/logs/architecture/shapes/attention/seed0.log").read_text()
    assert "batch_size 5000" in log + out

    client = MlflowClient(tracking_uri=f"sqlite:///{workflow}/results/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("architecture").experiment_id])
    status = {r.data.tags["dataset"]: r for r in runs}
    assert status["digits"].info.status == "FINISHED"
    assert status["shapes"].info.status == "FAILED"
    assert "batch_size 5000" in status["shapes"].data.tags["error"]
    assert "lower it" in status["shapes"].data.tags["error"]
    assert not _private_ray_processes(out)
