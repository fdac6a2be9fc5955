"""Polars: run records -> comparison tables (csv + md), training curves and attention maps
ready to draw (figures.py draws them).

A run record is the JSON a job returns (see jobs.py); tables report the mean and
spread over seeds, never a single run.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterable, Sequence

import polars as pl

from .io import atomic_path, write_text
from .methods import TRANSFER_METHODS

SCALAR = (int, float, str, bool, type(None))
log = logging.getLogger(__name__)


def read_record(path: str) -> dict:
    """One run record; an unreadable, truncated or foreign file is an error naming it and the fix."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"run record {path} cannot be read ({type(e).__name__}: {e}); delete it and re-run "
                         "snakemake, which re-runs that job") from e
    if not isinstance(rec, dict):
        raise ValueError(f"run record {path} holds a {type(rec).__name__}, not a record; delete it and re-run "
                         "snakemake, which re-runs that job")
    return rec


def load_records(paths: Iterable[str], shift: Iterable[str] = ()) -> pl.DataFrame:
    """One row per record: its scalar fields (history and config are left out).

    `shift`: records of shift jobs (`<job dir>/shift/record.json`); each one's top1_shift_<name> fields join the
    row of the job whose model it tested (`<job dir>/record.json`)."""
    shifted = {}
    for path in shift:
        job_dir = os.path.dirname(os.path.dirname(os.path.normpath(path)))
        shifted[job_dir] = {k: v for k, v in read_record(path).items() if k.startswith("top1_shift_")}
    rows = []
    for path in paths:
        rec = read_record(path)
        rows.append({k: v for k, v in rec.items() if isinstance(v, SCALAR)}
                    | shifted.get(os.path.dirname(os.path.normpath(path)), {}))
    if not rows:
        raise ValueError("no run records to aggregate; run the training rules first")
    return pl.DataFrame(rows, infer_schema_length=None)


def mean_std(col: str, prefix: str) -> list[pl.Expr]:
    """<prefix>_mean and <prefix>_std (sample std; 0 for a single seed) of `col` within a group."""
    return [pl.col(col).mean().alias(f"{prefix}_mean"), pl.col(col).std(ddof=1).fill_null(0.0).alias(f"{prefix}_std")]


def summarise(df: pl.DataFrame, by: list[str], value: str = "top1_test", extra: dict | None = None) -> pl.DataFrame:
    """Mean and sample std of `value` over seeds within each group of `by`."""
    aggs = [
        pl.col("seed").n_unique().alias("n_seeds"), *mean_std(value, "top1")]
    aggs += [expr.alias(name) for name, expr in (extra or {}).items()]
    return df.group_by(by, maintain_order=True).agg(aggs)


def shift_means(df: pl.DataFrame) -> dict[str, pl.Expr]:
    """shift_<name>_top1_mean: the mean over seeds of each top1_shift_<name> column (the shift jobs' records,
    joined by `load_records(..., shift=...)`); none without them."""
    cols = sorted(c for c in df.columns if c.startswith("top1_shift_"))
    return {f"shift_{c[len('top1_shift_'):]}_top1_mean": pl.col(c).mean() for c in cols}


def architecture_table(df: pl.DataFrame) -> pl.DataFrame:
    """dataset, mixer, model, params_m, n_seeds, top1_mean, top1_std (docs/design.md), shift_<name>_top1_mean."""
    shift = shift_means(df)
    out = summarise(df, ["dataset", "mixer", "model"], extra={"params_m": pl.col("params_m").first(), **shift})
    return out.select("dataset", "mixer", "model", "params_m", "n_seeds", "top1_mean", "top1_std", *shift).sort(
        ["dataset", "top1_mean"], descending=[False, True])


def to_markdown(df: pl.DataFrame, digits: int = 2) -> str:
    def fmt(v) -> str:
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    return md_table(df.columns, ([fmt(v) for v in row] for row in df.iter_rows()))


