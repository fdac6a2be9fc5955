"""Figures: one colour per setting across figures, centre-query attention maps, and training
curves from the run records' per-epoch history."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
from matplotlib.colors import to_hex

from vitablate import aggregate, figures
from vitablate.analysis.maps import centre_query, query_attention
from vitablate.data.datasets import Split
from vitablate.jobs import save_query_maps
from vitablate.models import VARIANTS, attention_maps, create_model
from vitablate.objectives import AttentionCopy

PNG = b"\x89PNG"


def _png(path) -> bool:
    return path.read_bytes()[:4] == PNG


def _digits_vit(seed: int, **kw):
    torch.manual_seed(seed)
    return create_model(mixer=kw.pop("mixer", "attention"), in_chans=1, num_classes=10, **VARIANTS["vit_digits"],
                        **kw).eval()


# --- attention maps ------------------------------------------------------------------------

def test_centre_query_picks_below_right_on_even_grids():
    assert centre_query((4, 4)) == (2, 2)
    assert centre_query((7, 7)) == (3, 3)
    assert centre_query((14, 14)) == (7, 7)


def test_query_attention_rows_are_distributions_over_patches():
    model = _digits_vit(0)
    with torch.no_grad():
        maps = attention_maps(model, torch.rand(3, 1, 8, 8))
    attn, prefix = query_attention(maps, (4, 4), model.num_prefix_tokens, image=1)
    assert attn.shape == (4, 16) and prefix.shape == (4,)  # (layers, grid cells)
    assert torch.all(attn >= 0)
    torch.testing.assert_close(attn.sum(-1), torch.ones(4))  # over patch keys, CLS dropped and renormalised
    assert torch.all((prefix > 0) & (prefix < 1))
    # by hand, layer 2: query row of image 1, CLS column dropped, each head renormalised, then the head mean
    q = 1 + 2 * 4 + 2
    row = maps[2][1, :, q, 1:]
    torch.testing.assert_close(attn[2], (row / row.sum(-1, keepdim=True)).mean(0))
    torch.testing.assert_close(prefix[2], maps[2][1, :, q, 0].mean())


def test_query_attention_finds_a_known_target_and_checks_shapes():
    n = 1 + 16
    m = torch.zeros(1, 2, n, n)
    m[..., 0] = 0.5  # half of every row on CLS
    m[:, :, 1 + 10, 1 + 3] = 0.5  # the centre query (2, 2) = patch 10 looks at patch 3 only
    attn, prefix = query_attention([m], (4, 4), 1)
    assert attn[0].argmax().item() == 3 and attn[0, 3].item() == pytest.approx(1.0)
    assert prefix[0].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="patches"):
        query_attention([m], (3, 3), 1)
    with pytest.raises(ValueError, match="outside"):
        query_attention([m], (4, 4), 1, query=(4, 0))


def _split(n=2):
    torch.manual_seed(1)
    return SimpleNamespace(test=Split(torch.rand(n, 1, 8, 8), torch.zeros(n, dtype=torch.long)))


def test_attn_copy_records_the_teachers_maps_it_uses(tmp_path):
    teacher, student = _digits_vit(1), _digits_vit(2)
    data = _split()
    copy = AttentionCopy(teacher, student).eval()
    rec = save_query_maps(student, copy, data, lambda x: x, str(tmp_path / "copy"))
    saved = np.load(rec["attention_maps_path"])
    assert saved["maps"].shape == (4, 4, 4) and saved["image"].shape == (8, 8, 1)
    assert saved["query"].tolist() == [2, 2] and int(saved["patch_size"]) == 2
    with torch.no_grad():
        expected, _ = query_attention(attention_maps(teacher, data.test.x[:1]), (4, 4), 1)
        own, _ = query_attention(attention_maps(student, data.test.x[:1]), (4, 4), 1)
    np.testing.assert_allclose(saved["maps"].reshape(4, 16), expected.numpy(), atol=1e-6)
    assert not np.allclose(saved["maps"].reshape(4, 16), own.numpy(), atol=1e-3)  # not the student's own
    # a student evaluated alone records its own maps; a model that does not attend, nothing
    alone = np.load(save_query_maps(student, student, data, lambda x: x, str(tmp_path / "own"))["attention_maps_path"])
    np.testing.assert_allclose(alone["maps"].reshape(4, 16), own.numpy(), atol=1e-6)
    ff = _digits_vit(3, mixer="feedforward")
    assert save_query_maps(ff, ff, data, lambda x: x, str(tmp_path / "ff")) == {}


def _cell(rng, depth=4, grid=4, **keys):
    maps = rng.random((depth, grid, grid)).astype(np.float32)
    maps /= maps.sum(axis=(1, 2), keepdims=True)
    return keys | {"seed": 0, "maps": {"image": rng.random((8, 8, 1)), "maps": maps,
                                      "prefix_mass": np.full(depth, 0.1), "query": np.array([2, 2]),
                                      "patch_size": np.array(2)}}


def test_attention_figures_draw_and_say_when_nothing_was_recorded(tmp_path):
    rng = np.random.default_rng(0)
    pre = [_cell(rng, dataset="digits", pretext=p) for p in ("supervised", "moco", "hybrid_0.2")]
    pre[1]["maps"] = None  # an older record without the field
    figures.plot_pretext_attention(pre, str(tmp_path / "pa.png"))
    tr = [_cell(rng, dataset="digits", teacher=t, method=m) for t in ("mae", "moco")
          for m in ("attn_copy", "finetune")] + [_cell(rng, depth=12, grid=7, dataset="digits", teacher="none",
                                                       method="scratch")]
    fig = figures.plot_transfer_attention(tr, str(tmp_path / "ta.png"))
    assert _png(tmp_path / "pa.png") and _png(tmp_path / "ta.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert "teacher mae\nlayer 0" in titles and "teacher moco\nlayer 3" in titles
    assert figures.pick_layers(12) == [0, 4, 7, 11] and figures.pick_layers(4) == [0, 1, 2, 3]
    old = [{"dataset": "digits", "pretext": "moco", "seed": 0, "maps": None}]
    fig = figures.plot_pretext_attention(old, str(tmp_path / "none.png"))
    assert _png(tmp_path / "none.png")
    assert any(figures.NO_MAPS in t.get_text() for ax in fig.axes for t in ax.texts)


def test_attention_cells_take_the_first_seed_and_tolerate_old_records(tmp_path):
    paths = []
    for seed in (1, 0):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        np.savez(d / "attention_maps.npz", maps=np.full((4, 4, 4), seed, np.float32))
        rec = {"dataset": "digits", "pretext": "moco", "seed": seed,
               "attention_maps_path": f"elsewhere/s{seed}/attention_maps.npz"}  # moved: found beside the record
        (d / "record.json").write_text(json.dumps(rec))
        paths.append(str(d / "record.json"))
    (tmp_path / "old.json").write_text(json.dumps({"dataset": "digits", "pretext": "mae", "seed": 0}))
    cells = aggregate.attention_cells(paths + [str(tmp_path / "old.json")], ["dataset", "pretext"])
    assert [(c["pretext"], c["seed"]) for c in cells] == [("moco", 0), ("mae", 0)]
    assert cells[0]["maps"]["maps"].max() == 0 and cells[1]["maps"] is None


# --- one colour per setting ----------------------------------------------------------------

def _bar_colors(fig) -> dict:
    return {p.get_label(): to_hex(p.get_facecolor()) for ax in fig.axes for p in ax.patches if p.get_label()}


def _line_colors(fig) -> dict:
    return {ln.get_label(): to_hex(ln.get_color()) for ax in fig.axes for ln in ax.lines
            if not ln.get_label().startswith("_")}


def _row_colors(fig) -> dict:
    """Attention figures: the setting named in an image panel's label -> its frame colour."""
    out = {}
    for ax in fig.axes:
        label = ax.get_ylabel()
        if label.count("\n") == 2:  # "dataset\nsetting\nseed k" (the colour bar has a one-line label)
            out[label.split("\n")[1]] = to_hex(ax.spines["left"].get_edgecolor())
    return out


