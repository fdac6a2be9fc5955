"""The MLflow UI opens on vitablate's runs, as a new user would see it.

MLflow 3.17's UI opens every experiment in its GenAI view (trace overview, "No data") unless the page
is in the "Model training" workflow: that is the `workflowType=machine_learning` URL parameter (or the
sidebar toggle, remembered by the browser). vitablate tags its experiments as model development
(`mlflow.experimentKind`, which MLflow versions without the workflow switch use to pick the view), logs
each run's dataset as an input (the runs table's Dataset column), and the README's link opens the UI
in the training workflow. A real job logs a run, `mlflow ui` serves the store on loopback, and headless
Chromium reads what the page rendered from the README's link.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow import MlflowClient

from conftest import REPO

from headless_chromium import Chromium, chromium_binary
from vitablate import execution
from vitablate.cluster import free_ports
from vitablate.config import JobConfig, TrainConfig, to_dict

CHROMIUM = chromium_binary()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true",
                       reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run does)"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One real 1-epoch job, logged to a SQLite store as the workflow logs it (read, never changed, by the tests)."""
    tmp_path = tmp_path_factory.mktemp("finished_run")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = JobConfig(question="architecture", job="train_classifier", output_dir=str(tmp_path / "job"),
                    model=dataclasses.replace(JobConfig().model, variant="vit_digits"),
                    train=TrainConfig(epochs=1, batch_size=256),
                    tags={"question": "architecture", "dataset": "digits", "mixer": "attention"})
    record = execution._execute(to_dict(cfg), uri, "digits-attention-s0")
    return uri, record


def test_experiment_is_tagged_and_the_run_names_its_dataset(finished_run):
    uri, record = finished_run
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("architecture")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    inputs = c.get_run(record["mlflow_run_id"]).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.source) for i in inputs] == [("digits", "vitablate:digits")]
    assert len(inputs[0].dataset.digest) == 16


def test_ui_opens_the_experiment_on_its_runs(finished_run, tmp_path):
    uri, record = finished_run
    c = MlflowClient(tracking_uri=uri)
    exp_id = c.get_experiment_by_name("architecture").experiment_id
    run_name = c.get_run(record["mlflow_run_id"]).info.run_name
    [port] = free_ports(1)
    # without MLflow 3's GenAI job runner (huey consumers, ~5 CPU-seconds each to start), which plays no part in
    # what the page shows
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                          env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                assert ui.poll() is None, "mlflow ui exited"
                assert time.monotonic() < deadline, "mlflow ui did not answer within 300 s"
                time.sleep(1)
        link = re.search(r"http://127\.0\.0\.1:5000/(#/experiments/<id>\?workflowType=machine_learning)",
                         (REPO / "README.md").read_text())
        assert link, "the README's MLflow section gives the link that opens the runs table"
        with Chromium(CHROMIUM, timeout=90) as browser:
            browser.open(f"http://127.0.0.1:{port}/" + link.group(1).replace("<id>", exp_id))
            # The user lands on the runs table: the run's name and its dataset are on the page.
            browser.wait_for(f"!!document.body && document.body.innerText.includes({run_name!r})")
            text = browser.eval("document.body.innerText")
            digest = c.get_run(record["mlflow_run_id"]).inputs.dataset_inputs[0].dataset.digest
            assert f"digits ({digest})" in text  # the Dataset column
            assert "No data" not in text and "Overview" not in text  # not the GenAI trace overview
            browser.screenshot(str(tmp_path / "mlflow_ui.png"))
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)
