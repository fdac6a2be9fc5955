"""reports/summary.md: each question's answer, stated from the per-seed run records alone.

For every question: the answer in a sentence or two, the table it rests on (mean ± sample std
over seeds, n), the key comparisons with Welch's t-test across seeds, and the paper's reference
numbers beside this run's. Nothing here is written by hand: rerun the workflow and the words
follow the numbers, including where the seeds do not separate two settings.
"""

from __future__ import annotations

import html
import math
import re
import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import polars as pl

from . import aggregate
from .io import write_text

ALPHA = 0.05  # two-sided, per comparison, uncorrected for the number of comparisons

# Reference numbers: top-1 (%) on ImageNet-1K at paper scale, as DESIGN.md's table cites them.
# Q1: Melas-Kyriazi (2021), "Do You Even Need Attention? A Stack of Feed-Forward Layers Does
#     Surprisingly Well on ImageNet". Q2: Park et al. (ICLR 2023), "What Do Self-Supervised Vision
#     Transformers Learn?" (ViT-B/16). Q3: Li et al. (NeurIPS 2024), "On the Surprising
#     Effectiveness of Attention Transfer for Vision Transformers" (ViT-L, MAE teacher).
PAPER = {
    "architecture": {  # model scale -> mixer -> top-1
        "ViT-B/16": {"attention": 77.9, "feedforward": 74.9},
        "tiny": {"attention": 72.2, "feedforward": 61.4},  # attention: DeiT-tiny
        "L/32": {"attention": 71.2, "feedforward": 71.4},
        "tiny, 4.0M params, 100 epochs": {"attention_only": 28.2},
    },
    "pretext": {  # pretext -> eval -> top-1 (ViT-B/16)
        "moco": {"linear_probe": 76.7, "finetune": 83.2},
        "simmim": {"linear_probe": 56.7, "finetune": 83.8},
        "mae": {"linear_probe": 68.0, "finetune": 83.6},
        "hybrid_0.2": {"finetune": 82.3},  # the best fine-tuning lambda of the hybrid objective
    },
    "transfer": {  # method -> top-1 (ViT-L student, MAE ViT-L teacher)
        "scratch": 83.0, "finetune": 85.7, "attn_copy": 85.1, "attn_distill": 85.7, "ensemble": 86.3,
    },
}


def paper_gap_closed(method: str) -> float:
    """The paper's gap closed, from its top-1 numbers: (method - scratch) / (finetune - scratch)."""
    t = PAPER["transfer"]
    return (t[method] - t["scratch"]) / (t["finetune"] - t["scratch"])


PAPER_SOURCES = {
    "architecture": "Melas-Kyriazi (2021), *Do You Even Need Attention?*, ImageNet-1K",
    "pretext": "Park et al. (ICLR 2023), *What Do Self-Supervised Vision Transformers Learn?*, ViT-B/16 on "
               "ImageNet-1K",
    "transfer": "Li et al. (NeurIPS 2024), *On the Surprising Effectiveness of Attention Transfer for Vision "
                "Transformers*, ViT-L with an MAE teacher on ImageNet-1K",
}
CL, MIM = ("moco",), ("simmim", "mae")  # pretext families (hybrid_<lambda> -> hybrid)
EVALS = ("linear_probe", "finetune", "knn")