def _curves(by: str, names, metrics=("train_loss", "top1_val"), **extra) -> pl.DataFrame:
    rows = [dict(dataset="digits", **extra, **{by: n}, metric=m, epoch=e, n_seeds=2, value_mean=float(e + i),
                 value_std=0.5) for i, n in enumerate(names) for m in metrics for e in (1, 2, 3)]
    return pl.DataFrame(rows)


def test_a_setting_has_one_colour_in_every_figure(tmp_path):
    rng = np.random.default_rng(0)

    def out(name: str) -> str:
        return str(tmp_path / name)

    mixers = ["attention", "feedforward", "pooling"]
    arch = pl.DataFrame(dict(dataset="digits", mixer=mixers, model="m", params_m=0.1, n_seeds=2,
                             top1_mean=[90.0, 80.0, 70.0], top1_std=[1.0, 2.0, 3.0]))
    a_bars = _bar_colors(figures.plot_architecture(arch, out("a.png")))
    a_lines = _line_colors(figures.plot_architecture_curves(_curves("mixer", mixers), out("ac.png")))
    for m in mixers:
        assert a_bars[m] == a_lines[m] == figures.color(m)

    pretexts = ["supervised", "moco", "mae", "hybrid_0.2"]
    rep = pl.DataFrame([dict(dataset="digits", pretext=p, layer=layer, metric=metric, value_mean=0.1 * layer,
                             value_std=0.01) for p in pretexts for layer in range(4)
                        for metric in ("attention_distance", "nmi")])
    r_lines = _line_colors(figures.plot_representation(rep, out("r.png")))
    pc = _line_colors(figures.plot_pretext_curves(_curves("pretext", pretexts, ("train_loss",)),
                                                  _curves("pretext", pretexts, ("top1_val",)), out("pc.png")))
    pa = _row_colors(figures.plot_pretext_attention([_cell(rng, dataset="digits", pretext=p) for p in pretexts],
                                                    out("pa.png")))
    for p in pretexts:
        assert r_lines[p] == pc[p] == pa[p] == figures.color(p)
    assert figures.color("hybrid_0.2") != figures.color("hybrid_0.8")  # each lambda its own shade

    methods = ["scratch", "attn_copy", "attn_distill", "finetune"]
    table = pl.DataFrame(dict(dataset="digits", teacher="mae", method=methods, layers="all", n_seeds=2,
                              top1_mean=[70.0, 75.0, 76.0, 80.0], top1_std=1.0, gap_closed=0.5))
    t_bars = _bar_colors(figures.plot_transfer(table, out("t.png")))
    t_lines = _line_colors(figures.plot_transfer_curves(_curves("method", methods, ("top1_val",), teacher="mae"),
                                                        out("tc.png")))
    ta = _row_colors(figures.plot_transfer_attention(
        [_cell(rng, dataset="digits", teacher="mae", method=m) for m in methods], out("ta.png")))
    evals = pl.DataFrame(dict(dataset="digits", pretext="moco", eval=["linear_probe", "finetune", "knn"], n_seeds=2,
                              top1_mean=[60.0, 90.0, 40.0], top1_std=1.0))
    handles, labels = figures.plot_pretext(evals, out("pe.png")).axes[0].get_legend_handles_labels()
    e_bars = {lbl: to_hex(h.patches[0].get_facecolor()) for h, lbl in zip(handles, labels)}
    for m in methods:
        assert t_bars[m] == t_lines[m] == ta[m] == figures.color(m)
    assert e_bars["finetune"] == t_bars["finetune"]  # an evaluation and the method of the same name
    assert all(_png(p) for p in tmp_path.glob("*.png"))


