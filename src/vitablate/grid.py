"""Grid expansion: the wildcard values of every job of a rule kind, and the paths the DAG is built from.

What the Snakefile and rules/*.smk need before any job runs: the configured questions, the
results and reports directories, each question's grid (seeds narrowed by `seeds_by`), the
transfer layer ids, and which files a job reads (a teacher's encoder, an ensemble's members,
or, without a shared filesystem, the producers' records). Job configs: `vitablate.resolve`.
"""

from __future__ import annotations

import os
from typing import Any

from .config import ConfigError
from .methods import LAYERED, SHIFT_READS_TEACHER

QUESTIONS = ("architecture", "pretext", "transfer")
LAYERED_METHODS = LAYERED  # the methods the `layers` axis applies to: vitablate.methods.TRANSFER_METHODS, layered


def active_questions(config: dict) -> list[str]:
    return [q for q in QUESTIONS if config.get(q)]


def _path_setting(config: dict, key: str, default: str) -> str:
    """A directory setting, normalised: 'results/' and 'results' name the same outputs (the rules'
    paths are built from it, so a trailing slash would otherwise plan none of the existing files)."""
    value = config.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} is {value!r}; give a directory path (default: {default!r})")
    return os.path.normpath(value.strip())


def results_dir(config: dict) -> str:
    return _path_setting(config, "results_dir", "results")


def reports_dir(config: dict) -> str:
    """Generated reports: under the git-ignored results directory by default; the committed example
    reports live in examples/, where no rule writes."""
    return _path_setting(config, "reports_dir", "results/reports")



# --- checkpoints handed between jobs ------------------------------------------------------
# With a shared filesystem (execution.shared_fs, the default) a consumer reads the producer's
# checkpoint file, which is a declared output and input. Without one, the checkpoint stays on
# the producer's node and is uploaded to the MLflow artifact store; the consumer's input is the
# producer's record.json (which names its MLflow run), and the job downloads the checkpoint.

def shared_fs(config: dict) -> bool:
    return bool((config.get("execution") or {}).get("shared_fs", True))


def producer_record(checkpoint: str) -> str:
    """The record of the job that writes `checkpoint` (encoder.pt, model.pt): beside it in its output_dir."""
    return os.path.join(os.path.dirname(checkpoint), "record.json")


def checkpoint_input(config: dict, checkpoint: str) -> str:
    """What a consumer of `checkpoint` (a path or a wildcard pattern) declares as its input."""
    return checkpoint if shared_fs(config) else producer_record(checkpoint)



# --- grids --------------------------------------------------------------------------------

def pretext_ids(section: dict) -> list[str]:
    """Grid values of `pretext`: names, with `hybrid` expanded over its lambdas (hybrid_0.2)."""
    out = []
    for name in section.get("pretexts", []):
        if name == "hybrid":
            out += [f"hybrid_{lam:g}" for lam in section.get("hybrid_lambdas", [0.2])]
        else:
            out.append(name)
    return out


def parse_pretext(pretext_id: str) -> tuple[str, dict]:
    """'hybrid_0.2' -> ('hybrid', {'lam': 0.2}); 'moco' -> ('moco', {})."""
    if pretext_id.startswith("hybrid_"):
        return "hybrid", {"lam": float(pretext_id.split("_", 1)[1])}
    return pretext_id, {}


def seeds_for(section: dict, *values: str) -> list:
    """The seeds of one grid cell: the question's `seeds`, narrowed by every `seeds_by.<value>` that names
    one of the cell's axis values (a mixer; a pretext; a teacher, method or layer set). Headline arms keep
    every seed; axes beyond the headline can run fewer."""
    seeds = list(section.get("seeds", []))
    by = section.get("seeds_by") or {}
    for value in values:
        if value in by:
            seeds = [k for k in seeds if k in by[value]]
    return seeds


def seeds_by_keys(config: dict, question: str) -> set[str]:
    """The axis values `<question>.seeds_by` may name."""
    s = config.get(question) or {}
    if question == "architecture":
        return set(s.get("mixers", []))
    if question == "pretext":
        return set(pretext_ids(s)) | set(s.get("pretexts", []))
    return set(s.get("teachers", {})) | set(s.get("methods", [])) | {layers_spec(layers_id(v))
                                                                    for v in s.get("layers", ["all"])}


