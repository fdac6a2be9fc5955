"""summary.md from synthetic run records: answers follow the numbers, tests say what the seeds separate."""

from __future__ import annotations

import json
import math
import re

import polars as pl
import pytest

from vitablate.summary import PAPER, build_summary, holm, markdown_to_html, paper_gap_closed, welch, write_summary


def _records(tmp_path, name, rows):
    paths = []
    for i, r in enumerate(rows):
        p = tmp_path / f"{name}{i}.json"
        p.write_text(json.dumps(r | {"history": [], "config": {}}))
        paths.append(str(p))
    return paths


def _arch(tmp_path, accs: dict[str, list[float]]):
    return _records(tmp_path, "arch", [dict(question="architecture", dataset="digits", mixer=m, model="vit_digits",
                                            seed=s, params_m=0.2, top1_test=a)
                                       for m, values in accs.items() for s, a in enumerate(values)])


# --- Welch's t-test, its interval, Holm's correction, the minimum detectable difference -------

def _welch_by_hand(xa, xb):
    """Welch's difference, 95% CI and two-sided p from the textbook formulas (Welch-Satterthwaite df)."""
    from scipy.stats import t as student_t

    na, nb = len(xa), len(xb)
    ma, mb = sum(xa) / na, sum(xb) / nb
    va = sum((v - ma) ** 2 for v in xa) / (na - 1)
    vb = sum((v - mb) ** 2 for v in xb) / (nb - 1)
    se = math.sqrt(va / na + vb / nb)
    df = se**4 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    half = student_t.ppf(0.975, df) * se
    diff = ma - mb
    return diff, (diff - half, diff + half), 2 * student_t.sf(abs(diff) / se, df)