# --- training curves from the run records' history -----------------------------------------

def _record(path, **fields):
    path.write_text(json.dumps(fields))
    return str(path)


def test_curves_are_read_from_the_records_and_averaged_over_seeds(tmp_path, caplog):
    paths = []
    for mixer, offset in (("attention", 0.0), ("pooling", 10.0)):
        for seed in (0, 1):
            history = [{"epoch": e, "top1_val": offset + 10 * e + 2 * seed, "train_loss": 1.0 / e, "lr": 0.1}
                       for e in (1, 2, 3)]
            paths.append(_record(tmp_path / f"{mixer}{seed}.json", dataset="digits", mixer=mixer, seed=seed,
                                 history=history))
    paths.append(_record(tmp_path / "none.json", dataset="digits", mixer="identity", seed=0, history=[]))
    paths.append(_record(tmp_path / "loss.json", dataset="digits", mixer="mixer", seed=0,
                         history=[{"epoch": 1, "train_loss": 0.5}]))  # no validation metric

    by = ["dataset", "mixer"]
    with caplog.at_level(logging.WARNING):
        raw = aggregate.load_curves(paths, by, ["top1_val", "train_loss"])
    assert "none.json has no per-epoch history" in caplog.text and "loss.json has no per-epoch top1_val" in caplog.text
    assert raw.filter(pl.col("metric") == "top1_val").height == 2 * 2 * 3
    table = aggregate.curve_table(raw, by)
    row = table.filter((pl.col("mixer") == "pooling") & (pl.col("metric") == "top1_val")
                       & (pl.col("epoch") == 2)).row(0, named=True)
    assert row["n_seeds"] == 2 and row["value_mean"] == pytest.approx(31.0)
    assert row["value_std"] == pytest.approx(np.std([30.0, 32.0], ddof=1))
    assert table["mixer"].unique(maintain_order=True).to_list() == ["attention", "pooling", "mixer"]  # record order
    fig = figures.plot_architecture_curves(table, str(tmp_path / "curves.png"))
    assert _png(tmp_path / "curves.png")
    line = next(ln for ln in fig.axes[1].lines if ln.get_label() == "attention")
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == pytest.approx([11.0, 21.0, 31.0])
    # nothing to show still draws the figures
    empty = aggregate.load_curves([paths[4]], by, ["top1_val"])
    figures.plot_architecture_curves(aggregate.curve_table(empty, by), str(tmp_path / "c.png"))
    figures.plot_pretext_curves(empty, empty, str(tmp_path / "p.png"))
    figures.plot_transfer_curves(empty, str(tmp_path / "t.png"))
    assert all(_png(tmp_path / n) for n in ("c.png", "p.png", "t.png"))