def grid(config: dict, kind: str) -> list[dict[str, Any]]:
    """Wildcard values of every job of a rule kind: architecture | architecture_shift | pretrain | pretext_eval |
    pretext_shift | analysis | transfer | shift. The shift kinds are the jobs of the kind before them whose model
    is then tested under distribution shift by a job of its own: Q1's classifiers and Q2's evaluations on a
    dataset with shifted sets of its own (`has_dataset_shift_sets`), Q3's students on one with any
    (`has_shift_sets`: transfer.shift corruptions too)."""
    if kind in ("architecture_shift", "pretext_shift"):
        tested = {"architecture_shift": "architecture", "pretext_shift": "pretext_eval"}[kind]
        return [wc for wc in grid(config, tested) if has_dataset_shift_sets(config, wc["dataset"])]
    if kind == "architecture":
        s = config.get("architecture") or {}
        return [dict(dataset=d, mixer=m, seed=k) for d in s.get("datasets", [])
                for m in s.get("mixers", []) for k in seeds_for(s, m)]
    s = config.get("pretext") or {}
    base = [dict(dataset=d, pretext=p, seed=k) for d in s.get("datasets", [])
            for p in pretext_ids(s) for k in seeds_for(s, p, parse_pretext(p)[0])]
    if kind in ("pretrain", "analysis"):
        return base
    if kind == "pretext_eval":
        return [dict(b, eval=e) for b in base for e in s.get("evals", [])]
    if kind == "transfer":
        return transfer_grid(config)
    if kind == "shift":
        return [wc for wc in transfer_grid(config) if has_shift_sets(config, wc["dataset"])]
    raise ValueError(f"unknown grid kind {kind!r}")


def layers_id(spec: str) -> str:
    """Path-safe form of a layers spec: 'first:2' -> 'first2', '0,3' -> 'l0-3', 'all' -> 'all'."""
    spec = str(spec).replace(" ", "")
    if spec == "all":
        return "all"
    if spec.startswith(("first:", "last:")):
        return spec.replace(":", "")
    return "l" + spec.replace(",", "-")


def layers_spec(layer_id: str) -> str:
    for prefix in ("first", "last"):
        if layer_id.startswith(prefix):
            return f"{prefix}:{layer_id[len(prefix):]}"
    return "all" if layer_id == "all" else layer_id[1:].replace("-", ",")


def transfer_grid(config: dict) -> list[dict[str, Any]]:
    """(dataset, teacher, method, layers, seed) of every transfer job; scratch needs no teacher."""
    s = config.get("transfer") or {}
    methods, layer_ids = s.get("methods", []), [layers_id(v) for v in s.get("layers", ["all"])]
    out = []
    for d in s.get("datasets", []):
        if "scratch" in methods:
            out += [dict(dataset=d, teacher="none", method="scratch", layers="all", seed=seed)
                    for seed in seeds_for(s, "scratch")]
        for teacher in s.get("teachers", {}):
            for m in methods:
                if m == "scratch":
                    continue
                for lid in (layer_ids if m in LAYERED_METHODS else ["all"]):
                    narrowing = (teacher, m, layers_spec(lid)) if m in LAYERED_METHODS else (teacher, m)
                    out += [dict(dataset=d, teacher=teacher, method=m, layers=lid, seed=seed)
                            for seed in seeds_for(s, *narrowing)]
    return out


def transfer_dir(config: dict, dataset: str, teacher: str, method: str, layers: str, seed) -> str:
    return os.path.join(results_dir(config), "transfer", dataset, teacher, method, layers, f"seed{seed}")


# datasets whose bundle brings its own shifted test set (shapes: the cue-conflict images)
BUILTIN_SHIFT_SETS = {"shapes": ("cue_conflict",)}


def shift_settings(config: dict) -> dict:
    """`transfer.shift` (corruptions, severity): settings only the shift jobs read."""
    return dict((config.get("transfer") or {}).get("shift") or {})


def dataset_entry_data(config: dict, dataset: str) -> dict:
    """A dataset's `data` settings as its jobs read them (name and data_root filled in)."""
    entry = (config.get("datasets") or {}).get(dataset) or {}
    return {"name": dataset, "root": config.get("data_root", "data"), **(entry.get("data") or {})}


def has_dataset_shift_sets(config: dict, dataset: str) -> bool:
    """Whether `dataset` has shifted test sets of its own: an extra_test_dirs entry, or a set it brings (shapes).
    A Q1 classifier or Q2 evaluation on it then gets a shift job (transfer.shift's corruptions are Q3's only)."""
    data = dataset_entry_data(config, dataset)
    return bool(data.get("extra_test_dirs") or data["name"] in BUILTIN_SHIFT_SETS)


def has_shift_sets(config: dict, dataset: str) -> bool:
    """Whether a transfer job on `dataset` has a shifted test set to be evaluated on: a corruption under
    transfer.shift, an extra_test_dirs entry of the dataset, or a set the dataset brings (shapes)."""
    return bool(shift_settings(config).get("corruptions")) or has_dataset_shift_sets(config, dataset)


