"""Polars: run records -> comparison tables (csv + md) and figures.

A run record is the JSON a job returns (see jobs.py); tables report the mean and
spread over seeds, never a single run.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import polars as pl

SCALAR = (int, float, str, bool, type(None))


def load_records(paths: Iterable[str]) -> pl.DataFrame:
    """One row per record: its scalar fields (history and config are left out)."""
    rows = []
    for path in paths:
        with open(path) as f:
            rec = json.load(f)
        rows.append({k: v for k, v in rec.items() if isinstance(v, SCALAR)})
    if not rows:
        raise ValueError("no run records to aggregate; run the training rules first")
    return pl.DataFrame(rows, infer_schema_length=None)


def summarise(df: pl.DataFrame, by: list[str], value: str = "top1_test", extra: dict | None = None) -> pl.DataFrame:
    """Mean and sample std of `value` over seeds within each group of `by`."""
    aggs = [
        pl.col("seed").n_unique().alias("n_seeds"),
        pl.col(value).mean().alias("top1_mean"),
        pl.col(value).std(ddof=1).fill_null(0.0).alias("top1_std"),
    ]
    aggs += [expr.alias(name) for name, expr in (extra or {}).items()]
    return df.group_by(by, maintain_order=True).agg(aggs)


def architecture_table(df: pl.DataFrame) -> pl.DataFrame:
    """dataset, mixer, model, params_m, n_seeds, top1_mean, top1_std (DESIGN.md)."""
    out = summarise(df, ["dataset", "mixer", "model"], extra={"params_m": pl.col("params_m").first()})
    return out.select("dataset", "mixer", "model", "params_m", "n_seeds", "top1_mean", "top1_std").sort(
        ["dataset", "top1_mean"], descending=[False, True])


def to_markdown(df: pl.DataFrame, digits: int = 2) -> str:
    def fmt(v) -> str:
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join(lines) + "\n"


def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_table(df: pl.DataFrame, csv_path: str, md_path: str) -> None:
    os.makedirs(os.path.dirname(csv_path) or ".", exist_ok=True)
    tmp = f"{csv_path}.tmp{os.getpid()}"
    df.write_csv(tmp, float_precision=4)
    os.replace(tmp, csv_path)
    _atomic_write(md_path, to_markdown(df))


# one colour per setting, shared by every figure
PALETTE = {
    "attention": "#1f77b4", "feedforward": "#ff7f0e", "attention_only": "#2ca02c",
    "pooling": "#9467bd", "identity": "#7f7f7f",
}


def _bars(ax, sub: pl.DataFrame, labels: list[str], colors: dict, title: str, xlabel: str, rotation: int) -> None:
    """One panel: top-1 mean per label with std error bars over seeds."""
    ax.bar(labels, sub["top1_mean"].to_list(), yerr=sub["top1_std"].to_list(), capsize=3,
           color=[colors.get(v, "#333333") for v in labels])
    ax.set_title(title)
    ax.set_ylabel("test top-1 (%)")
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="x", rotation=rotation)
    ax.set_ylim(0, 100)


def plot_architecture(table: pl.DataFrame, png_path: str) -> None:
    """Top-1 per mixer with error bars (std over seeds), one panel per dataset."""
    plt = _plt()
    datasets = table["dataset"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], datasets):
        sub = table.filter(pl.col("dataset") == name)
        _bars(ax, sub, sub["mixer"].to_list(), PALETTE, f"{name} (mean ± std over {sub['n_seeds'].max()} seeds)",
              "token mixer", 30)
    fig.tight_layout()
    _save(fig, png_path)


# --- Q2 pretext --------------------------------------------------------------------------

PRETEXT_COLORS = {"supervised": "#444444", "moco": "#d62728", "simmim": "#1f77b4", "mae": "#17becf",
                  "hybrid": "#9467bd"}
REPRESENTATION_METRICS = ("attention_distance", "nmi", "token_cosine", "fourier_hf")
METRIC_LABELS = {"attention_distance": "attention distance (px)", "nmi": "NMI(query; key)",
                 "token_cosine": "token cosine similarity", "fourier_hf": "Δ log amplitude (high − zero freq.)",
                 "layer_probe_top1": "linear probe top-1 (%)"}


def pretext_color(pretext: str) -> str:
    return PRETEXT_COLORS.get(pretext.split("_")[0], "#333333")


def pretext_table(df: pl.DataFrame) -> pl.DataFrame:
    """dataset, pretext, eval, n_seeds, top1_mean, top1_std (DESIGN.md)."""
    return summarise(df, ["dataset", "pretext", "eval"]).select(
        "dataset", "pretext", "eval", "n_seeds", "top1_mean", "top1_std").sort(["dataset", "eval", "pretext"])


def shape_bias_table(df: pl.DataFrame) -> pl.DataFrame | None:
    """Shape vs texture probes and cue-conflict shape bias per pretext (datasets with both labels)."""
    cols = ["top1_shape_probe", "top1_texture_probe", "shape_bias"]
    if not set(cols) <= set(df.columns):
        return None
    sub = df.filter(pl.col("eval") == "linear_probe").drop_nulls(cols)
    aggs = [pl.col("seed").n_unique().alias("n_seeds")]
    for c in cols:
        aggs += [pl.col(c).mean().alias(f"{c}_mean"), pl.col(c).std(ddof=1).fill_null(0.0).alias(f"{c}_std")]
    return sub.group_by(["dataset", "pretext"], maintain_order=True).agg(aggs).sort(["dataset", "pretext"])


def load_analyses(paths: Iterable[str]) -> pl.DataFrame:
    """Long per-head rows of every analysis record: dataset, pretext, seed, layer, head, metric, value."""
    frames = []
    for path in paths:
        with open(path) as f:
            rec = json.load(f)
        frames.append(pl.read_parquet(rec["analysis_path"]).with_columns(
            pl.lit(rec["dataset"]).alias("dataset"), pl.lit(rec["pretext"]).alias("pretext"),
            pl.lit(rec["seed"]).alias("seed")))
    if not frames:
        raise ValueError("no analysis records to aggregate; run the pretext_analysis rules first")
    return pl.concat(frames, how="vertical_relaxed")


def representation_table(paths: Iterable[str]) -> pl.DataFrame:
    """dataset, pretext, layer, metric, value_mean, value_std: heads averaged, then mean/std over seeds."""
    per_seed = load_analyses(paths).group_by(["dataset", "pretext", "seed", "layer", "metric"]).agg(
        pl.col("value").mean())
    return per_seed.group_by(["dataset", "pretext", "layer", "metric"]).agg(
        pl.col("value").mean().alias("value_mean"), pl.col("value").std(ddof=1).fill_null(0.0).alias("value_std"),
    ).sort(["dataset", "metric", "pretext", "layer"]).select(
        "dataset", "pretext", "layer", "metric", "value_mean", "value_std")


def layer_probe_table(rep: pl.DataFrame) -> pl.DataFrame:
    return rep.filter(pl.col("metric") == "layer_probe_top1").drop("metric").rename(
        {"value_mean": "top1_mean", "value_std": "top1_std"})


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pretext(table: pl.DataFrame, png_path: str) -> None:
    """Linear probe vs fine-tune (and k-NN) top-1 per pretext, error bars over seeds."""
    plt = _plt()
    datasets = table["dataset"].unique(maintain_order=True).to_list()
    evals = [e for e in ("linear_probe", "finetune", "knn") if e in table["eval"].to_list()]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    for ax, name in zip(axes[0], datasets):
        sub = table.filter(pl.col("dataset") == name)
        pretexts = sub["pretext"].unique(maintain_order=True).to_list()
        width = 0.8 / max(1, len(evals))
        for j, ev in enumerate(evals):
            rows = {r["pretext"]: r for r in sub.filter(pl.col("eval") == ev).iter_rows(named=True)}
            xs = [i + (j - (len(evals) - 1) / 2) * width for i in range(len(pretexts))]
            ax.bar(xs, [rows.get(p, {}).get("top1_mean", 0) for p in pretexts], width,
                   yerr=[rows.get(p, {}).get("top1_std", 0) for p in pretexts], capsize=3, label=ev,
                   color=["#1f77b4", "#ff7f0e", "#2ca02c"][j], edgecolor=[pretext_color(p) for p in pretexts])
        ax.set_xticks(range(len(pretexts)), pretexts, rotation=20)
        ax.set_ylabel("test top-1 (%)")
        ax.set_xlabel("pre-training objective")
        ax.set_title(f"{name}: evaluation of each pretext (mean ± std over seeds)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, png_path)


def plot_representation(rep: pl.DataFrame, png_path: str) -> None:
    """One panel per metric: value per layer, one line per pretext, bands over seeds."""
    plt = _plt()
    metrics = [m for m in (*REPRESENTATION_METRICS, "layer_probe_top1") if m in rep["metric"].to_list()]
    datasets = rep["dataset"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(len(datasets), len(metrics), figsize=(3.6 * len(metrics), 3.2 * len(datasets)),
                             squeeze=False)
    for r, name in enumerate(datasets):
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            sub = rep.filter((pl.col("dataset") == name) & (pl.col("metric") == metric))
            for pretext in sub["pretext"].unique(maintain_order=True).to_list():
                s = sub.filter(pl.col("pretext") == pretext).sort("layer")
                x, m, sd = s["layer"].to_numpy(), s["value_mean"].to_numpy(), s["value_std"].to_numpy()
                ax.plot(x, m, marker="o", label=pretext, color=pretext_color(pretext))
                ax.fill_between(x, m - sd, m + sd, alpha=0.15, color=pretext_color(pretext))
            ax.set_xlabel("layer (block index)")
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
            ax.set_title(f"{name}: {metric}")
        axes[r][0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, png_path)


def _save(fig, png_path: str) -> None:
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# --- Q3 transfer -------------------------------------------------------------------------

METHOD_ORDER = ["scratch", "linear_probe", "attn_copy", "copy_q", "copy_k", "attn_distill", "finetune", "ensemble"]
METHOD_COLORS = {"scratch": "#7f7f7f", "linear_probe": "#bcbd22", "attn_copy": "#1f77b4", "copy_q": "#aec7e8",
                 "copy_k": "#9edae5", "attn_distill": "#2ca02c", "finetune": "#d62728", "ensemble": "#9467bd"}


def transfer_table(df: pl.DataFrame) -> pl.DataFrame:
    """dataset, teacher, method, layers, n_seeds, top1_mean, top1_std, gap_closed, shift_<name>_top1_mean.

    `scratch` has no teacher: its row is repeated under every teacher so each teacher's block
    reads on its own. gap_closed = (method - scratch) / (finetune - scratch), on the means.
    """
    shift_cols = sorted(c for c in df.columns if c.startswith("top1_shift_"))
    teachers = [t for t in df["teacher"].unique(maintain_order=True).to_list() if t != "none"]
    scratch = df.filter(pl.col("method") == "scratch")
    rows = df.filter(pl.col("method") != "scratch")
    if teachers and scratch.height:
        rows = pl.concat([rows] + [scratch.with_columns(pl.lit(t).alias("teacher")) for t in teachers],
                         how="diagonal_relaxed")
    elif scratch.height:
        rows = pl.concat([rows, scratch], how="diagonal_relaxed")
    extra = {f"shift_{c[len('top1_shift_'):]}_top1_mean": pl.col(c).mean() for c in shift_cols}
    table = summarise(rows, ["dataset", "teacher", "method", "layers"], extra=extra)
    base = table.filter(pl.col("method") == "scratch").select("dataset", "teacher", pl.col("top1_mean").alias("_s"))
    top = table.filter((pl.col("method") == "finetune") & (pl.col("layers") == "all")).select(
        "dataset", "teacher", pl.col("top1_mean").alias("_f"))
    table = table.join(base, on=["dataset", "teacher"], how="left").join(top, on=["dataset", "teacher"], how="left")
    table = table.with_columns(
        pl.when((pl.col("_f") - pl.col("_s")).abs() > 1e-9).then((pl.col("top1_mean") - pl.col("_s"))
                                                                / (pl.col("_f") - pl.col("_s"))).alias("gap_closed"))
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    table = table.with_columns(pl.col("method").replace_strict(order, default=99).alias("_o")).sort(
        ["dataset", "teacher", "_o", "layers"])
    return table.select("dataset", "teacher", "method", "layers", "n_seeds", "top1_mean", "top1_std", "gap_closed",
                        *extra)


def plot_transfer(table: pl.DataFrame, png_path: str) -> None:
    """Method against top-1, one panel per (dataset, teacher); error bars over seeds; scratch dashed."""
    plt = _plt()
    sub_all = table.filter(pl.col("layers") == "all")
    panels = sub_all.select("dataset", "teacher").unique(maintain_order=True).rows()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    for ax, (dataset, teacher) in zip(axes[0], panels):
        sub = sub_all.filter((pl.col("dataset") == dataset) & (pl.col("teacher") == teacher))
        _bars(ax, sub, sub["method"].to_list(), METHOD_COLORS, f"{dataset}, teacher: {teacher}",
              "method (all layers)", 40)
        scratch = sub.filter(pl.col("method") == "scratch")["top1_mean"].to_list()
        if scratch:
            ax.axhline(scratch[0], ls="--", color="#7f7f7f", lw=1)
    fig.tight_layout()
    _save(fig, png_path)


def plot_transfer_layers(table: pl.DataFrame, png_path: str) -> None:
    """Top-1 against the number of transferred layers K, first-K versus last-K (copy and distill)."""
    plt = _plt()
    sub = table.filter(pl.col("method").is_in(["attn_copy", "attn_distill"]))
    teachers = sub["teacher"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, max(1, len(teachers)), figsize=(4.8 * max(1, len(teachers)), 3.6), squeeze=False)
    for ax, teacher in zip(axes[0], teachers):
        t = sub.filter(pl.col("teacher") == teacher)
        for method, style in (("attn_copy", "-"), ("attn_distill", ":")):
            for which, marker in (("first", "o"), ("last", "s")):
                pts = []
                for row in t.filter(pl.col("method") == method).iter_rows(named=True):
                    spec = row["layers"]  # "first:K" | "last:K" | "all" | "i,j"
                    if spec.startswith(which + ":"):
                        pts.append((int(spec.split(":")[1]), row["top1_mean"], row["top1_std"]))
                if pts:
                    pts.sort()
                    k, m, sd = zip(*pts)
                    ax.errorbar(k, m, yerr=sd, ls=style, marker=marker, capsize=3, label=f"{method} {which}-K",
                                color=METHOD_COLORS[method])
        ax.set_title(f"teacher: {teacher}")
        ax.set_xlabel("K (number of transferred layers)")
        ax.set_ylabel("test top-1 (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, png_path)
