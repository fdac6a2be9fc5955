"""reports/summary.md: each question's answer, stated from the per-seed run records alone.

For every question: the answer in a sentence or two, the table it rests on (mean ± sample std
over seeds, n), the key comparisons with Welch's t-test across seeds, and the paper's reference
numbers beside this run's. Nothing here is written by hand: rerun the workflow and the words
follow the numbers, including where the seeds do not separate two settings.
"""

from __future__ import annotations

import html
import statistics
from collections.abc import Iterable, Sequence

import polars as pl

from . import aggregate
from .analysis.registry import EVALS, METRICS, computed_metrics
from .io import write_text
from .methods import LAYERED
from .objectives.registry import PRETEXTS, family, pretext_base
from .papers import (  # noqa: F401 (vitablate.summary.PAPER and Ref: the names tests and docs use)
    ATTN_TRANSFER, DATASET_BASELINES, DEIT, MAE, MELAS, MOCO3, PAPER, SIMMIM, Ref, paper_gap_closed, paper_sources,
)
from .stats import (  # noqa: F401 (re-exported)
    ALPHA, POWER, Welch, family_note, format_p, holm, mean_std, min_detectable_difference, welch,
)

# pretext families, from the registry (vitablate.objectives.registry; hybrid_<lambda> -> hybrid), read live
CL = PRETEXTS.view(lambda e: e.family == "CL")
MIM = PRETEXTS.view(lambda e: e.family == "MIM")


def _samples(df: pl.DataFrame, keys: list[str], value: str = "top1_test") -> dict[tuple, list[float]]:
    """{group key: per-seed values} in first-seen order."""
    out = df.group_by(keys, maintain_order=True).agg(pl.col(value).drop_nulls())
    return {tuple(r[k] for k in keys): list(r[value]) for r in out.iter_rows(named=True)}


def _family(pretext: str) -> str:
    """The registered pretext a grid pretext id runs (hybrid_0.2 -> hybrid)."""
    return pretext_base(pretext)