def teacher_checkpoint(config: dict, dataset: str, teacher: str, seed) -> str | None:
    """The file a teacher is read from (None for timm: teachers), for DAG inputs and specs."""
    spec = (config.get("transfer") or {}).get("teachers", {}).get(teacher)
    if spec is None:
        raise ConfigError(f"unknown teacher {teacher!r}; transfer.teachers has {sorted(config['transfer']['teachers'])}")
    if spec.startswith("pretext:"):
        name = spec[len("pretext:"):]
        seeds = seeds_for(config.get("pretext") or {}, name, parse_pretext(name)[0]) or [0]
        tseed = int(seed) if int(seed) in seeds else seeds[0]  # seed-matched teacher where one exists
        return os.path.join(pretext_dir(config, dataset, spec[len("pretext:"):], tseed), "encoder.pt")
    if spec.startswith("file:"):
        return spec[len("file:"):]
    return None


def reference_layers(config: dict) -> str:
    """The transfer layer set the answer, the tests against scratch, the paper column and the ensemble use:
    the first `transfer.layers` value (the imagenet preset's `first:21`, what the released code transfers)."""
    return layers_spec(layers_id(((config.get("transfer") or {}).get("layers") or ["all"])[0]))


def ensemble_members(config: dict, dataset: str, teacher: str, seed) -> list[str]:
    """Output dirs of an ensemble's members: the student distilled over the first `layers` value of the
    grid (the reference distils all but the last layers) and the fine-tuned teacher."""
    first = layers_id(((config.get("transfer") or {}).get("layers") or ["all"])[0])
    return [transfer_dir(config, dataset, teacher, "attn_distill", first, seed),
            transfer_dir(config, dataset, teacher, "finetune", "all", seed)]


def transfer_inputs(config: dict, dataset: str, teacher: str, method: str, layers: str, seed) -> list[str]:
    """What a transfer job reads: its teacher's checkpoint; an ensemble, its two members' models."""
    if method == "scratch":
        return []
    if method == "ensemble":
        return [os.path.join(d, "record.json") for d in ensemble_members(config, dataset, teacher, seed)]
    path = teacher_checkpoint(config, dataset, teacher, seed)
    if path and config["transfer"]["teachers"][teacher].startswith("pretext:"):
        return [checkpoint_input(config, path)]  # produced in this workflow
    return [path] if path else []  # file: teachers are the user's; timm: ones are downloaded


# SHIFT_READS_TEACHER (vitablate.methods: teacher_at_test or reads_members): methods whose evaluation runs the
# teacher (its attention at test time; the probe's frozen features), or the members (ensemble): their shift jobs
# read those too


def shift_inputs(config: dict, dataset: str, teacher: str, method: str, layers: str, seed) -> list[str]:
    """What a shift job reads: the transfer job's record (its model.pt, or probe.pt, lies beside it) and, where the
    evaluated model runs its teacher or members, what the transfer job itself read."""
    own = os.path.join(transfer_dir(config, dataset, teacher, method, layers, seed), "record.json")
    extra = transfer_inputs(config, dataset, teacher, method, layers, seed) if method in SHIFT_READS_TEACHER else []
    return [own] + [p for p in extra if p != own]



def pretext_dir(config: dict, dataset: str, pretext: str, seed) -> str:
    return os.path.join(results_dir(config), "pretext", dataset, pretext, f"seed{seed}")


def architecture_dir(config: dict, dataset: str, mixer: str, seed) -> str:
    return os.path.join(results_dir(config), "architecture", dataset, mixer, f"seed{seed}")


def architecture_shift_inputs(config: dict, dataset: str, mixer: str, seed) -> list[str]:
    """What a Q1 shift job reads: the classifier's record (its model.pt lies beside it)."""
    return [os.path.join(architecture_dir(config, dataset, mixer, seed), "record.json")]


# Q2 evaluations whose shift job runs the frozen pre-trained encoder (a linear probe on its features, k-NN among
# them); a fine-tuning evaluation's shift job reads the fine-tuned model.pt alone
FROZEN_EVALS = ("linear_probe", "knn")


def pretext_shift_inputs(config: dict, dataset: str, pretext: str, seed, eval: str) -> list[str]:
    """What a Q2 shift job reads: the evaluation's record (a fine-tuning's model.pt, a linear probe's probe.pt lie
    beside it) and, for a frozen evaluation, the pre-trained encoder (a checkpoint, or its producer's record)."""
    own = os.path.join(pretext_dir(config, dataset, pretext, seed), eval, "record.json")
    encoder = os.path.join(pretext_dir(config, dataset, pretext, seed), "encoder.pt")
    return [own] + ([checkpoint_input(config, encoder)] if eval in FROZEN_EVALS else [])



def grid_size(config: dict) -> int:
    """Jobs in the whole grid (every question's training, evaluation, shift and analysis jobs)."""
    kinds = {"architecture": ["architecture", "architecture_shift"],
             "pretext": ["pretrain", "pretext_eval", "pretext_shift", "analysis"], "transfer": ["transfer", "shift"]}
    return sum(len(grid(config, k)) for q in active_questions(config) for k in kinds[q])