# --- statistics -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Welch:
    """Welch's two-sided t-test of `a` against `b` across seeds; p is None when not testable."""

    a: str
    b: str
    xa: tuple[float, ...]
    xb: tuple[float, ...]
    t: float | None
    p: float | None
    why_not: str = ""

    @property
    def diff(self) -> float:
        return statistics.fmean(self.xa) - statistics.fmean(self.xb)

    @property
    def separated(self) -> bool:
        return self.p is not None and self.p < ALPHA

    def sentence(self, unit: str = "points", digits: int = 1) -> str:
        """One clause: which side is above (p < ALPHA), or that the seeds do not separate them."""
        n = f"n = {len(self.xa)} vs {len(self.xb)}"
        d = f"{self.diff:+.{digits}f} {unit}".strip()
        if self.p is None:
            return f"`{self.a}` against `{self.b}`: Δ = {d}, not testable ({self.why_not})"
        if self.separated:
            hi, lo, t = (self.a, self.b, self.t) if self.diff > 0 else (self.b, self.a, -self.t)
            return (f"`{hi}` is above `{lo}` by {abs(self.diff):.{digits}f} {unit}".rstrip()
                    + f" (Welch's t = {t:.2f}, p = {_p(self.p)}, {n})")
        return (f"the seeds do not separate `{self.a}` and `{self.b}` "
                f"(p = {_p(self.p)}; Δ = {d}, Welch's t = {self.t:.2f}, {n})")

    def verdict(self, paper_a_above_b: bool) -> str:
        """This run's direction against the paper's, as a phrase."""
        if not self.separated:
            return "not separated, so this run neither confirms nor contradicts the paper"
        if (self.diff > 0) == paper_a_above_b:
            return "the same direction as the paper"
        return "the opposite direction to the paper"


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def welch(a: str, xa: Sequence[float], b: str, xb: Sequence[float]) -> Welch:
    """Welch's t-test (scipy.stats.ttest_ind, equal_var=False); refuses n < 2 or no spread."""
    xa, xb = tuple(float(v) for v in xa), tuple(float(v) for v in xb)
    if not xa or not xb:
        return Welch(a, b, xa or (math.nan,), xb or (math.nan,), None, None, "a side has no runs")
    if min(len(xa), len(xb)) < 2:
        return Welch(a, b, xa, xb, None, None, f"n = {len(xa)} vs {len(xb)}: Welch's test needs 2 seeds per side")
    if statistics.variance(xa) == 0 and statistics.variance(xb) == 0:
        return Welch(a, b, xa, xb, None, None, "no spread across seeds on either side")
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():
        # one side without spread (equal values) is a valid Welch test; scipy warns about its moments
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        res = ttest_ind(xa, xb, equal_var=False)
    t, p = float(res.statistic), float(res.pvalue)
    if not math.isfinite(p):
        return Welch(a, b, xa, xb, None, None, "the test statistic is undefined for these values")
    return Welch(a, b, xa, xb, t, p)


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """'mean ± sample std' (std 0 for a single seed, as in the tables)."""
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _samples(df: pl.DataFrame, keys: list[str], value: str = "top1_test") -> dict[tuple, list[float]]:
    """{group key: per-seed values} in first-seen order."""
    out = df.group_by(keys, maintain_order=True).agg(pl.col(value).drop_nulls())
    return {tuple(r[k] for k in keys): list(r[value]) for r in out.iter_rows(named=True)}


def _family(pretext: str) -> str:
    return pretext.split("_")[0]


# --- Q1 architecture ------------------------------------------------------------------------

Q1_PAPER_FINDING = ("attention ahead of feedforward-only at ViT-B/16 (77.9 vs 74.9) and tiny (72.2 vs 61.4), "
                    "level at L/32 (71.2 vs 71.4)")


def architecture_answer(samples: dict[str, list[float]], order: list[str]) -> str:
    """One or two sentences: is attention needed, from the best mixer against attention."""
    best = order[0]
    if "attention" not in samples or len(order) == 1:
        return (f"`{best}` is the best token mixer here ({mean_std(samples[best])} %); there is no `attention` run "
                f"to compare it with.")
    if best == "attention":
        t = welch("attention", samples["attention"], order[1], samples[order[1]])
        if t.separated:
            return f"Attention is needed here: {t.sentence()}, the best attention-free mixer."
        return f"`attention` is the best mixer, but {t.sentence()}: this run does not show that attention is needed."
    t = welch(best, samples[best], "attention", samples["attention"])
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
        out.append(f"### {dataset}\n\n**Answer.** {architecture_answer(samples, order)}\n")
        details = []
        if "attention" in samples and "feedforward" in samples:
            t = welch("attention", samples["attention"], "feedforward", samples["feedforward"])
            p = _p(t.p) if t.p is not None else "not testable"
            details.append(f"Against the paper, which has {Q1_PAPER_FINDING}: here `attention` minus `feedforward` "
                           f"is {t.diff:+.1f} points (p = {p}), {t.verdict(True)}.")
        best = order[0]
        for bound in ("pooling", "identity"):
            if bound in samples and bound != best:
                t = welch(best, samples[best], bound, samples[bound])
                details.append(f"The best mixer against the `{bound}` lower bound (no learned token mixing): "
                               f"{t.sentence()}.")
        if details:
            out.append(" ".join(details) + "\n")
        rows = []
        for m in order:
            refs = "; ".join(f"{scale}: {v:.1f}" for scale, by in paper.items() for mm, v in by.items() if mm == m)
            rows.append((f"`{m}`", f"{params[m]:.2f}", mean_std(samples[m]), len(samples[m]), refs or "—"))
        out.append(aggregate.md_table(["mixer", "params (M)", "top-1 % (mean ± std)", "n", "paper top-1 % (ImageNet-1K)"],
                             rows))
        tests = [welch(m, samples[m], "attention", samples["attention"]) for m in order
                 if m != "attention" and "attention" in samples]
        if tests:
            out.append("Each mixer against `attention` (the ViT):\n\n"
                       + "\n".join(f"- {_cap(t.sentence())}." for t in tests) + "\n")
    return "\n".join(out)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# --- Q2 pretext -----------------------------------------------------------------------------

