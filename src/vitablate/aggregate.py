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


def plot_architecture(table: pl.DataFrame, png_path: str) -> None:
    """Top-1 per mixer with error bars (std over seeds), one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = table["dataset"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], datasets):
        sub = table.filter(pl.col("dataset") == name)
        mixers = sub["mixer"].to_list()
        ax.bar(mixers, sub["top1_mean"].to_list(), yerr=sub["top1_std"].to_list(), capsize=4,
               color=[PALETTE.get(m, "#333333") for m in mixers])
        n = sub["n_seeds"].max()
        ax.set_title(f"{name} (mean ± std over {n} seeds)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_xlabel("token mixer")
        ax.tick_params(axis="x", rotation=30)
        ax.set_ylim(0, 100)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
