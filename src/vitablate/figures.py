"""Figures: the tables and frames of `aggregate`, drawn for a reader to look at.

One fixed colour per setting name (`color`), whatever the figure: a mixer, a pretext (a
teacher named after its pretext shares its colour), a transfer method or an evaluation.
Axes carry units; bars carry error bars and curves bands, one standard deviation over
seeds. Every function writes a PNG and returns the (closed) matplotlib Figure, so tests
can read back what was drawn.
"""

from __future__ import annotations

import zlib

import numpy as np
import polars as pl

from .aggregate import method_rank, scratch_per_teacher
from .io import atomic_path
from .analysis.registry import EVALS, METRICS
from .methods import TRANSFER_METHODS
from .models.registry import MIXERS
from .objectives.registry import PRETEXTS, pretext_base

# --- one colour per setting ------------------------------------------------------------------


def colours() -> dict[str, str]:
    """Every registered setting's colour (its registry entry's `colour`): Q1 token mixers, Q2 pretexts (and Q3
    teachers named after them), Q3 transfer methods, Q2 evaluations (linear_probe and finetune are also
    transfer methods, in the same colours). Read afresh, so a setting registered later is drawn in its colour."""
    out: dict[str, str] = {}
    for registry in (MIXERS, PRETEXTS, TRANSFER_METHODS, EVALS):
        out.update(registry.colours())
    return out


_HYBRID_DARK, _HYBRID_LIGHT = (0.33, 0.15, 0.50), (0.78, 0.68, 0.86)  # lambda 0 -> dark, 1 -> light
_SPARE = ("#e377c2", "#8c564b", "#bcbd22", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#98df8a",
          "#ffbb78")


def color(name: str) -> str:
    """The colour of a setting name in every figure (hybrid_<lambda>: a shade of `hybrid`); unregistered
    names get a fixed spare colour."""
    registered = colours()
    if name in registered:
        return registered[name]
    if name.startswith("hybrid_"):
        try:
            lam = min(1.0, max(0.0, float(name.split("_", 1)[1])))
        except ValueError:
            return registered["hybrid"]
        rgb = [d + lam * (light - d) for d, light in zip(_HYBRID_DARK, _HYBRID_LIGHT)]
        return "#" + "".join(f"{round(255 * v):02x}" for v in rgb)
    return _SPARE[zlib.crc32(name.encode()) % len(_SPARE)]  # crc32: the same in every process


# --- matplotlib plumbing ---------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png_path: str):
    import matplotlib.pyplot as plt

    with atomic_path(png_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return fig


def _message(png_path: str, text: str):
    """A figure that says why it has nothing to show (the output must exist all the same)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return _save(fig, png_path)


def _bars(ax, labels: list[str], means: list[float], stds: list[float], title: str, xlabel: str,
          rotation: int) -> None:
    """One panel: top-1 mean per setting, error bars one std over seeds."""
    ax.bar(labels, means, yerr=stds, capsize=3, color=[color(v) for v in labels], label=labels)
    ax.set_title(title)
    ax.set_ylabel("test top-1 (%)")
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="x", rotation=rotation)
    ax.set_ylim(0, 100)


def _band(ax, x, mean, std, name: str, marker: str | None = None, ls: str = "-") -> None:
    """A mean line with a one-std band, in the setting's colour."""
    x, mean, std = np.asarray(x), np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
    ax.plot(x, mean, marker=marker, ls=ls, color=color(name), label=name, lw=1.6, ms=4)
    ax.fill_between(x, mean - std, mean + std, color=color(name), alpha=0.18, lw=0)


# --- Q1 architecture -------------------------------------------------------------------------

def plot_architecture(table: pl.DataFrame, png_path: str):
    """Top-1 per mixer with error bars (std over seeds), one panel per dataset."""
    plt = _plt()
    datasets = table["dataset"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], datasets):
        sub = table.filter(pl.col("dataset") == name)
        _bars(ax, sub["mixer"].to_list(), sub["top1_mean"].to_list(), sub["top1_std"].to_list(),
              f"{name} (mean ± std over {sub['n_seeds'].max()} seeds)", "token mixer", 30)
    fig.tight_layout()
    return _save(fig, png_path)


# --- Q2 pretext ------------------------------------------------------------------------------

REPRESENTATION_METRICS = METRICS  # every registered analysis metric (vitablate.analysis.registry), in order