def _names(names: Iterable[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


# --- Q1 architecture ------------------------------------------------------------------------

Q1_PAPER_FINDING = ("attention (DeiT's recipe) ahead of feedforward-only at base size (79.9 vs 74.9) and at tiny "
                    "size (72.2 vs 61.4)")


def architecture_tests(samples: dict[str, list[float]], order: list[str]) -> dict[tuple[str, str], Welch]:
    """Q1's family, Holm-corrected together: every mixer against `attention`, and the best mixer against the
    lower bounds (`pooling`, `identity`) when the best is not attention."""
    pairs = [(m, "attention") for m in order if m != "attention" and "attention" in samples]
    best = order[0]
    if best != "attention":
        pairs += [(best, bound) for bound in ("pooling", "identity") if bound in samples and bound != best]
    tests = holm([welch(a, samples[a], b, samples[b]) for a, b in pairs])
    return dict(zip(pairs, tests))


def architecture_answer(samples: dict[str, list[float]], order: list[str],
                        tests: dict[tuple[str, str], Welch]) -> str:
    """One or two sentences: is attention needed, from the best mixer against attention."""
    best = order[0]
    if "attention" not in samples or len(order) == 1:
        return (f"`{best}` is the best token mixer here ({mean_std(samples[best])} %); there is no `attention` run "
                f"to compare it with.")
    if best == "attention":
        t = tests[(order[1], "attention")].flipped()
        if t.separated:
            return f"Attention is needed here: {t.sentence()}, the best attention-free mixer."
        return f"`attention` is the best mixer, but {t.sentence()}: this run does not show that attention is needed."
    t = tests[(best, "attention")]
    if t.separated:
        return f"Attention is not needed at this scale: {t.sentence()}."
    return f"The best mixer is `{best}`, but {t.sentence()}: this run cannot say whether attention helps or hurts."


def architecture_section(df: pl.DataFrame) -> str:
    out = ["## Q1 architecture: do you even need attention?\n"]
    paper = PAPER["architecture"]
    for dataset in df["dataset"].unique(maintain_order=True).to_list():
        sub = df.filter(pl.col("dataset") == dataset)
        samples = {k[0]: v for k, v in _samples(sub, ["mixer"]).items()}
        params = {k[0]: v[0] for k, v in _samples(sub, ["mixer"], "params_m").items()}
        order = sorted(samples, key=lambda m: -statistics.fmean(samples[m]))
        tests = architecture_tests(samples, order)
        out.append(f"### {dataset}\n\n**Answer.** {architecture_answer(samples, order, tests)}\n")
        details = []
        if ("feedforward", "attention") in tests:
            t = tests[("feedforward", "attention")].flipped()
            p = format_p(t.p_holm) if t.p is not None else "not testable"
            details.append(f"Against the paper, which has {Q1_PAPER_FINDING}: here `attention` minus `feedforward` "
                           f"is {t.diff:+.1f} points (Holm-adjusted p = {p}), {t.verdict(True)}.")
        for (a, b), t in tests.items():
            if b in ("pooling", "identity"):
                details.append(f"The best mixer against the `{b}` lower bound (no learned token mixing): "
                               f"{t.sentence()}.")
        if details:
            out.append(" ".join(details) + "\n")
        rows = []
        for m in order:
            refs = "; ".join(f"{size}: {by[m].value:.1f}" for size, by in paper.items() if m in by)
            rows.append((f"`{m}`", f"{params[m]:.2f}", mean_std(samples[m]), len(samples[m]), refs or "—"))
        out.append(aggregate.md_table(["mixer", "params (M)", "top-1 % (mean ± std)", "n", "paper top-1 % (ImageNet-1K)"],
                             rows))
        if dataset in DATASET_BASELINES:
            refs = DATASET_BASELINES[dataset]
            out.append(f"Published {dataset} baselines, test top-1 %: "
                       + "; ".join(f"{name} {r.value:.1f}" for name, r in refs.items())
                       + f" ({next(iter(refs.values())).source}). This run's mixers: "
                       + "; ".join(f"`{m}` {statistics.fmean(samples[m]):.1f}" for m in order) + ".\n")
        against = [t for (a, b), t in tests.items() if b == "attention"]
        if against:
            out.append("Each mixer against `attention` (the ViT):\n\n"
                       + "\n".join(f"- {_cap(t.sentence())}." for t in against) + "\n")
        if tests:
            what = "every mixer against `attention`" + (
                ", and the best mixer against the lower bounds" if len(against) < len(tests) else "")
            out.append(family_note(f"{what} on {dataset}", list(tests.values())) + "\n")
    return "\n".join(out)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# --- Q2 pretext -----------------------------------------------------------------------------

PRETEXT_DIRECTION = {"linear_probe": True, "finetune": False}  # the paper: CL ahead in probing, MIM in fine-tuning


def _pretext_order(names: Iterable[str]) -> list[str]:
    return sorted(set(names), key=lambda p: (PRETEXTS.rank(_family(p)), p))  # registration order


def _cl_mim(here: dict[str, list[float]]) -> list[Welch]:
    names = _pretext_order(here)
    return [welch(c, here[c], m, here[m]) for c in names if _family(c) in CL for m in names if _family(m) in MIM]


def pretext_answer(by_eval: dict[str, list[Welch]]) -> str:
    """Counts of CL-versus-MIM comparisons the seeds separate, per evaluation, against the paper."""
    parts = []
    for ev, tests in by_eval.items():
        if not tests:
            continue
        cl_up = sum(t.separated and t.diff > 0 for t in tests)
        mim_up = sum(t.separated and t.diff < 0 for t in tests)
        paper = {True: " (paper: CL ahead)", False: " (paper: MIM ahead)"}.get(PRETEXT_DIRECTION.get(ev), "")
        parts.append(f"under `{ev}`{paper} the seeds put CL above MIM in {cl_up} of {len(tests)} comparisons and "
                     f"below in {mim_up}")
    if not parts:
        return (f"No CL ({_names(CL)}) and MIM ({_names(MIM)}) pair was run, so the CL-versus-MIM question is not "
                "asked here.")
    return (f"CL ({_names(CL)}) against MIM ({_names(MIM)}): " + "; ".join(parts)
            + "; the seeds do not separate the rest.")


def pretext_section(evals: pl.DataFrame, analyses: pl.DataFrame | None = None) -> str:
    out = ["## Q2 pretext: what do self-supervised ViTs learn?\n"]
    paper = PAPER["pretext"]
    for dataset in evals["dataset"].unique(maintain_order=True).to_list():
        sub = evals.filter(pl.col("dataset") == dataset)
        samples = _samples(sub, ["pretext", "eval"])
        pretexts = _pretext_order(p for p, _ in samples)
        ev_names = [e for e in EVALS if any(k[1] == e for k in samples)]  # registration order
        # Q2's family: every CL-against-MIM test under every evaluation, Holm-corrected together
        here = {ev: {p: samples[(p, ev)] for p in pretexts if (p, ev) in samples} for ev in ev_names}
        raw = [(ev, t) for ev in ev_names for t in _cl_mim(here[ev])]
        by_eval: dict[str, list[Welch]] = {ev: [] for ev in ev_names}
        for (ev, _), t in zip(raw, holm([t for _, t in raw])):
            by_eval[ev].append(t)
        hybrid_raw = [(ev, welch(h, here[ev][h], c, here[ev][c])) for ev in ev_names for h in pretexts
                      if family(h) == "hybrid" and h in here[ev]
                      for c in PRETEXTS.entry(_family(h)).meta.get("ingredients", ()) if c in here[ev]]
        comparisons = list(zip([ev for ev, _ in hybrid_raw], holm([t for _, t in hybrid_raw])))
        lines = []
        for ev in ev_names:
            best = max(here[ev], key=lambda p: statistics.fmean(here[ev][p]))
            line = f"- `{ev}`: the best encoder is `{best}` ({mean_std(here[ev][best])} %)."
            for t in by_eval[ev]:
                line += f" CL against MIM: {t.sentence()}"
                if ev in PRETEXT_DIRECTION:
                    line += f": {t.verdict(PRETEXT_DIRECTION[ev])}"
                line += "."
            lines.append(line)
        out.append(f"### {dataset}\n\n**Answer.** {pretext_answer(by_eval)}\n")
        out.append("\n".join(lines) + "\n")
        if raw:
            out.append(family_note(f"CL against MIM under every evaluation on {dataset}", [t for _, t in raw]) + "\n")
        header = ["pretext", *(f"{e} top-1 %" for e in ev_names), "n", "paper linear_probe", "paper finetune"]
        rows = []
        for p in pretexts:
            cells = [mean_std(samples[(p, e)]) if (p, e) in samples else "—" for e in ev_names]
            n = max((len(samples[(p, e)]) for e in ev_names if (p, e) in samples), default=0)
            refs = [f"{paper[p][e].value:.1f}" if e in paper.get(p, {}) else "—"
                    for e in ("linear_probe", "finetune")]
            rows.append([f"`{p}`", *cells, n, *refs])
        out.append(aggregate.md_table(header, rows))
        if comparisons:
            out.append("The hybrid objective against its two ingredients:\n\n"
                       + "\n".join(f"- `{ev}`: {t.sentence()}." for ev, t in comparisons) + "\n\n"
                       + family_note(f"the hybrid against `moco` and `simmim` under every evaluation on {dataset}",
                                     [t for _, t in comparisons]) + "\n")
        if analyses is not None and analyses.height:
            out.append(representation_section(analyses.filter(pl.col("dataset") == dataset)))
    return "\n".join(out)


REPRESENTATION_CLAIMS = {  # metric -> (name, unit, what the paper reports of CL against MIM in late layers, CL above)
    "attention_distance": ("attention distance", "px", "more global (larger distance)", True),
    "nmi": ("NMI", "", "lower (closer to attention collapse)", False),
}


def representation_section(analyses: pl.DataFrame) -> str:
    """Attention distance and NMI per layer; CL against MIM in the late layers (the second half)."""
    per_seed = analyses.group_by(["pretext", "seed", "layer", "metric"]).agg(pl.col("value").mean())  # heads averaged
    # the attention metrics sit at layers 1..depth (layer i: block i); layer 0, the embedding output, has none
    attention_rows = per_seed.filter(pl.col("metric").is_in(list(computed_metrics("attention"))))
    layers = sorted(attention_rows["layer"].unique().to_list())
    late = layers[len(layers) // 2:]
    pretexts = _pretext_order(per_seed["pretext"].unique().to_list())
    late_means = per_seed.filter(pl.col("layer").is_in(late)).group_by(["pretext", "seed", "metric"]).agg(
        pl.col("value").mean())
    late_samples = _samples(late_means.sort("seed"), ["pretext", "metric"], "value")
    sentences, family = [], []
    raw = [(metric, t) for metric in REPRESENTATION_CLAIMS
           for t in _cl_mim({p: late_samples[(p, metric)] for p in pretexts if (p, metric) in late_samples})]
    for (metric, _), t in zip(raw, holm([t for _, t in raw])):
        name, unit, claim, cl_above = REPRESENTATION_CLAIMS[metric]
        family.append(t)
        if t.separated and (t.diff > 0) == cl_above:
            verdict = f"CL is {claim} than MIM there, as the paper reports"
        elif t.separated:
            verdict = f"the opposite of the paper, where CL is {claim}"
        else:
            verdict = f"the paper reports CL {claim}; these seeds do not show it"
        sentences.append(f"Late-layer {name} (blocks {late[0]}–{late[-1]}): {t.sentence(unit, 3)}; {verdict}.")
    out = []
    if sentences:
        out.append("**Representations.** " + " ".join(sentences) + " "
                   + family_note("late-layer attention distance and NMI, CL against MIM", family) + "\n")
    for metric, label in ((m, METRICS.entry(m).label or m) for m in computed_metrics("attention")):
        samples = _samples(per_seed.filter(pl.col("metric") == metric).sort("seed"), ["pretext", "layer"], "value")
        rows = [[f"`{p}`"] + [mean_std(samples[(p, layer)], 3) if (p, layer) in samples else "—" for layer in layers]
                + [max(len(samples.get((p, layer), [])) for layer in layers)] for p in pretexts]
        out.append(f"Per-layer {label}, heads averaged, mean ± std over seeds:\n\n"
                   + aggregate.md_table(["pretext"] + [f"block {layer}" for layer in layers] + ["n"], rows))
    return "\n".join(out)


# --- Q3 transfer ----------------------------------------------------------------------------

# LAYERED: the methods that take a `layers` set (vitablate.methods.TRANSFER_METHODS, layered), read live


def transfer_answer(teacher: str, tests: dict[str, Welch], gap: dict, reference_layers: str = "all") -> str:
    """Is the teacher's attention enough: copy and distill (over the reference layers) against scratch."""
    parts = []
    where = "" if reference_layers == "all" else f" over layers `{reference_layers}` (the reference set)"
    for m, name in (("attn_copy", "copying"), ("attn_distill", "distilling")):
        if m not in tests:
            continue
        t, g = tests[m], gap.get((m, reference_layers))
        if t.p is None:
            part = f"{name} its attention maps{where} is not testable against scratch ({t.why_not})"
        elif t.separated:
            part = (f"{name} its attention maps{where} is {'above' if t.diff > 0 else 'below'} scratch "
                    f"(Holm-adjusted p = {format_p(t.p_holm)})")
        else:
            part = (f"{name} its attention maps{where} is not separated from scratch (Holm-adjusted p = "
                    f"{format_p(t.p_holm)}; a difference below {t.mdd:.1f} points could not be seen)")
        gtxt = f"; gap closed {g:.0%}" if g is not None else ""
        parts.append(f"{part}{gtxt} (paper: {paper_gap_closed(m):.0%})")
    if not parts:
        return f"No attention copy or distillation from `{teacher}` was run."
    ft = tests.get("finetune")
    tail = ""
    if ft is not None and not ft.separated:
        tail = (" Fine-tuning the teacher is itself not separated from scratch, so the gap-closed fractions are "
                "unstable.")
    return f"With the `{teacher}` teacher, " + "; ".join(parts) + "." + tail


def transfer_section(df: pl.DataFrame, reference_layers: str = "all") -> str:
    """Q3 per dataset and teacher; copy and distill are judged over `reference_layers` (the config's first
    `transfer.layers` value, the set the paper's numbers and the ensemble use)."""
    out = ["## Q3 transfer: are attention patterns enough?\n"]
    paper = PAPER["transfer"]
    shift_cols = sorted(c for c in df.columns if c.startswith("top1_shift_"))
    table = aggregate.transfer_table(df)
    if shift_cols:  # per-seed top-1 lost under distribution shift: clean test minus the mean shifted test
        df = df.with_columns((pl.col("top1_test") - pl.mean_horizontal(shift_cols)).alias("shift_drop"))
    ref_of = lambda m: reference_layers if m in LAYERED else "all"  # noqa: E731
    for dataset in df["dataset"].unique(maintain_order=True).to_list():
        sub = df.filter(pl.col("dataset") == dataset)
        per_teacher = aggregate.scratch_per_teacher(sub)
        out.append(f"### {dataset}\n")
        if reference_layers != "all":
            layered = " and ".join(f"`{m}`" for m in LAYERED)
            out.append(f"{layered} are judged over layers `{reference_layers}`, the reference "
                       "set (the first `transfer.layers` value); other layer sets are in the table.\n")
        for teacher in [t for t in sub["teacher"].unique(maintain_order=True).to_list() if t != "none"]:
            rows_df = per_teacher.filter(pl.col("teacher") == teacher)
            samples = _samples(rows_df, ["method", "layers"])
            drops = _samples(rows_df, ["method", "layers"], "shift_drop") if shift_cols else {}
            tab = table.filter((pl.col("dataset") == dataset) & (pl.col("teacher") == teacher))
            gap = {(r["method"], r["layers"]): r["gap_closed"] for r in tab.iter_rows(named=True)}
            s = samples.get(("scratch", "all"))
            methods = sorted({m for m, lay in samples if lay == ref_of(m) and m != "scratch"},
                             key=aggregate.method_rank)
            # Q3's family per teacher: every method (at its reference layers) against scratch
            tests = dict(zip(methods, holm([welch(m, samples[(m, ref_of(m))], "scratch", s) for m in methods]))) \
                if s else {}
            out.append(f"**Teacher `{teacher}`. Answer.** {transfer_answer(teacher, tests, gap, reference_layers)}\n")
            details, further = [], []
            if ("ensemble", "all") in samples and ("finetune", "all") in samples:
                further.append(("ensemble", welch("ensemble", samples[("ensemble", "all")], "finetune",
                                                  samples[("finetune", "all")])))
            for m in LAYERED:
                key = (m, reference_layers)
                if drops and key in drops and ("finetune", "all") in drops:
                    further.append((m, welch(m, drops[key], "finetune", drops[("finetune", "all")])))
            further = list(zip([k for k, _ in further], holm([t for _, t in further])))
            if "finetune" in tests:
                details.append(f"Fine-tuning the teacher against scratch: {tests['finetune'].sentence()}.")
            for k, t in further:
                if k == "ensemble":
                    details.append(f"Ensemble against fine-tuning (paper: {paper['ensemble'].value} vs "
                                   f"{paper['finetune'].value}): {t.sentence()}.")
                else:
                    details.append(
                        f"Under distribution shift (mean of {len(shift_cols)} shifted test sets), top-1 drops by "
                        f"{statistics.fmean(t.xa):.1f} points for `{k}` and {statistics.fmean(t.xb):.1f} for "
                        f"`finetune`; comparing the drops, {t.sentence()}; the paper finds transfer degrades more "
                        f"than fine-tuning; here: {t.verdict(True)}.")
            if details:
                out.append(" ".join(details) + "\n")
            rows = []
            for r in tab.iter_rows(named=True):
                key = (r["method"], r["layers"])
                vals = samples.get(key, [])
                drop = f"{statistics.fmean(drops[key]):.1f}" if drops.get(key) else "—"
                g = "—" if r["gap_closed"] is None else f"{r['gap_closed']:.2f}"
                ref = f"{paper[r['method']].value:.1f}" if r["layers"] == ref_of(r["method"]) and r["method"] in paper \
                    else "—"
                rows.append((f"`{r['method']}`", r["layers"], mean_std(vals) if vals else "—", len(vals), g, drop, ref))
            out.append(aggregate.md_table(["method", "layers", "top-1 % (mean ± std)", "n", "gap closed",
                                  "top-1 drop under shift", "paper top-1 % (MAE ViT-L teacher)"], rows))
            if tests:
                out.append("Each method against `scratch`:\n\n"
                           + "\n".join(f"- {_cap(t.sentence())}." for t in tests.values()) + "\n\n"
                           + family_note(f"every method against `scratch` with the `{teacher}` teacher on {dataset}",
                                         list(tests.values())) + "\n")
            if family_note("", [t for _, t in further]):
                out.append(family_note(f"the ensemble against fine-tuning and the shift drops against fine-tuning "
                                       f"with the `{teacher}` teacher", [t for _, t in further]) + "\n")
    return "\n".join(out)


# --- the document ---------------------------------------------------------------------------

def build_summary(architecture: Sequence[str] = (), pretext: Sequence[str] = (), analyses: Sequence[str] = (),
                  transfer: Sequence[str] = (), reference_layers: str = "all",
                  transfer_shift: Sequence[str] = ()) -> str:
    """The whole summary.md from record paths; a question with no records is left out. `reference_layers`:
    the transfer layer set copy and distillation are judged on (the config's first `transfer.layers`);
    `transfer_shift`: the students' shift records (their top1_shift_* join the students' rows)."""
    n = len(architecture) + len(pretext) + len(analyses) + len(transfer)
    parts = [
        "# vitablate summary\n",
        f"Written by the `report` target from {n} run records alone. Numbers are test top-1 (%) as "
        "mean ± sample std over seeds (n = seeds). Each comparison is a two-sided Welch's t-test across seeds "
        "(scipy.stats.ttest_ind, equal_var=False) with the 95% confidence interval of the difference; its p-value "
        f"is Holm-corrected (statsmodels) within the question's family of comparisons, named under each list, and "
        f"a difference counts as separated at Holm-adjusted p < {ALPHA}. Where the seeds do not separate two "
        "settings, the sentence gives the smallest difference this many seeds could have seen at their spread "
        f"({POWER:.0%} power, two-sided α = {ALPHA} per comparison, pooled standard deviation; statsmodels' "
        "TTestIndPower). Paper numbers are ImageNet-1K at paper scale, each with its source below; this run is "
        "small models on small data: compare directions, not values.\n",
    ]

    def sources(question: str) -> str:
        return "Paper numbers (ImageNet-1K top-1 %) and their sources:\n\n" + "\n".join(
            f"- {line}." for line in paper_sources(question)) + "\n"

    if architecture:
        parts.append(architecture_section(aggregate.load_records(architecture)))
        parts.append(sources("architecture"))
    if pretext:
        evals = aggregate.load_records(pretext)
        rep = aggregate.load_analyses(analyses) if analyses else None
        parts.append(pretext_section(evals, rep))
        parts.append(sources("pretext"))
    if transfer:
        parts.append(transfer_section(aggregate.load_records(transfer, shift=transfer_shift or ()),
                                      reference_layers))
        parts.append(sources("transfer"))
    if len(parts) == 2:
        raise ValueError("no run records for the summary: the config has no architecture, pretext or transfer section")
    return "\n".join(parts)


HTML_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em}
th{background:#f0f0f0}code{background:#f4f4f4;padding:0 .2em}h2{border-bottom:1px solid #ddd;margin-top:1.6em}"""


def markdown_to_html(md: str, title: str = "vitablate summary") -> str:
    """summary.md as a standalone HTML page (Snakemake's report shows HTML inline, not markdown).

    Python-Markdown with its `tables` extension; raw HTML in the text is escaped, not passed
    through (the summary quotes config values, which may hold `<` or `&`).
    """
    import markdown

    converter = markdown.Markdown(extensions=["tables"], output_format="html")
    converter.preprocessors.deregister("html_block")  # raw HTML is text here
    converter.inlinePatterns.deregister("html")
    body = converter.convert(md)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{HTML_STYLE}</style></head><body>\n" + body + "\n</body></html>\n")


def write_summary(md_path: str, html_path: str | None = None, **records: Sequence[str]) -> str:
    """Write summary.md (and its HTML rendering for `snakemake --report`); returns the markdown."""
    text = build_summary(**records)
    write_text(md_path, text)
    if html_path:
        write_text(html_path, markdown_to_html(text))
    return text