def _holm_by_hand(ps):
    """Holm's step-down adjusted p-values: sort ascending, multiply the i-th smallest by (m - i), keep the
    running maximum, cap at 1, and put them back in the original order."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def _power_by_hand(diff, xa, xb, alpha=0.05):
    """Power of the two-sided pooled two-sample t-test to see `diff` at these sizes and pooled spread
    (the non-central t distribution)."""
    from scipy.stats import nct
    from scipy.stats import t as student_t

    na, nb = len(xa), len(xb)
    ma, mb = sum(xa) / na, sum(xb) / nb
    ss = sum((v - ma) ** 2 for v in xa) + sum((v - mb) ** 2 for v in xb)
    pooled = math.sqrt(ss / (na + nb - 2))
    df, nc = na + nb - 2, diff / pooled * math.sqrt(na * nb / (na + nb))
    crit = student_t.ppf(1 - alpha / 2, df)
    return nct.sf(crit, df, nc) + nct.cdf(-crit, df, nc)


@pytest.mark.parametrize("xa, xb", [([90.0, 91.0, 92.0], [70.0, 71.5, 72.0]),
                                     ([1.0, 2.0, 4.0, 3.5], [5.0, 6.5, 5.5]),
                                     ([60.0, 64.0, 58.0, 61.0, 59.5], [61.0, 59.0, 63.0, 60.0, 62.5])])
def test_welch_difference_interval_and_p_against_the_formulas(xa, xb):
    diff, (lo, hi), p = _welch_by_hand(xa, xb)
    t = welch("a", xa, "b", xb)
    assert t.diff == pytest.approx(diff)
    assert t.ci == pytest.approx((lo, hi), rel=1e-9)
    assert t.p == pytest.approx(p, rel=1e-9)
    assert t.p_holm == t.p and t.family_size == 1  # a comparison on its own is its own family


def test_minimum_detectable_difference_has_80_percent_power():
    xa, xb = [60.0, 64.0, 58.0, 61.0, 59.5], [61.0, 59.0, 63.0, 60.0, 62.5]
    t = welch("moco", xa, "mae", xb)
    assert not t.separated
    assert _power_by_hand(t.mdd, xa, xb) == pytest.approx(0.80, abs=1e-3)
    assert _power_by_hand(0.9 * t.mdd, xa, xb) < 0.79  # a smaller difference is seen less often
    assert f"a difference below {t.mdd:.1f} points could not be seen at this seed spread" in t.sentence()
    # more seeds at the same spread see smaller differences
    assert welch("moco", xa * 2, "mae", xb * 2).mdd < t.mdd


def test_holm_against_the_step_down_by_hand():
    groups = {"a": [90.0, 91.0, 92.5], "b": [88.0, 89.5, 90.0], "c": [70.0, 71.0, 69.0], "d": [91.0, 89.0, 92.0]}
    raw = [welch(k, groups[k], "a", groups["a"]) for k in ("b", "c", "d")]
    by_hand = _holm_by_hand([_welch_by_hand(groups[k], groups["a"])[2] for k in ("b", "c", "d")])
    corrected = holm(raw)
    assert [t.p_holm for t in corrected] == pytest.approx(by_hand, rel=1e-9)
    assert all(t.family_size == 3 for t in corrected)
    assert [t.p for t in corrected] == [t.p for t in raw]  # the raw p stays
    # an untestable comparison is left out of the family
    mixed = holm([welch("x", [1.0], "y", [2.0, 3.0]), *raw])
    assert mixed[0].p_holm is None and [t.p_holm for t in mixed[1:]] == pytest.approx(by_hand, rel=1e-9)


def test_q1_summary_prints_holm_adjusted_p_and_the_interval(tmp_path):
    groups = {"attention": [90.0, 91.0, 92.5], "feedforward": [88.0, 89.5, 90.0], "pooling": [70.0, 71.0, 69.0],
              "identity": [91.0, 89.0, 92.0]}
    md = build_summary(architecture=_arch(tmp_path, groups))
    others = ["feedforward", "pooling", "identity"]
    stats = {m: _welch_by_hand(groups[m], groups["attention"]) for m in others}
    adjusted = dict(zip(others, _holm_by_hand([stats[m][2] for m in others])))
    fmt = lambda p: f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"  # noqa: E731
    # pooling is far below attention: separated, stated as attention above pooling, interval flipped with it
    diff, (lo, hi), p = stats["pooling"]
    assert (f"`attention` is above `pooling` by {-diff:.1f} points (95% CI {-hi:.1f} to {-lo:.1f}; Welch's t = "
            in md)
    assert f"Holm-adjusted p = {fmt(adjusted['pooling'])} of 3 (raw p = {fmt(p)})" in md
    # feedforward is close: not separated, with its own interval and adjusted p
    diff, (lo, hi), p = stats["feedforward"]
    assert (f"seeds do not separate `feedforward` and `attention` (Δ = {diff:+.1f} points, 95% CI {lo:+.1f} to "
            f"{hi:+.1f}; Holm-adjusted p = {fmt(adjusted['feedforward'])} of 3 (raw p = {fmt(p)})") in md
    assert "*Holm family:* every mixer against `attention` on digits (3 tests)." in md


def test_separated_groups_give_small_p_and_say_which_is_above():
    t = welch("attention", [90.0, 91.0, 92.0], "feedforward", [70.0, 71.5, 72.0])
    assert t.p < 0.05 and t.separated and t.diff == pytest.approx(19.833, abs=1e-3)
    s = t.sentence()
    assert s.startswith("`attention` is above `feedforward` by 19.8 points (95% CI") and "n = 3 vs 3" in s
    # the printed t and interval follow the printed order, whichever side was passed first
    flipped = welch("feedforward", [70.0, 71.5, 72.0], "attention", [90.0, 91.0, 92.0])
    assert flipped.sentence() == s


def test_overlapping_groups_are_reported_as_not_separated():
    t = welch("moco", [60.0, 64.0, 58.0], "mae", [61.0, 59.0, 63.0])
    assert t.p >= 0.05 and not t.separated
    assert t.sentence().startswith("the seeds do not separate `moco` and `mae` (Δ = -0.3 points, 95% CI ")
    assert "neither confirms nor contradicts" in t.verdict(True)


@pytest.mark.parametrize("xa, xb, why", [
    ([90.0], [80.0, 81.0], "needs 2 seeds per side"),
    ([90.0, 90.0], [80.0, 80.0], "no spread across seeds"),
    ([], [80.0, 81.0], "no runs"),
])
def test_untestable_comparisons_say_so_instead_of_failing(xa, xb, why):
    t = welch("a", xa, "b", xb)
    assert t.p is None and not t.separated
    assert "not testable" in t.sentence() and why in t.sentence()


def test_one_side_without_spread_is_still_testable():
    t = welch("a", [90.0, 90.0, 90.0], "b", [70.0, 71.0, 72.0])
    assert t.p is not None and t.separated


# --- Q1 ------------------------------------------------------------------------------------

def test_q1_answer_follows_the_numbers_and_cites_the_paper(tmp_path):
    md = build_summary(architecture=_arch(tmp_path, {"attention": [90.0, 91.0, 92.0],
                                                     "feedforward": [80.0, 81.0, 79.5],
                                                     "identity": [60.0, 61.0, 62.0]}))
    assert "## Q1 architecture" in md and "## Q2" not in md and "## Q3" not in md
    assert "**Answer.** Attention is needed here: `attention` is above `feedforward` by 10.8 points" in md
    assert "the same direction as the paper" in md
    assert "| `attention` | 0.20 | 91.00 ± 1.00 | 3 | base: 79.9; tiny: 72.2 |" in md  # DeiT-B, DeiT-Ti
    assert "base: 74.9; tiny: 61.4; large: 71.4" in md  # feedforward's reference numbers
    assert "Melas-Kyriazi" in md and "Touvron" in md


def test_q1_on_fashion_mnist_sets_the_mixers_beside_the_published_baselines(tmp_path):
    paths = _records(tmp_path, "fm", [dict(question="architecture", dataset="fashion_mnist", mixer=m, model="vit",
                                           seed=s, params_m=0.2, top1_test=a)
                                      for m, values in {"attention": [82.0, 83.0], "feedforward": [84.0, 85.5]}.items()
                                      for s, a in enumerate(values)])
    md = build_summary(architecture=paths)
    line = next(x for x in md.splitlines() if x.startswith("Published fashion_mnist baselines"))
    assert "MLP 256-128-64 90.0" in line and "zalandoresearch/fashion-mnist" in line
    assert line.endswith("This run's mixers: `feedforward` 84.8; `attention` 82.5.")
    assert "Published" not in build_summary(architecture=_arch(tmp_path, {"attention": [90.0, 91.0]}))


def test_q1_disagreeing_with_the_paper_is_said_plainly(tmp_path):
    md = build_summary(architecture=_arch(tmp_path, {"attention": [80.0, 81.0, 79.0],
                                                     "feedforward": [95.0, 96.0, 95.5]}))
    assert "Attention is not needed at this scale: `feedforward` is above `attention`" in md
    assert "the opposite direction to the paper" in md


def test_q1_seeds_that_do_not_separate(tmp_path):
    md = build_summary(architecture=_arch(tmp_path, {"attention": [88.0, 92.0], "feedforward": [90.0, 89.0]}))
    assert "the seeds do not separate `attention` and `feedforward`" in md
    assert "this run does not show that attention is needed" in md
    assert "neither confirms nor contradicts the paper" in md


# --- Q2 ------------------------------------------------------------------------------------

def _pretext(tmp_path, accs):
    return _records(tmp_path, "eval", [dict(question="pretext", dataset="digits", pretext=p, eval=e, seed=s,
                                            top1_test=a)
                                       for (p, e), values in accs.items() for s, a in enumerate(values)])


def _analyses(tmp_path, distance: dict[str, list[float]], nmi: dict[str, list[float]]):
    """One analysis record per (pretext, seed): 4 layers x 2 heads; late layers (2, 3) carry the given value."""
    paths = []
    for pretext in distance:
        for seed, (d, n) in enumerate(zip(distance[pretext], nmi[pretext], strict=True)):
            rows = [(layer, head, metric, (v if layer >= 2 else 4.0) + 0.01 * head)
                    for layer in range(4) for head in range(2) for metric, v in (("attention_distance", d),
                                                                                 ("nmi", n))]
            pq = tmp_path / f"{pretext}{seed}.parquet"
            pl.DataFrame(rows, schema=["layer", "head", "metric", "value"], orient="row").write_parquet(pq)
            paths += _records(tmp_path, f"an_{pretext}{seed}_", [dict(question="pretext", dataset="digits",
                                                                      pretext=pretext, seed=seed,
                                                                      analysis_path=str(pq))])
    return paths


def test_q2_cl_against_mim_per_evaluation_with_paper_numbers(tmp_path):
    evals = _pretext(tmp_path, {
        ("moco", "linear_probe"): [60.0, 61.0, 60.5], ("mae", "linear_probe"): [50.0, 51.0, 50.2],
        ("moco", "finetune"): [90.0, 93.0, 91.0], ("mae", "finetune"): [91.0, 92.0, 90.5],
    })
    analyses = _analyses(tmp_path, distance={"moco": [6.0, 6.1, 6.05], "mae": [3.0, 3.1, 3.05]},
                         nmi={"moco": [0.01, 0.012, 0.011], "mae": [0.02, 0.05, 0.01]})
    md = build_summary(pretext=evals, analyses=analyses)
    assert "## Q2 pretext" in md and "## Q1" not in md
    assert "under `linear_probe` (paper: CL ahead) the seeds put CL above MIM in 1 of 1 comparisons" in md
    assert "- `linear_probe`: the best encoder is `moco` (60.50 ± 0.50 %). CL against MIM: `moco` is above `mae`" in md
    assert "the same direction as the paper" in md
    assert "- `finetune`: the best encoder is `moco`" in md
    assert "CL against MIM: the seeds do not separate `moco` and `mae`" in md
    # paper numbers beside this run's: MoCo v3 76.7 / 83.2, MAE 68 / 83.6
    assert "| `moco` | 60.50 ± 0.50 | 91.33 ± 1.53 | 3 | 76.7 | 83.2 |" in md
    assert "| `mae` | 50.40 ± 0.53 | 91.17 ± 0.76 | 3 | 68.0 | 83.6 |" in md
    # representations: late-layer attention distance from the numbers, NMI not separated
    assert "Late-layer attention distance (blocks 2–3): `moco` is above `mae` by 3.000 px" in md
    assert "CL is more global (larger distance) than MIM there, as the paper reports" in md
    assert "Late-layer NMI (blocks 2–3): the seeds do not separate `moco` and `mae`" in md
    assert "| `moco` | 4.005 ± 0.000 | 4.005 ± 0.000 | 6.055 ± 0.050 | 6.055 ± 0.050 | 3 |" in md


def test_q2_without_a_cl_mim_pair_says_the_question_is_not_asked(tmp_path):
    md = build_summary(pretext=_pretext(tmp_path, {("supervised", "knn"): [80.0, 81.0]}))
    assert "the CL-versus-MIM question is not asked here" in md


# --- Q3 ------------------------------------------------------------------------------------

def test_q3_gap_closed_tests_and_paper_numbers(tmp_path):
    accs = {("none", "scratch"): [70.0, 71.0, 70.5], ("mae", "finetune"): [80.0, 81.0, 80.5],
            ("mae", "attn_copy"): [78.0, 79.0, 78.5], ("mae", "attn_distill"): [70.0, 72.0, 71.5]}
    rows = [dict(question="transfer", dataset="digits", teacher=t, method=m, layers="all", seed=s, top1_test=a,
                 top1_shift_noise=a - (10.0 if m != "finetune" else 2.0) + 0.3 * s)
            for (t, m), values in accs.items() for s, a in enumerate(values)]
    md = build_summary(transfer=_records(tmp_path, "tr", rows))
    assert "## Q3 transfer" in md
    assert "With the `mae` teacher, copying its attention maps is above scratch (Holm-adjusted p = " in md
    assert "gap closed 80% (paper: 78%)" in md
    assert "distilling its attention maps is not separated from scratch" in md
    assert "gap closed 7% (paper: 100%)" in md  # (71.17 - 70.5) / (80.5 - 70.5)
    assert "| `attn_copy` | all | 78.50 ± 0.50 | 3 | 0.80 | 9.7 | 85.1 |" in md
    assert "| `scratch` | all | 70.50 ± 0.50 | 3 | 0.00 | 9.7 | 83.0 |" in md
    assert "top-1 drops by 9.7 points for `attn_copy` and 1.7 for `finetune`" in md
    assert "the paper finds transfer degrades more than fine-tuning; here: the same direction as the paper" in md
    assert "Fine-tuning the teacher against scratch: `finetune` is above `scratch` by 10.0 points" in md


def test_q3_judges_copy_and_distill_on_the_reference_layer_set(tmp_path):
    """The first `layers` value (e.g. the imagenet preset's first:21) is the reference: with no `all` run of
    copy or distill the answer still tests them, and the paper column sits on the reference rows."""
    accs = {("none", "scratch", "all"): [70.0, 71.0, 70.5], ("mae", "finetune", "all"): [80.0, 81.0, 80.5],
            ("mae", "attn_copy", "first:2"): [78.0, 79.0, 78.5], ("mae", "attn_copy", "last:2"): [70.0, 71.0, 70.2],
            ("mae", "attn_distill", "first:2"): [79.0, 80.0, 79.5]}
    rows = [dict(question="transfer", dataset="digits", teacher=t, method=m, layers=lay, seed=s, top1_test=a)
            for (t, m, lay), values in accs.items() for s, a in enumerate(values)]
    md = build_summary(transfer=_records(tmp_path, "tr", rows), reference_layers="first:2")
    assert "copying its attention maps over layers `first:2` (the reference set) is above scratch" in md
    assert "distilling its attention maps over layers `first:2` (the reference set) is above scratch" in md
    assert "| `attn_copy` | first:2 | 78.50 ± 0.50 | 3 | 0.80 | — | 85.1 |" in md
    assert "| `attn_copy` | last:2 | 70.40 ± 0.53 | 3 | -0.01 | — | — |" in md
    assert "*Holm family:* every method against `scratch` with the `mae` teacher on digits (3 tests)." in md
    # keyed on `all`, the same records would say nothing was copied
    assert "copying" not in build_summary(transfer=_records(tmp_path, "tr2", rows)).split("Answer.")[1].split("\n")[0]


# --- the document --------------------------------------------------------------------------

def test_every_printed_paper_number_has_its_source(tmp_path):
    """Each number in a paper column is one of PAPER's and the document lists it with its source."""
    arch = _arch(tmp_path, {"attention": [90.0, 91.0], "feedforward": [80.0, 82.0]})
    evals = _pretext(tmp_path, {("moco", "linear_probe"): [60.0, 61.0], ("mae", "finetune"): [50.0, 51.0],
                                ("simmim", "finetune"): [52.0, 53.0]})
    rows = [dict(question="transfer", dataset="digits", teacher=t, method=m, layers="all", seed=s, top1_test=70.0 + s)
            for t, m in (("none", "scratch"), ("mae", "finetune"), ("mae", "attn_copy")) for s in range(2)]
    md = build_summary(architecture=arch, pretext=evals, transfer=_records(tmp_path, "tr", rows))
    printed = set(re.findall(r"(?:base|tiny|large): (\d+\.\d)", md))  # Q1's paper column
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `moco`") or line.startswith("| `mae`") or line.startswith("| `simmim`"):
            printed |= {c for c in cells[-2:] if c != "—"}
        if line.startswith("| `") and len(cells) == 7:  # Q3's table: the last column is the paper's
            printed |= {cells[-1]} - {"—"}
    known = {f"{r.value:.1f}": r for q in PAPER.values() for by in q.values()
             for r in (by.values() if isinstance(by, dict) else [by])}
    assert printed and printed <= set(known), printed - set(known)
    sources = md[md.index("## Q1"):]
    for value in printed:
        assert re.search(rf"^- [^\n]*{re.escape(value)}[^\n]*: {re.escape(known[value].source)}\.$", sources,
                         re.M), value
    # the paper's gap closed follows from its own numbers: (85.1 - 83.0) / (85.7 - 83.0)
    assert paper_gap_closed("attn_copy") == pytest.approx((85.1 - 83.0) / (85.7 - 83.0))


def test_no_records_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no run records"):
        build_summary()


def test_write_summary_writes_markdown_and_html(tmp_path):
    md_path, html_path = tmp_path / "r" / "summary.md", tmp_path / "r" / "summary.html"
    text = write_summary(str(md_path), str(html_path),
                         architecture=_arch(tmp_path, {"attention": [90.0, 91.0], "feedforward": [80.0, 82.0]}))
    assert md_path.read_text() == text
    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<h2>Q1 architecture: do you even need attention?</h2>" in page
    assert "<th>top-1 % (mean ± std)</th>" in page and "<td>90.50 ± 0.71</td>" in page
    assert "<strong>Answer.</strong>" in page and "<code>attention</code>" in page


def _squash(page: str) -> str:
    return "".join(line.strip() for line in page.splitlines())


def test_markdown_to_html_escapes_and_keeps_structure():
    page = _squash(markdown_to_html("# T\n\na <b> & `x<y`\n\n- one\n- two\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"))
    assert "<p>a &lt;b&gt; &amp; <code>x&lt;y</code></p>" in page
    assert "<ul><li>one</li><li>two</li></ul>" in page
    assert "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td>2</td></tr>" in page


def test_every_table_and_list_of_the_summary_renders(tmp_path):
    """Python-Markdown needs a blank line before a table or a list: each of the summary's pipe tables
    becomes an HTML table with all its rows, each bullet a list item."""
    evals = _pretext(tmp_path, {("moco", "linear_probe"): [60.0, 61.0, 60.5], ("mae", "linear_probe"): [50.0, 51.0, 50.2],
                                ("moco", "finetune"): [90.0, 93.0, 91.0], ("mae", "finetune"): [91.0, 92.0, 90.5]})
    analyses = _analyses(tmp_path, distance={"moco": [6.0, 6.1, 6.05], "mae": [3.0, 3.1, 3.05]},
                         nmi={"moco": [0.01, 0.012, 0.011], "mae": [0.02, 0.05, 0.01]})
    transfer = _records(tmp_path, "tr", [
        dict(question="transfer", dataset="digits", teacher=t, method=m, layers="all", seed=s, top1_test=a)
        for (t, m), values in {("none", "scratch"): [70.0, 71.0], ("mae", "finetune"): [80.0, 81.0],
                               ("mae", "attn_copy"): [78.0, 79.5]}.items() for s, a in enumerate(values)])
    text = build_summary(architecture=_arch(tmp_path, {"attention": [90.0, 91.0], "feedforward": [80.0, 82.0]}),
                         pretext=evals, analyses=analyses, transfer=transfer)
    page = markdown_to_html(text)
    lines = text.splitlines()
    tables = sum(1 for i, line in enumerate(lines) if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")))
    rows = sum(1 for line in lines if line.startswith("|") and not set(line) <= set("|-: "))
    assert tables >= 1 and page.count("<table>") == tables and page.count("<tr>") == rows
    assert page.count("<li>") == sum(1 for line in lines if line.startswith("- "))
    assert "|" not in "".join(re.findall(r"<p>(.*?)</p>", page, flags=re.S))  # no table left as a paragraph


def test_paper_numbers_are_the_design_documents():
    """A transcription check: the reference numbers in docs/design.md's table are exactly PAPER's values."""
    import re
    from pathlib import Path

    from vitablate.summary import Ref

    text = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    table = text[text.index("| number | value | source |"):text.index("Gap closed")]
    documented = sorted(float(v) for row in table.splitlines()[2:] if row.startswith("|")
                        for v in re.findall(r"\d+\.\d", row.split("|")[2]))
    values = []
    for question in PAPER.values():
        for by in question.values():
            values += [by.value] if isinstance(by, Ref) else [r.value for r in by.values()]
    assert documented == sorted(values)
