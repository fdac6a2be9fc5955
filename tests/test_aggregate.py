"""Aggregation: records -> the docs/design.md table, means and sample std over seeds."""

import json

import polars as pl
import pytest

from vitablate.aggregate import architecture_table, load_records, to_markdown, write_table
from vitablate.figures import plot_architecture


def _records(tmp_path, rows):
    paths = []
    for i, r in enumerate(rows):
        p = tmp_path / f"r{i}.json"
        p.write_text(json.dumps(r | {"history": [{"epoch": 1}], "config": {"a": 1}}))
        paths.append(str(p))
    return paths


def test_architecture_table_columns_and_stats(tmp_path):
    rows = [dict(dataset="digits", mixer=m, model="vit_digits", seed=s, params_m=0.1 + (m == "feedforward"),
                 top1_test=acc) for m, accs in (("attention", [90.0, 92.0, 94.0]), ("feedforward", [80.0, 80.0, 86.0]))
            for s, acc in enumerate(accs)]
    table = architecture_table(load_records(_records(tmp_path, rows)))
    assert table.columns == ["dataset", "mixer", "model", "params_m", "n_seeds", "top1_mean", "top1_std"]
    att = table.filter(pl.col("mixer") == "attention").row(0, named=True)
    assert att["n_seeds"] == 3 and att["top1_mean"] == pytest.approx(92.0) and att["top1_std"] == pytest.approx(2.0)
    ff = table.filter(pl.col("mixer") == "feedforward").row(0, named=True)
    assert ff["top1_mean"] == pytest.approx(82.0) and ff["top1_std"] == pytest.approx(3.4641, abs=1e-3)
    assert table["mixer"].to_list() == ["attention", "feedforward"]  # best first within a dataset
    write_table(table, str(tmp_path / "t.csv"), str(tmp_path / "t.md"))
    assert pl.read_csv(tmp_path / "t.csv").columns == table.columns
    md = (tmp_path / "t.md").read_text()
    assert md.startswith("| dataset | mixer |") and "92.00" in md
    plot_architecture(table, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_single_seed_has_zero_std_and_no_records_is_an_error(tmp_path):
    rows = [dict(dataset="digits", mixer="identity", model="m", seed=0, params_m=0.1, top1_test=50.0)]
    table = architecture_table(load_records(_records(tmp_path, rows)))
    assert table["top1_std"].to_list() == [0.0]
    with pytest.raises(ValueError, match="no run records"):
        load_records([])


def test_markdown_formats_floats():
    df = pl.DataFrame({"a": ["x"], "b": [1.23456]})
    assert to_markdown(df) == "| a | b |\n|---|---|\n| x | 1.23 |\n"