def md_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A markdown table (cells as given)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(df: pl.DataFrame, csv_path: str, md_path: str) -> None:
    with atomic_path(csv_path) as tmp:
        df.write_csv(tmp, float_precision=4)
    write_text(md_path, to_markdown(df))


# --- Q2 pretext --------------------------------------------------------------------------

def pretext_table(df: pl.DataFrame) -> pl.DataFrame:
    """dataset, pretext, eval, n_seeds, top1_mean, top1_std (docs/design.md), shift_<name>_top1_mean."""
    shift = shift_means(df)
    return summarise(df, ["dataset", "pretext", "eval"], extra=shift).select(
        "dataset", "pretext", "eval", "n_seeds", "top1_mean", "top1_std", *shift).sort(["dataset", "eval", "pretext"])


def shape_bias_table(df: pl.DataFrame) -> pl.DataFrame | None:
    """Shape vs texture probes and cue-conflict shape bias per pretext (datasets with both labels)."""
    cols = ["top1_shape_probe", "top1_texture_probe", "shape_bias"]
    if not set(cols) <= set(df.columns):
        return None
    sub = df.filter(pl.col("eval") == "linear_probe").drop_nulls(cols)
    aggs = [pl.col("seed").n_unique().alias("n_seeds")]
    for c in cols:
        aggs += mean_std(c, c)
    return sub.group_by(["dataset", "pretext"], maintain_order=True).agg(aggs).sort(["dataset", "pretext"])


def load_analyses(paths: Iterable[str]) -> pl.DataFrame:
    """Long per-head rows of every analysis record: dataset, pretext, seed, layer, head, metric, value."""
    frames = []
    for path in paths:
        rec = read_record(path)
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
    return per_seed.group_by(["dataset", "pretext", "layer", "metric"]).agg(*mean_std("value", "value")).sort(["dataset", "metric", "pretext", "layer"]).select(
        "dataset", "pretext", "layer", "metric", "value_mean", "value_std")


def layer_probe_table(rep: pl.DataFrame) -> pl.DataFrame:
    return rep.filter(pl.col("metric") == "layer_probe_top1").drop("metric").rename(
        {"value_mean": "top1_mean", "value_std": "top1_std"})


# --- Q3 transfer -------------------------------------------------------------------------

METHOD_ORDER = TRANSFER_METHODS  # registration order (vitablate.methods), read live


def method_rank(method: str) -> int:
    """Position of a transfer method in tables and figures (its registration order; unknown methods last)."""
    return TRANSFER_METHODS.rank(method)


def scratch_per_teacher(df: pl.DataFrame) -> pl.DataFrame:
    """`scratch` has no teacher (teacher "none"): repeat its rows under every teacher, so that each
    teacher's block of a table or figure reads on its own."""
    teachers = [t for t in df["teacher"].unique(maintain_order=True).to_list() if t != "none"]
    scratch = df.filter(pl.col("method") == "scratch")
    if not teachers or not scratch.height:
        return df
    return pl.concat([df.filter(pl.col("method") != "scratch")]
                     + [scratch.with_columns(pl.lit(t).alias("teacher")) for t in teachers], how="diagonal_relaxed")


def transfer_table(df: pl.DataFrame) -> pl.DataFrame:
    """dataset, teacher, method, layers, n_seeds, top1_mean, top1_std, gap_closed, shift_<name>_top1_mean.

    `scratch` has no teacher: its row is repeated under every teacher so each teacher's block
    reads on its own. gap_closed = (method - scratch) / (finetune - scratch), on the means.
    """
    rows = scratch_per_teacher(df)
    extra = shift_means(df)
    table = summarise(rows, ["dataset", "teacher", "method", "layers"], extra=extra)
    base = table.filter(pl.col("method") == "scratch").select("dataset", "teacher", pl.col("top1_mean").alias("_s"))
    top = table.filter((pl.col("method") == "finetune") & (pl.col("layers") == "all")).select(
        "dataset", "teacher", pl.col("top1_mean").alias("_f"))
    table = table.join(base, on=["dataset", "teacher"], how="left").join(top, on=["dataset", "teacher"], how="left")
    table = table.with_columns(
        pl.when((pl.col("_f") - pl.col("_s")).abs() > 1e-9).then((pl.col("top1_mean") - pl.col("_s"))
                                                                / (pl.col("_f") - pl.col("_s"))).alias("gap_closed"))
    table = table.with_columns(pl.col("method").map_elements(method_rank, return_dtype=pl.Int64).alias("_o")).sort(
        ["dataset", "teacher", "_o", "layers"])
    return table.select("dataset", "teacher", "method", "layers", "n_seeds", "top1_mean", "top1_std", "gap_closed",
                        *extra)



