"""A tiny real run of the `report` target, then Snakemake's HTML report opened in headless Chromium.

The report is a React app: its results and captions are JSON in <script> tags until JavaScript
renders them, so every check here reads what the browser rendered, never the HTML source.
What Snakemake renders inline is images and HTML; CSV and markdown tables are embedded as
downloadable data URIs. The tables are seen inline through results/reports/summary.html.
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
import pytest

from conftest import copy_workflow, read_config, snakemake, write_config
from headless_chromium import HEADLESS_FLAGS, Chromium, chromium_binary

CHROMIUM = chromium_binary()
IN_CI = os.environ.get("CI") == "true"
pytestmark = pytest.mark.slow
needs_chromium = pytest.mark.skipif(  # under CI the test runs, and fails without Chromium
    CHROMIUM is None and not IN_CI, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run does)")


@pytest.fixture(scope="module")
def report(tmp_path_factory, ray_cluster):
    """2 mixers x 2 seeds x 1 epoch through `snakemake report`, then `snakemake --report`."""
    wf = copy_workflow(tmp_path_factory.mktemp("report") / "wf")
    config = read_config(wf)
    config.pop("pretext")
    config.pop("transfer")
    config["architecture"].update(mixers=["attention", "feedforward"], seeds=[0, 1])
    config["architecture"]["train"].update(epochs=1)
    write_config(wf, config)
    r = snakemake(wf, "--cores", "1", "report", env=ray_cluster)  # one Ray worker (conftest.ray_cluster)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    r = snakemake(wf, "--report", "results/reports/report.html")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return wf


def _mean_std(wf) -> dict[str, str]:
    """'mean ± std' of top-1 per mixer, straight from the run records."""
    records = [json.loads(p.read_text()) for p in wf.glob("results/architecture/digits/*/seed*/record.json")]
    by_mixer = {m: [r["top1_test"] for r in records if r["mixer"] == m] for m in {r["mixer"] for r in records}}
    assert sorted(by_mixer) == ["attention", "feedforward"] and all(len(v) == 2 for v in by_mixer.values())
    return {m: f"{statistics.fmean(v):.2f} ± {statistics.stdev(v):.2f}" for m, v in by_mixer.items()}


def test_report_target_writes_the_summary_of_the_configured_questions(report):
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


@needs_chromium
def test_html_report_renders_in_headless_chromium(report, tmp_path):
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
        browser.wait_for("!!document.querySelector('iframe')")
        frame = browser.frame_context()
        inner = browser.wait_for("document.body && document.body.innerText.includes('Answer') && "
                                 "document.body.innerText", frame)
        assert "Q1 architecture: do you even need attention?" in inner
        for cell in _mean_std(report).values():
            assert cell in inner
        assert browser.eval("document.querySelectorAll('table td').length", frame) >= 2 * 5

        shot = tmp_path / "report.png"
        browser.screenshot(str(shot))

    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (900, 1400)
    assert shot.stat().st_size > 20_000
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50  # text and tables, not a blank page