PRETEXT_DIRECTION = {"linear_probe": True, "finetune": False}  # the paper: CL ahead in probing, MIM in fine-tuning


def _pretext_order(names: Iterable[str]) -> list[str]:
    rank = {"supervised": 0, "moco": 1, "simmim": 2, "mae": 3, "hybrid": 4}
    return sorted(set(names), key=lambda p: (rank.get(_family(p), 9), p))


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
        return "No CL (`moco`) and MIM (`simmim`, `mae`) pair was run, so the CL-versus-MIM question is not asked here."
    return "CL (`moco`) against MIM (`simmim`, `mae`): " + "; ".join(parts) + "; the seeds do not separate the rest."


def pretext_section(evals: pl.DataFrame, analyses: pl.DataFrame | None = None) -> str:
    out = ["## Q2 pretext: what do self-supervised ViTs learn?\n"]
    paper = PAPER["pretext"]
    for dataset in evals["dataset"].unique(maintain_order=True).to_list():
        sub = evals.filter(pl.col("dataset") == dataset)
        samples = _samples(sub, ["pretext", "eval"])
        pretexts = _pretext_order(p for p, _ in samples)
        ev_names = [e for e in EVALS if any(k[1] == e for k in samples)]
        by_eval, lines, comparisons = {}, [], []
        for ev in ev_names:
            here = {p: samples[(p, ev)] for p in pretexts if (p, ev) in samples}
            best = max(here, key=lambda p: statistics.fmean(here[p]))
            by_eval[ev] = tests = _cl_mim(here)
            line = f"- `{ev}`: the best encoder is `{best}` ({mean_std(here[best])} %)."
            for t in tests:
                line += f" CL against MIM: {t.sentence()}"
                if ev in PRETEXT_DIRECTION:
                    line += f": {t.verdict(PRETEXT_DIRECTION[ev])}"
                line += "."
            lines.append(line)
            hybrids = [h for h in pretexts if _family(h) == "hybrid" and h in here]
            comparisons += [(ev, welch(h, here[h], c, here[c]))
                            for h in hybrids for c in ("moco", "simmim") if c in here]
        out.append(f"### {dataset}\n\n**Answer.** {pretext_answer(by_eval)}\n")
        out.append("\n".join(lines) + "\n")
        header = ["pretext", *(f"{e} top-1 %" for e in ev_names), "n", "paper linear_probe", "paper finetune"]
        rows = []
        for p in pretexts:
            cells = [mean_std(samples[(p, e)]) if (p, e) in samples else "—" for e in ev_names]
            n = max((len(samples[(p, e)]) for e in ev_names if (p, e) in samples), default=0)
            refs = [f"{paper[p][e]:.1f}" if e in paper.get(p, {}) else "—" for e in ("linear_probe", "finetune")]
            rows.append([f"`{p}`", *cells, n, *refs])
        out.append(aggregate.md_table(header, rows))
        if comparisons:
            out.append("The hybrid objective against its two ingredients:\n\n"
                       + "\n".join(f"- `{ev}`: {t.sentence()}." for ev, t in comparisons) + "\n")
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
    layers = sorted(per_seed["layer"].unique().to_list())
    late = layers[len(layers) // 2:]
    pretexts = _pretext_order(per_seed["pretext"].unique().to_list())
    late_means = per_seed.filter(pl.col("layer").is_in(late)).group_by(["pretext", "seed", "metric"]).agg(
        pl.col("value").mean())
    late_samples = _samples(late_means.sort("seed"), ["pretext", "metric"], "value")
    sentences = []
    for metric, (name, unit, claim, cl_above) in REPRESENTATION_CLAIMS.items():
        here = {p: late_samples[(p, metric)] for p in pretexts if (p, metric) in late_samples}
        for t in _cl_mim(here):
            if t.separated and (t.diff > 0) == cl_above:
                verdict = f"CL is {claim} than MIM there, as the paper reports"
            elif t.separated:
                verdict = f"the opposite of the paper, where CL is {claim}"
            else:
                verdict = f"the paper reports CL {claim}; these seeds do not show it"
            sentences.append(f"Late-layer {name} (blocks {late[0]}–{late[-1]}): {t.sentence(unit, 3)}; {verdict}.")
    out = []
    if sentences:
        out.append("**Representations.** " + " ".join(sentences) + "\n")
    for metric, label in (("attention_distance", "attention distance (px)"), ("nmi", "NMI(query; key)")):
        samples = _samples(per_seed.filter(pl.col("metric") == metric).sort("seed"), ["pretext", "layer"], "value")
        rows = [[f"`{p}`"] + [mean_std(samples[(p, layer)], 3) if (p, layer) in samples else "—" for layer in layers]
                + [max(len(samples.get((p, layer), [])) for layer in layers)] for p in pretexts]
        out.append(f"Per-layer {label}, heads averaged, mean ± std over seeds:\n\n"
                   + aggregate.md_table(["pretext"] + [f"block {layer}" for layer in layers] + ["n"], rows))
    return "\n".join(out)


# --- Q3 transfer ----------------------------------------------------------------------------

def transfer_answer(teacher: str, tests: dict[str, Welch], gap: dict) -> str:
    """Is the teacher's attention enough: copy and distill against scratch, with the gap closed."""
    parts = []
    for m, name in (("attn_copy", "copying"), ("attn_distill", "distilling")):
        if m not in tests:
            continue
        t, g = tests[m], gap.get((m, "all"))
        if t.p is None:
            part = f"{name} its attention maps is not testable against scratch ({t.why_not})"
        elif t.separated:
            part = f"{name} its attention maps is {'above' if t.diff > 0 else 'below'} scratch (p = {_p(t.p)})"
        else:
            part = f"{name} its attention maps is not separated from scratch (p = {_p(t.p)})"
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


def transfer_section(df: pl.DataFrame) -> str:
    out = ["## Q3 transfer: are attention patterns enough?\n"]
    paper = PAPER["transfer"]
    shift_cols = sorted(c for c in df.columns if c.startswith("top1_shift_"))
    table = aggregate.transfer_table(df)
    if shift_cols:  # per-seed top-1 lost under distribution shift: clean test minus the mean shifted test
        df = df.with_columns((pl.col("top1_test") - pl.mean_horizontal(shift_cols)).alias("shift_drop"))
    for dataset in df["dataset"].unique(maintain_order=True).to_list():
        sub = df.filter(pl.col("dataset") == dataset)
        per_teacher = aggregate.scratch_per_teacher(sub)
        out.append(f"### {dataset}\n")
        for teacher in [t for t in sub["teacher"].unique(maintain_order=True).to_list() if t != "none"]:
            rows_df = per_teacher.filter(pl.col("teacher") == teacher)
            samples = _samples(rows_df, ["method", "layers"])
            drops = _samples(rows_df, ["method", "layers"], "shift_drop") if shift_cols else {}
            tab = table.filter((pl.col("dataset") == dataset) & (pl.col("teacher") == teacher))
            gap = {(r["method"], r["layers"]): r["gap_closed"] for r in tab.iter_rows(named=True)}
            s = samples.get(("scratch", "all"))
            methods = sorted({m for m, lay in samples if lay == "all" and m != "scratch"},
                             key=aggregate.method_rank)
            tests = {m: welch(m, samples[(m, "all")], "scratch", s) for m in methods} if s else {}
            out.append(f"**Teacher `{teacher}`. Answer.** {transfer_answer(teacher, tests, gap)}\n")
            details = []
            if "finetune" in tests:
                details.append(f"Fine-tuning the teacher against scratch: {tests['finetune'].sentence()}.")
            if ("ensemble", "all") in samples and ("finetune", "all") in samples:
                t = welch("ensemble", samples[("ensemble", "all")], "finetune", samples[("finetune", "all")])
                details.append(f"Ensemble against fine-tuning (paper: {paper['ensemble']} vs {paper['finetune']}): "
                               f"{t.sentence()}.")
            for m in ("attn_copy", "attn_distill"):
                if drops and (m, "all") in drops and ("finetune", "all") in drops:
                    t = welch(m, drops[(m, "all")], "finetune", drops[("finetune", "all")])
                    details.append(
                        f"Under distribution shift (mean of {len(shift_cols)} shifted test sets), top-1 drops by "
                        f"{statistics.fmean(t.xa):.1f} points for `{m}` and {statistics.fmean(t.xb):.1f} for "
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
                ref = f"{paper[r['method']]:.1f}" if r["layers"] == "all" and r["method"] in paper else "—"
                rows.append((f"`{r['method']}`", r["layers"], mean_std(vals) if vals else "—", len(vals), g, drop, ref))
            out.append(aggregate.md_table(["method", "layers", "top-1 % (mean ± std)", "n", "gap closed",
                                  "top-1 drop under shift", "paper top-1 % (MAE ViT-L teacher)"], rows))
            if tests:
                out.append("Each method (all layers) against `scratch`:\n\n"
                           + "\n".join(f"- {_cap(t.sentence())}." for t in tests.values()) + "\n")
    return "\n".join(out)


# --- the document ---------------------------------------------------------------------------

def build_summary(architecture: Sequence[str] = (), pretext: Sequence[str] = (), analyses: Sequence[str] = (),
                  transfer: Sequence[str] = ()) -> str:
    """The whole summary.md from record paths; a question with no records is left out."""
    n = len(architecture) + len(pretext) + len(analyses) + len(transfer)
    parts = [
        "# vitablate summary\n",
        f"Written by the `report` target from {n} run records alone. Numbers are test top-1 (%) as "
        "mean ± sample std over seeds (n = seeds). Comparisons are two-sided Welch's t-tests across seeds "
        f"(scipy.stats.ttest_ind, equal_var=False) at α = {ALPHA}, uncorrected for the number of comparisons; "
        "with two or three seeds they only separate large differences, and where they do not, this says so. "
        "Paper numbers are ImageNet-1K at paper scale, this run is tiny models on small bundled data for minutes: "
        "compare directions, not values.\n",
    ]
    if architecture:
        parts.append(architecture_section(aggregate.load_records(architecture)))
        parts.append(f"Paper: {PAPER_SOURCES['architecture']}.\n")
    if pretext:
        evals = aggregate.load_records(pretext)
        rep = aggregate.load_analyses(analyses) if analyses else None
        parts.append(pretext_section(evals, rep))
        parts.append(f"Paper: {PAPER_SOURCES['pretext']}.\n")
    if transfer:
        parts.append(transfer_section(aggregate.load_records(transfer)))
        parts.append(f"Paper: {PAPER_SOURCES['transfer']}.\n")
    if len(parts) == 2:
        raise ValueError("no run records for the summary: the config has no architecture, pretext or transfer section")
    return "\n".join(parts)


HTML_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em}
th{background:#f0f0f0}code{background:#f4f4f4;padding:0 .2em}h2{border-bottom:1px solid #ddd;margin-top:1.6em}"""


def _inline(text: str) -> str:
    """Markdown inline marks this module writes (`code`, **bold**, *italic*) -> HTML, text escaped."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", text)


def markdown_to_html(md: str, title: str = "vitablate summary") -> str:
    """summary.md as a standalone HTML page (Snakemake's report shows HTML inline, not markdown).

    Handles only the markdown this module writes: headings, paragraphs, bullet lists, pipe tables.
    """
    out, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"(#{1,6}) (.*)", line):
            out.append(f"<h{len(m[1])}>{_inline(m[2])}</h{len(m[1])}>")
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, body = rows[0], [r for r in rows[1:] if not all(set(c) <= set("-:") for c in r)]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"(#{1,6} |\||- )", lines[i]):
                para.append(lines[i])
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def write_summary(md_path: str, html_path: str | None = None, **records: Sequence[str]) -> str:
    """Write summary.md (and its HTML rendering for `snakemake --report`); returns the markdown."""
    text = build_summary(**records)
    write_text(md_path, text)
    if html_path:
        write_text(html_path, markdown_to_html(text))
    return text