def metric_label(metric: str) -> str:
    """A metric's axis label: its registry entry's label, else its name."""
    return (METRICS.entry(metric).label if metric in METRICS else None) or metric


def loss_label(pretext: str) -> str:
    """The pre-training loss of a pretext (hybrid_0.2: hybrid's), from its registry entry."""
    base = pretext_base(pretext)
    return (PRETEXTS.entry(base).meta.get("loss_label") if base in PRETEXTS else None) or "pre-training loss"


def ordered(present, registry) -> list[str]:
    """The names in `present`: registered ones in registration order, then any others in first-seen order
    (nothing present is dropped)."""
    present = list(dict.fromkeys(present))
    return [n for n in registry if n in present] + [n for n in present if n not in registry]


def plot_pretext(table: pl.DataFrame, png_path: str):
    """Linear probe vs fine-tune (and k-NN) top-1 per pretext, error bars over seeds."""
    plt = _plt()
    datasets = table["dataset"].unique(maintain_order=True).to_list()
    evals = ordered(table["eval"].to_list(), EVALS)
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.8 * len(datasets), 3.8), squeeze=False)
    for ax, name in zip(axes[0], datasets):
        sub = table.filter(pl.col("dataset") == name)
        pretexts = sub["pretext"].unique(maintain_order=True).to_list()
        width = 0.8 / max(1, len(evals))
        for j, ev in enumerate(evals):
            rows = {r["pretext"]: r for r in sub.filter(pl.col("eval") == ev).iter_rows(named=True)}
            xs = [i + (j - (len(evals) - 1) / 2) * width for i in range(len(pretexts))]
            ax.bar(xs, [rows.get(p, {}).get("top1_mean", 0) for p in pretexts], width,
                   yerr=[rows.get(p, {}).get("top1_std", 0) for p in pretexts], capsize=3, label=ev,
                   color=color(ev))
        ax.set_xticks(range(len(pretexts)), pretexts, rotation=20)
        ax.set_ylabel("test top-1 (%)")
        ax.set_xlabel("pre-training objective")
        ax.set_title(f"{name}: evaluation of each pretext (mean ± std over seeds)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title="evaluation", title_fontsize=8)
    fig.tight_layout()
    return _save(fig, png_path)


def plot_representation(rep: pl.DataFrame, png_path: str):
    """One panel per metric: value per layer, one line per pretext, bands over seeds."""
    plt = _plt()
    metrics = ordered(rep["metric"].to_list(), METRICS)  # every metric in the table, registered ones first
    datasets = rep["dataset"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(len(datasets), len(metrics), figsize=(3.6 * len(metrics), 3.2 * len(datasets)),
                             squeeze=False)
    for r, name in enumerate(datasets):
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            sub = rep.filter((pl.col("dataset") == name) & (pl.col("metric") == metric))
            for pretext in sub["pretext"].unique(maintain_order=True).to_list():
                s = sub.filter(pl.col("pretext") == pretext).sort("layer")
                _band(ax, s["layer"], s["value_mean"], s["value_std"], pretext, marker="o")
            ax.set_xlabel("depth (0 = embedding, i = block i)")
            ax.set_ylabel(metric_label(metric))
            ax.set_title(f"{name}: {metric}")
        axes[r][0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, png_path)


# --- Q3 transfer -----------------------------------------------------------------------------

def plot_transfer(table: pl.DataFrame, png_path: str):
    """Method against top-1, one panel per (dataset, teacher); error bars over seeds; scratch dashed."""
    plt = _plt()
    sub_all = table.filter(pl.col("layers") == "all")
    panels = sub_all.select("dataset", "teacher").unique(maintain_order=True).rows()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    for ax, (dataset, teacher) in zip(axes[0], panels):
        sub = sub_all.filter((pl.col("dataset") == dataset) & (pl.col("teacher") == teacher))
        _bars(ax, sub["method"].to_list(), sub["top1_mean"].to_list(), sub["top1_std"].to_list(),
              f"{dataset}, teacher: {teacher}", "method (all layers)", 40)
        scratch = sub.filter(pl.col("method") == "scratch")["top1_mean"].to_list()
        if scratch:
            ax.axhline(scratch[0], ls="--", color=color("scratch"), lw=1)
    fig.tight_layout()
    return _save(fig, png_path)


def plot_transfer_layers(table: pl.DataFrame, png_path: str):
    """Top-1 against the number of transferred layers K, first-K versus last-K (every layered method: copy and
    distill by default)."""
    from .methods import LAYERED

    plt = _plt()
    layered = list(LAYERED)
    sub = table.filter(pl.col("method").is_in(layered))
    teachers = sub["teacher"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, max(1, len(teachers)), figsize=(4.8 * max(1, len(teachers)), 3.6), squeeze=False)
    for ax, teacher in zip(axes[0], teachers):
        t = sub.filter(pl.col("teacher") == teacher)
        for i, method in enumerate(layered):
            style = ("-", ":", "--", "-.")[i % 4]
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
                                color=color(method))
        ax.set_title(f"teacher: {teacher}")
        ax.set_xlabel("K (number of transferred layers)")
        ax.set_ylabel("test top-1 (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, png_path)


# --- training curves (the records' per-epoch history; see aggregate.curve_table) --------------

CURVE_LABELS = {"train_loss": "training loss", "top1_val": "validation top-1 (%)"}


def _curve_panel(ax, curves: pl.DataFrame, setting: str, metric: str, title: str, ylabel: str) -> bool:
    """One line per setting with a ±std band over seeds; False when nothing was drawn."""
    from matplotlib.ticker import MaxNLocator

    sub = curves.filter(pl.col("metric") == metric)
    drawn = 0
    for name in sub[setting].unique(maintain_order=True).to_list():
        s = sub.filter(pl.col(setting) == name).sort("epoch")
        _band(ax, s["epoch"], s["value_mean"], s["value_std"], name, ls="--" if name == "scratch" else "-",
              marker="o" if s.height <= 15 else None)  # a short run's points stay visible
        drawn += 1
    n = sub["n_seeds"].max() if sub.height else 0
    ax.set_title(f"{title} (mean ± std, {n} seed{'s' * (n != 1)})" if n else title, fontsize=9)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if sub.height and sub["epoch"].max() - sub["epoch"].min() < 2:  # one or two epochs: room for integer ticks
        ax.set_xlim(sub["epoch"].min() - 0.5, sub["epoch"].max() + 0.5)
    ax.set_ylabel(ylabel)
    if drawn > 1:
        ax.legend(fontsize=7)
    elif not drawn:
        ax.text(0.5, 0.5, "no per-epoch history in the records", ha="center", va="center", transform=ax.transAxes)
    return bool(drawn)


NO_CURVES = "no training curves: the records hold no per-epoch history (see the report log)"


def plot_architecture_curves(curves: pl.DataFrame, png_path: str):
    """Per dataset: training loss and validation top-1 per epoch, one line per mixer, bands over seeds."""
    if curves.is_empty():
        return _message(png_path, NO_CURVES)
    plt = _plt()
    datasets = curves["dataset"].unique(maintain_order=True).to_list()
    metrics = ("train_loss", "top1_val")
    fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 3.6 * len(datasets)), squeeze=False)
    for r, name in enumerate(datasets):
        sub = curves.filter(pl.col("dataset") == name)
        for ax, metric in zip(axes[r], metrics):
            label = "training loss (cross-entropy, nats)" if metric == "train_loss" else CURVE_LABELS[metric]
            _curve_panel(ax, sub, "mixer", metric, f"{name}: {CURVE_LABELS[metric]} per token mixer", label)
    fig.tight_layout()
    return _save(fig, png_path)