def test_a_resumed_run_has_its_whole_curve(tmp_path):
    """A job interrupted after epoch 2 and resumed: its record's curve covers epochs 1-4, the values
    those epochs logged when they ran (the MLflow run of the second attempt holds epochs 3-4 only)."""
    from vitablate.config import TrainConfig
    from vitablate.engine import Checkpoint, classification_loss, fit, pick_precision

    class Stop(Exception):
        pass

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 2, (48,), generator=g)

    def model():
        torch.manual_seed(0)
        return create_model(mixer="attention", img_size=8, patch_size=2, embed_dim=16, depth=1, num_heads=2,
                            num_classes=2, in_chans=1)

    def batches(epoch):
        return [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]

    logged = {}  # what each epoch reported when it ran (on_epoch: what MLflow gets)

    def on_epoch(epoch, metrics):
        if epoch == 3:
            raise Stop  # dies in epoch 3, before its checkpoint
        logged[epoch] = metrics["train_loss"]

    cfg, prec, ck = TrainConfig(epochs=4, batch_size=16, lr=3e-3), pick_precision(torch.device("cpu"), "fp32"), \
        Checkpoint(str(tmp_path / "c.pt"))
    m = model()
    with pytest.raises(Stop):
        fit(m, classification_loss(m, 0.0), batches, 3, cfg, prec, ck, 0, on_epoch=on_epoch)
    m = model()
    result = fit(m, classification_loss(m, 0.0), batches, 3, cfg, prec, ck, 0,
                 on_epoch=lambda e, metrics: logged.__setitem__(e, metrics["train_loss"]))
    assert result.resumed_from_epoch == 2
    path = _record(tmp_path / "record.json", dataset="digits", mixer="attention", seed=0,
                   resumed_from_epoch=result.resumed_from_epoch, history=result.history)
    curve = aggregate.load_curves([path], ["dataset", "mixer"], ["train_loss"])
    assert curve["epoch"].to_list() == [1, 2, 3, 4]
    assert curve["value"].to_list() == [logged[e] for e in (1, 2, 3, 4)]
