"""The papers' recipes (config/presets/reference_recipes.yaml) checked against the presets' resolved jobs.

Every job a preset's grid holds is resolved through `vitablate.workflow`'s resolvers (the same configs the
Snakemake rules run); each job whose (kind, wildcards) a stage's `jobs` selects is compared, ingredient by
ingredient, with the paper's value. A difference is allowed only where the table lists it as a deviation
with its reason; the deviations of the stages a preset runs are what its header's generated block lists.

    python -m vitablate.recipes                  # check every preset the table names; list the problems
    python -m vitablate.recipes --write-headers  # rewrite each preset's generated deviation block
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from .config import to_dict
from .io import write_text
from .workflow import RESOLVERS, active_questions, grid

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "config" / "presets" / "reference_recipes.yaml"
PRESET_DIR = ROOT / "config" / "presets"
KINDS = {"architecture": ["architecture"], "pretext": ["pretrain", "pretext_eval", "analysis"],
         "transfer": ["transfer"]}
BEGIN = "# --- Deviations from the papers' recipes (generated from config/presets/reference_recipes.yaml by"
BEGIN2 = "# --- `python -m vitablate.recipes --write-headers`; tests/test_recipes.py checks it; docs/recipes.md):"
END = "# --- end of the generated deviations"
MISSING = object()


def load_table(path: Path = TABLE) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def load_preset(name: str) -> dict:
    with open(PRESET_DIR / f"{name}.yaml") as f:
        return yaml.safe_load(f)


def lookup(d: dict, dotted: str) -> Any:
    """d['train']['augment']['crop_scale'] for 'train.augment.crop_scale'; MISSING where a part is absent."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return MISSING
        d = d[part]
    return d


def same(a: Any, b: Any) -> bool:
    """Equal values, floats to 1e-9 relative (6.4 == 0.1 * 16384 / 256), lists element by element."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
    return a == b


def effective_lr(job: dict) -> Any:
    """The peak learning rate a job trains with: train.blr x batch / train.lr_batch_ref where blr is set (the
    linear scaling rule, issue 12), else train.lr."""
    blr = lookup(job, "train.blr")
    if blr is not MISSING and blr is not None:
        return blr * job["train"]["batch_size"] / lookup(job, "train.lr_batch_ref")
    return lookup(job, "train.lr")


def preset_jobs(config: dict) -> Iterator[tuple[str, dict, dict]]:
    """(kind, wildcards, resolved job config as a dict) of every job in the preset's grid."""
    for question in active_questions(config):
        for kind in KINDS[question]:
            for wc in grid(config, kind):
                yield kind, wc, to_dict(RESOLVERS[kind](config, **wc))


def selects(stage: dict, kind: str, wildcards: dict) -> bool:
    for sel in stage.get("jobs", []):
        if sel["kind"] == kind and matches(sel.get("where"), wildcards):
            return True
    return False


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)  # each names the preset, stage, job, key and the fix
    pending: dict[str, set[str]] = field(default_factory=dict)  # key -> stages: keys this branch lacks
    checked: int = 0  # (job, ingredient) comparisons made
    stages_seen: set[str] = field(default_factory=set)
    used: dict[tuple[str, str], dict] = field(default_factory=dict)  # (stage, ingredient label) -> the deviation


def matches(where: dict, wildcards: dict) -> bool:
    return all(str(wildcards.get(k)) in [str(v) for v in vs] for k, vs in (where or {}).items())


def ingredient_for(ing: dict, wildcards: dict) -> dict:
    """The ingredient as it applies to one job: an `except` entry whose `where` names the job's wildcard values
    replaces its `vitablate` and `deviation` (e.g. the identity mixer's pooling)."""
    for exc in ing.get("except", []):
        if matches(exc["where"], wildcards):
            return {**{k: v for k, v in ing.items() if k != "except"}, **{k: v for k, v in exc.items() if k != "where"}}
    return ing


def check_job(stage_name: str, stage: dict, job: dict, where: str, report: Report, pending_keys: set[str],
              wildcards: dict | None = None) -> None:
    for name, raw in stage["ingredients"].items():
        ing = ingredient_for(raw, wildcards or {})
        key, check, paper = ing.get("key"), ing.get("check", "value"), ing.get("paper")
        deviation = ing.get("deviation")
        at = f"{where} {stage_name}.{name}"
        if deviation:
            label = name
            if ing is not raw:  # an `except` entry: name the jobs it covers
                exc = next(e for e in raw["except"] if matches(e["where"], wildcards or {}))
                label += " (" + "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in exc["where"].items()) + ")"
            report.used.setdefault((stage_name, label), ing)
        if key is None:
            if not deviation:
                report.problems.append(f"{at}: no vitablate key and no `deviation` saying why")
            continue
        if check == "none":
            continue
        value = effective_lr(job) if check == "effective_lr" else lookup(job, key)
        if value is MISSING:
            if key in pending_keys:
                report.pending.setdefault(key, set()).add(stage_name)
            else:
                report.problems.append(f"{at}: {key} does not exist in the resolved job config; fix the table's "
                                       "key or add the config key")
            continue
        report.checked += 1
        if deviation:
            if same(value, paper):
                report.problems.append(f"{at}: {key} is now the paper's {paper!r}; remove the stale deviation "
                                       f"({deviation!r}) from the table")
            elif "vitablate" in ing and not same(value, ing["vitablate"]):
                report.problems.append(f"{at}: {key} is {value!r}, the table's deviation says {ing['vitablate']!r}; "
                                       "update the table's `vitablate` (and the reason) or the preset")
        elif not same(value, paper):
            report.problems.append(f"{at}: {key} is {value!r}, the paper's is {paper!r} ({ing.get('source')}); set "
                                   "it in the preset, or list a `deviation` (with `vitablate`) in the table")