def plot_pretext_curves(pretrain: pl.DataFrame, finetune: pl.DataFrame, png_path: str):
    """Per dataset: each pretext's pre-training loss (own axis: the objectives' losses differ in
    kind), then the fine-tuning evaluation's validation top-1 per pretext; bands over seeds."""
    if pretrain.is_empty() and finetune.is_empty():
        return _message(png_path, NO_CURVES)
    plt = _plt()
    datasets = pl.concat([f.select("dataset") for f in (pretrain, finetune) if f.height])["dataset"].unique(
        maintain_order=True).to_list()
    pretexts = pretrain["pretext"].unique(maintain_order=True).to_list() if pretrain.height else []
    ncols = min(3, len(pretexts) + 1)
    per = -(-(len(pretexts) + 1) // ncols)  # panel rows per dataset
    fig, axes = plt.subplots(per * len(datasets), ncols, figsize=(4.2 * ncols, 3.2 * per * len(datasets)),
                             squeeze=False)
    for d, name in enumerate(datasets):
        panels = [axes[d * per + i // ncols][i % ncols] for i in range(per * ncols)]
        pre = pretrain.filter(pl.col("dataset") == name) if pretrain.height else pretrain
        for ax, p in zip(panels, pretexts):
            _curve_panel(ax, pre.filter(pl.col("pretext") == p), "pretext", "train_loss",
                         f"{name}: pre-training {p}", loss_label(p))
        ft = finetune.filter(pl.col("dataset") == name) if finetune.height else finetune
        _curve_panel(panels[len(pretexts)], ft, "pretext", "top1_val", f"{name}: fine-tuning each encoder",
                     CURVE_LABELS["top1_val"])
        for ax in panels[len(pretexts) + 1:]:
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, png_path)


def plot_transfer_curves(curves: pl.DataFrame, png_path: str):
    """Per (dataset, teacher): the student's validation top-1 per epoch, one line per method
    (all layers), scratch dashed in every panel; bands over seeds."""
    if curves.is_empty():
        return _message(png_path, NO_CURVES)
    plt = _plt()
    curves = scratch_per_teacher(curves.with_columns(
        pl.col("method").map_elements(method_rank, return_dtype=pl.Int64).alias("_o")).sort("_o", maintain_order=True))
    panels = curves.select("dataset", "teacher").unique(maintain_order=True).rows()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    for ax, (dataset, teacher) in zip(axes[0], panels):
        sub = curves.filter((pl.col("dataset") == dataset) & (pl.col("teacher") == teacher)).sort(
            "_o", maintain_order=True)
        _curve_panel(ax, sub, "method", "top1_val", f"{dataset}, teacher: {teacher}", CURVE_LABELS["top1_val"])
    fig.tight_layout()
    return _save(fig, png_path)


# --- attention maps of one image (see jobs.save_query_maps) ----------------------------------

def pick_layers(depth: int) -> list[int]:
    """Every layer up to 4 blocks, else four spread from the first to the last."""
    if depth <= 4:
        return list(range(depth))
    return sorted({round(float(v)) for v in np.linspace(0, depth - 1, 4)})


NO_MAPS = "no attention maps recorded"
QUERY_BOX = "#00c000"  # the query patch, on the image and on every heat map


def _attention_grid(rows: list[tuple[str, str]], groups: list[str], cells: dict, png_path: str, title: str):
    """rows: (label, setting) per panel row; groups: column groups (teachers, or [""]);
    cells[(row index, group)]: the arrays of jobs.save_query_maps, or None (nothing recorded).

    Column 0 is the image with the query patch boxed; then, per group, one heat map per picked
    layer, drawn relative to uniform (weight x number of patches, so grids of any size share
    one scale): red where the query attends to a patch more than to the average patch, blue less.
    """
    import matplotlib.patches as mpatches
    from matplotlib.colors import TwoSlopeNorm

    present = [c for c in cells.values() if c is not None]
    if not rows or not present:
        return _message(png_path, NO_MAPS + " (records written before the field existed, or no attention model)")
    plt = _plt()
    n_layers = max(len(pick_layers(len(c["maps"]))) for c in present)
    ncols = 1 + len(groups) * n_layers

    def relative(cell, layer):  # 1 = the weight every patch would get from a uniform query
        return cell["maps"][layer] * cell["maps"][layer].size

    vmax = max(float(relative(c, i).max()) for c in present for i in pick_layers(len(c["maps"])))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(vmax, 1.05))
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.35 * ncols + 1.2, 1.45 * len(rows) + 0.9), squeeze=False)
    im = None
    for r, (label, setting) in enumerate(rows):
        row_cells = [cells.get((r, g)) for g in groups]
        first = next((c for c in row_cells if c is not None), None)
        ax = axes[r][0]
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, fontsize=8, fontweight="bold", rotation=0, ha="right", va="center")
        for spine in ax.spines.values():  # the setting's colour, as in every other figure
            spine.set_color(color(setting))
            spine.set_linewidth(3)
        if first is not None:
            img, ps = first["image"], int(first["patch_size"])
            qr, qc = (int(v) for v in first["query"])
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img.clip(0, 1), cmap="gray", vmin=0, vmax=1)
            ax.add_patch(mpatches.Rectangle((qc * ps - 0.5, qr * ps - 0.5), ps, ps, fill=False, ec=QUERY_BOX, lw=1.5))
        if r == 0:
            ax.set_title("image, query", fontsize=8)
        for g_i, (group, cell) in enumerate(zip(groups, row_cells)):
            panel_axes = axes[r][1 + g_i * n_layers: 1 + (g_i + 1) * n_layers]
            layers = pick_layers(len(cell["maps"])) if cell is not None else []
            for j, pax in enumerate(panel_axes):
                pax.set_xticks([])
                pax.set_yticks([])
                if cell is None or j >= len(layers):
                    for s in pax.spines.values():
                        s.set_visible(False)
                    if j == 0:
                        pax.text(0.05, 0.5, NO_MAPS, fontsize=7, transform=pax.transAxes, va="center")
                    continue
                layer = layers[j]
                im = pax.imshow(relative(cell, layer), cmap="RdBu_r", norm=norm, interpolation="nearest")
                qr, qc = (int(v) for v in cell["query"])
                pax.add_patch(mpatches.Rectangle((qc - 0.5, qr - 0.5), 1, 1, fill=False, ec=QUERY_BOX, lw=1.2))
                pax.set_xlabel(f"CLS {100 * float(cell['prefix_mass'][layer]):.0f}%", fontsize=6, labelpad=1)
                above = cells.get((r - 1, group)) if r else None
                if above is None or pick_layers(len(above["maps"])) != layers:  # head a run of equal rows
                    head = f"{group}\n" if group else ""
                    pax.set_title(f"{head}layer {layer}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    width = fig.get_size_inches()[0]
    fig.tight_layout(rect=(0, 0, 1 - 1.1 / width, 1))  # 1.1 in on the right for the colour bar and its label
    if im is not None:
        cax = fig.add_axes((1 - 0.95 / width, 0.15, 0.12 / width, 0.7))
        from matplotlib.ticker import MaxNLocator

        top = norm.vmax
        above = [t for t in MaxNLocator(4).tick_values(1.0, top) if 1.0 + 0.15 * (top - 1.0) < t <= top]
        bar = fig.colorbar(im, cax=cax, ticks=[0.0, 0.5, 1.0, *above])  # the two halves of the diverging scale
        bar.set_label("attention relative to uniform\n(weight × patches; 1 = uniform)", fontsize=7)
        cax.tick_params(labelsize=6)
    return _save(fig, png_path)


def plot_pretext_attention(cells: list[dict], png_path: str):
    """One row per (dataset, pretext): the centre query's attention in a few layers of its encoder.

    cells: dicts with dataset, pretext, seed and maps (jobs.save_query_maps arrays or None).
    """
    rows = [(f"{c['dataset']}\n{c['pretext']}\nseed {c['seed']}", c["pretext"]) for c in cells]
    grid = {(i, ""): c["maps"] for i, c in enumerate(cells)}
    return _attention_grid(rows, [""], grid, png_path, "Q2: attention of the centre query patch (green box) in each "
                           "pre-trained encoder\nmean over heads, keys = patch tokens (renormalised); "
                           "CLS: share the query sent to the CLS token")


def plot_transfer_attention(cells: list[dict], png_path: str):
    """One row per method, one column group per teacher: the maps the evaluated student uses
    (the teacher's where attn_copy copies them), for the centre query; scratch in every group.

    cells: dicts with dataset, teacher, method, seed and maps (or None); layers=all jobs.
    """
    datasets = list(dict.fromkeys(c["dataset"] for c in cells))
    teachers = list(dict.fromkeys(c["teacher"] for c in cells if c["teacher"] != "none")) or ["none"]
    rows, grid = [], {}
    for d in datasets:
        mine = [c for c in cells if c["dataset"] == d]
        methods = sorted({c["method"] for c in mine}, key=lambda m: (method_rank(m), m))
        for m in methods:
            r = len(rows)
            seeds = sorted({c["seed"] for c in mine if c["method"] == m})
            rows.append((f"{d}\n{m}" + (f"\nseed {seeds[0]}" if len(seeds) == 1 else ""), m))
            for c in mine:
                if c["method"] == m:
                    for t in (teachers if c["teacher"] == "none" else [c["teacher"]]):
                        grid[(r, t)] = c["maps"]
    groups = [f"teacher {t}" for t in teachers]
    grid = {(r, f"teacher {t}"): v for (r, t), v in grid.items()}
    return _attention_grid(rows, groups, grid, png_path, "Q3: attention of the centre query patch (green box) as "
                           "each evaluated model uses it (attn_copy, linear_probe: the teacher's maps)\nmean over "
                           "heads, keys = patch tokens (renormalised); CLS: share the query sent to the CLS token")