# --- training curves from the run records ---------------------------------------------------

def _read_records(paths: Iterable[str], where: Callable[[dict], bool] | None = None) -> list[dict]:
    out = []
    for path in paths:
        rec = read_record(path)
        if where is None or where(rec):
            out.append(rec | {"_path": path})
    return out


def load_curves(paths: Iterable[str], by: list[str], metrics: list[str],
                where: Callable[[dict], bool] | None = None) -> pl.DataFrame:
    """Per-epoch metrics from the records' "history" (one dict per epoch, "epoch" 1-based), long:
    [*by, seed, metric, epoch, value]. `where(record)` picks the records.

    The history is the job's whole training: a resumed job carries its earlier epochs over from the
    checkpoint, so its curve starts at epoch 1 (its MLflow runs hold the epochs of each attempt
    only). Never fails the report: a record without a history, or a history without the metric,
    leaves that curve out with a logged warning.
    """
    schema = {**{k: pl.Utf8 for k in by}, "seed": pl.Int64, "metric": pl.Utf8, "epoch": pl.Int64,
              "value": pl.Float64}
    rows = []
    for rec in _read_records(paths, where):
        history = rec.get("history") or []
        if not history:
            log.warning("%s has no per-epoch history; its curves are left out", rec["_path"])
            continue
        key = {k: str(rec.get(k)) for k in by}
        for metric in metrics:
            points = [(int(h["epoch"]), float(h[metric])) for h in history if h.get(metric) is not None]
            if not points:
                log.warning("%s has no per-epoch %s", rec["_path"], metric)
            rows += [key | {"seed": int(rec["seed"]), "metric": metric, "epoch": epoch, "value": value}
                     for epoch, value in points]
    return pl.DataFrame(rows, schema=schema)


def curve_table(curves: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """[*by, metric, epoch, n_seeds, value_mean, value_std]: mean and sample std over seeds per epoch.

    Settings keep the order of the records (the config's), epochs ascend within each.
    """
    return curves.group_by([*by, "metric", "epoch"], maintain_order=True).agg(
        pl.col("seed").n_unique().alias("n_seeds"), *mean_std("value", "value"))


# --- attention maps of one image ---------------------------------------------------------

def load_query_maps(record: dict) -> dict | None:
    """The arrays of jobs.save_query_maps a record points to, or None (older record, file gone)."""
    import numpy as np

    path = record.get("attention_maps_path")
    if not path:
        return None
    here = os.path.join(os.path.dirname(record.get("_path", "")), os.path.basename(path))
    for candidate in (path, here):  # the path as the job wrote it, or beside the record
        if os.path.exists(candidate):
            with np.load(candidate) as z:
                return {k: z[k] for k in z.files}
    log.warning("attention maps %s of %s are missing", path, record.get("_path"))
    return None


def attention_cells(paths: Iterable[str], by: list[str], where: Callable[[dict], bool] | None = None) -> list[dict]:
    """One entry per group of `by` (in record order), from the group's first seed:
    {*by, seed, maps}; maps is None where the record has no attention maps."""
    first: dict[tuple, dict] = {}
    for rec in _read_records(paths, where):
        key = tuple(rec.get(k) for k in by)
        if key not in first or rec["seed"] < first[key]["seed"]:
            first[key] = rec
    return [{k: rec.get(k) for k in by} | {"seed": rec["seed"], "maps": load_query_maps(rec)}
            for rec in first.values()]