def check_preset(table: dict, preset: str, config: dict | None = None, pending_keys: Iterable[str] = ()) -> Report:
    config = load_preset(preset) if config is None else config
    report = Report()
    pending_keys = set(pending_keys)
    for kind, wc, job in preset_jobs(config):
        for stage_name, stage in table["stages"].items():
            if selects(stage, kind, wc):
                report.stages_seen.add(stage_name)
                where = f"{preset} {kind}({', '.join(f'{k}={v}' for k, v in wc.items())})"
                check_job(stage_name, stage, job, where, report, pending_keys, wc)
    return report


def _fmt(v: Any) -> str:
    return "none" if v is None else str(v)


def header_block(table: dict, report: Report) -> str:
    """The preset header's generated block: one comment line (wrapped) per deviation its jobs take, in table order."""
    order = {s: i for i, s in enumerate(table["stages"])}
    lines = [BEGIN, BEGIN2]
    for (stage, name), ing in sorted(report.used.items(), key=lambda kv: order[kv[0][0]]):
        here = f", here {_fmt(ing['vitablate'])}" if "vitablate" in ing else ""
        text = f"{stage} {name}: paper {_fmt(ing['paper'])}{here}; {ing['deviation']}"
        lines += textwrap.wrap(text, width=110, initial_indent="#   ", subsequent_indent="#     ")
    lines.append(END)
    return "\n".join(lines) + "\n"


DOC = ROOT / "docs" / "recipes.md"
DOC_INTRO = """# The papers' recipes

Generated from `config/presets/reference_recipes.yaml` by `python -m vitablate.recipes --write-doc`
(`tests/test_recipes.py` checks that this file is current). For each paper stage: each ingredient, the
paper's value, the reference file it was read from, and the vitablate key that sets it (a dotted path in a
job's resolved config; `pretext.*` keys are set under `pretext.objective` in the workflow config, `model.*`
and `train.*` under the question's `model`/recipe sections and their `by_mixer`, `by_pretext` and
`by_method` overrides). A deviation names what the imagenet-paper preset runs instead and why;
`tests/test_recipes.py` resolves every job of the presets the table lists and fails on any other
difference, and each preset's header carries the generated list of the deviations its jobs take.
What each component's code follows: docs/fidelity.md.
"""


def _cell(v: Any) -> str:
    return _fmt(v).replace("|", "\\|")


def markdown(table: dict) -> str:
    out = [DOC_INTRO]
    for name, stage in table["stages"].items():
        out.append(f"\n## {stage['title']} (`{name}`)\n\nReference: {stage['reference']}.\n")
        out.append("| ingredient | paper | source | vitablate key | deviation |")
        out.append("|---|---|---|---|---|")
        for ing_name, ing in stage["ingredients"].items():
            notes = []
            if ing.get("deviation"):
                notes.append(f"here {_cell(ing.get('vitablate', '-'))}: {_cell(ing['deviation'])}")
            for exc in ing.get("except", []):
                where = "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in exc["where"].items())
                notes.append(f"{where}: here {_cell(exc.get('vitablate', '-'))}: {_cell(exc['deviation'])}")
            if ing.get("check") == "none":
                notes.append("documented, checked through lr" if ing_name in ("blr", "lr_batch_ref") else "not checked")
            key = f"`{ing['key']}`" if ing.get("key") else "(none)"
            out.append(f"| {ing_name} | {_cell(ing['paper'])} | {_cell(ing['source'])} | {key} | {'; '.join(notes)} |")
    return "\n".join(out) + "\n"


def current_block(text: str) -> str | None:
    start = text.find(BEGIN)
    if start < 0:
        return None
    end = text.index(END, start) + len(END) + 1
    return text[start:end]


def write_header(preset: str, block: str) -> bool:
    """Replace (or add, after the first comment paragraph) the preset's generated block; True if it changed."""
    path = PRESET_DIR / f"{preset}.yaml"
    text = path.read_text()
    old = current_block(text)
    if old is not None:
        new = text.replace(old, block)
    else:
        lines = text.splitlines(keepends=True)
        i = next(i for i, line in enumerate(lines) if not line.startswith("#"))
        new = "".join(lines[:i]) + "#\n" + block + "".join(lines[i:])
    if new != text:
        write_text(str(path), new)  # atomic: an interrupted rewrite leaves the preset as it was
    return new != text


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-headers", action="store_true", help="rewrite each preset's generated deviation block")
    ap.add_argument("--write-doc", action="store_true", help="rewrite docs/recipes.md from the table")
    args = ap.parse_args(argv)
    table = load_table()
    if args.write_doc:
        write_text(str(DOC), markdown(table))
        log.info("wrote %s", DOC)
    bad = 0
    for preset in table["presets"]:
        report = check_preset(table, preset)
        block = header_block(table, report)
        if args.write_headers and write_header(preset, block):
            log.info("%s: header block rewritten", preset)
        for p in report.problems:
            log.error("%s", p)
        for key, stages in sorted(report.pending.items()):
            log.warning("%s: %s does not exist yet (stages %s)", preset, key, ", ".join(sorted(stages)))
        log.info("%s: %d comparisons, %d problems, stages %s", preset, report.checked, len(report.problems),
                 ", ".join(sorted(report.stages_seen)))
        bad += len(report.problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
