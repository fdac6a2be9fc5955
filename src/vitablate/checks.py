"""Checks before any job runs: the raw config, paths, teachers, datasets on disk, the results directory.

`check_config` is the Snakefile's cross-field check (after the JSON schema); it also resolves
one job of every kind (`vitablate.resolve`), so type errors surface before any job starts.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from .config import VARIANTS, ConfigError, deep_merge
from .grid import (
    QUESTIONS,
    _path_setting,
    active_questions,
    grid,
    grid_size,
    layers_id,
    layers_spec,
    pretext_ids,
    reports_dir,
    results_dir,
    seeds_by_keys,
    shared_fs,
    transfer_grid,
)
from .resolve import RESOLVERS

log = logging.getLogger(__name__)

def _check_ensemble_members(config: dict) -> None:
    """With seeds_by, an ensemble's seed must also be a seed of both its members."""
    jobs = {(j["dataset"], j["teacher"], j["method"], j["layers"], j["seed"]) for j in transfer_grid(config)}
    ref = layers_id(((config.get("transfer") or {}).get("layers") or ["all"])[0])
    for d, teacher, method, _, seed in sorted(jobs, key=str):
        if method != "ensemble":
            continue
        for m, lid in (("attn_distill", ref), ("finetune", "all")):
            if (d, teacher, m, lid, seed) not in jobs:
                raise ConfigError(f"transfer: the ensemble of teacher {teacher!r}, seed {seed}, needs {m} "
                                  f"({layers_spec(lid)}) at that seed, which transfer.seeds_by leaves out; give the "
                                  "ensemble no more seeds than its members (seeds_by.ensemble)")


def check_tracking(config: dict, uri: str) -> None:
    """Without a shared filesystem, every node must reach the tracking server and its artifact store."""
    if shared_fs(config) or uri.startswith(("http://", "https://")):
        return
    raise ConfigError(
        f"execution.shared_fs is false, so checkpoints travel through the MLflow artifact store, which every node "
        f"must reach, but MLflow logs to {uri}, a store on this machine only. Start a tracking server that serves "
        "artifacts (tools/mlflow-server.sh start <dir> <port>) and set MLFLOW_TRACKING_URI=http://<host>:<port>, "
        "or set execution.shared_fs: true if every node sees the results directory"
    )



MAX_CONFIG_VALUES = 1_000_000  # values in the config once YAML aliases are expanded
MAX_SEED = 2**31 - 1  # numpy / torch generators take 32-bit seeds
LARGE_GRID_JOBS = 5_000  # more jobs than this in one run is warned about (a typo such as range(20000) of seeds)


def check_raw_config(config: Any, source: str = "the config") -> None:
    """Checks that must come before the JSON schema's: a mapping at the top, a bounded size once YAML
    aliases are expanded (an alias bomb would make the schema check, and its error message, explode),
    and finite numbers (`.nan` and `.inf` pass the schema's bounds)."""
    if not isinstance(config, dict):
        what = "empty" if config is None else f"a YAML {type(config).__name__}"
        raise ConfigError(f"{source} is {what}, not a mapping of keys (results_dir:, execution:, architecture:, "
                          "...); see config/config.yaml")
    sizes: dict[int, int] = {}

    def size(value: Any) -> int:  # expanded size, each shared (aliased) node counted once per use
        if id(value) in sizes:
            return sizes[id(value)]
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        sizes[id(value)] = n = 1 + sum(size(v) for v in children)
        return n

    total = size(config)
    if total > MAX_CONFIG_VALUES:
        raise ConfigError(f"{source} expands to {total:,} values (more than {MAX_CONFIG_VALUES:,}): YAML aliases "
                          "(&name / *name) nested inside each other multiply; write the values out")

    def walk(value: Any, key: str, seen: set) -> None:
        if id(value) in seen:
            return
        if isinstance(value, (dict, list)):
            seen.add(id(value))
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} is {value}; give a finite number")
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k), seen)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]", seen)

    walk(config, "", set())




def check_paths(config: dict) -> None:
    """Path settings: not empty, and reports never written where the committed examples live."""
    results_dir(config), reports_dir(config)
    if "data_root" in config:
        _path_setting(config, "data_root", "data")
    reports = os.path.abspath(reports_dir(config))
    examples = os.path.abspath("examples")
    if reports == examples or reports.startswith(examples + os.sep):
        raise ConfigError(f"reports_dir {config['reports_dir']!r} is inside examples/, which holds committed "
                          "example reports that a run must never overwrite; use results/reports (the default)")


def check_teacher_files(config: dict) -> None:
    """Every file: teacher a configured transfer job reads must exist before any job starts (otherwise
    Snakemake would see a missing input and plan nothing for it, leaving older reports in place)."""
    s = config.get("transfer") or {}
    if not s or not [m for m in s.get("methods", []) if m != "scratch"]:
        return
    for teacher, spec in (s.get("teachers") or {}).items():
        if isinstance(spec, str) and spec.startswith("file:") and not os.path.isfile(spec[len("file:"):]):
            raise ConfigError(f"transfer.teachers.{teacher} is {spec!r}, but {spec[len('file:'):]!r} is not a file "
                              "here; fix the path (relative paths start at the workflow directory) or remove the "
                              "teacher")


def check_config(config: dict) -> None:
    """Cross-field checks the JSON schema cannot express; raises with the key and the fix.

    Also resolves one job of every kind, so that type errors surface before any job runs.
    """
    check_raw_config(config)
    check_paths(config)
    check_teacher_files(config)
    datasets = config.get("datasets", {})
    for q in QUESTIONS:
        section = config.get(q)
        if not section:
            continue
        for name in section.get("datasets", []):
            if name not in datasets:
                raise ConfigError(
                    f"{q}.datasets names {name!r}, which has no entry under `datasets:`; "
                    f"add one or use one of {sorted(datasets)}"
                )
        seeds = section.get("seeds", [])
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{q}.seeds has duplicates: {seeds}")
        too_big = [k for k in seeds if isinstance(k, int) and not 0 <= k <= MAX_SEED]
        if too_big:
            raise ConfigError(f"{q}.seeds has {too_big}; seeds must lie in 0..{MAX_SEED} (2^31 - 1)")
        for key in section.get("seeds_by") or {}:
            if key not in seeds_by_keys(config, q):  # e.g. a mixer taken out of the grid: harmless, but say so
                log.warning("%s.seeds_by.%s names no value of this question's grid (%s); it narrows nothing",
                            q, key, sorted(seeds_by_keys(config, q)))
    _check_ensemble_members(config)
    for teacher, spec in ((config.get("transfer") or {}).get("teachers") or {}).items():
        if spec.startswith("pretext:"):
            name = spec[len("pretext:"):]
            pretrained = pretext_ids(config.get("pretext") or {})  # hybrid expanded: hybrid_0.2, ...
            if name not in pretrained:
                raise ConfigError(f"transfer.teachers.{teacher} is {spec!r}, but the pretext grid pre-trains only "
                                  f"{pretrained}; add it there (pretext.pretexts, pretext.hybrid_lambdas) "
                                  "or use file:<path> / timm:<name>")
        elif not spec.startswith(("file:", "timm:")):
            raise ConfigError(f"transfer.teachers.{teacher} is {spec!r}; use pretext:<name>, file:<path> or timm:<name>")
    for where, section in [(q, config.get(q) or {}) for q in QUESTIONS] + \
            [(f"datasets.{n}", e) for n, e in datasets.items()]:
        value = (section.get("execution") or {}).get("shared_fs")
        if value is not None and value != shared_fs(config):
            raise ConfigError(f"{where}.execution.shared_fs is {value} but execution.shared_fs is {shared_fs(config)}; "
                              "whether the nodes share a filesystem is workflow-wide: set it only under the "
                              "top-level `execution`")
    for name, entry in datasets.items():
        variant = (entry.get("model") or {}).get("variant")
        if variant is not None and variant not in VARIANTS:
            raise ConfigError(f"datasets.{name}.model.variant {variant!r} is unknown; choose one of {sorted(VARIANTS)}")
    for kind in RESOLVERS:
        for wc in grid(config, kind)[:1]:
            RESOLVERS[kind](config, **wc)
    jobs = grid_size(config)
    if jobs > LARGE_GRID_JOBS:
        logging.getLogger("vitablate").warning(
            f"[vitablate] warning: this config's grid has {jobs:,} jobs (more than {LARGE_GRID_JOBS:,}); check the "
            "seeds, datasets and methods lists (`snakemake -n` lists the jobs)")


def data_paths(config: dict) -> dict[str, list[str]]:
    """The on-disk paths each dataset of an active question reads (bundled datasets read none)."""
    from .data.files import FOLDER_LAYOUTS

    used = {d for q in active_questions(config) for d in config[q].get("datasets", [])}
    out: dict[str, list[str]] = {}
    for name in sorted(used):
        entry = (config.get("datasets") or {}).get(name) or {}
        data = deep_merge({"name": name, "root": config.get("data_root", "data")}, entry.get("data") or {})
        paths = [os.path.join(data["root"], sub) for sub in FOLDER_LAYOUTS.get(name, ())]
        out[name] = paths + list((data.get("extra_test_dirs") or {}).values())
    return out


def check_data(config: dict, remote: bool = False) -> list[str]:
    """Before the first job: every dataset path must exist here, or the jobs would each fail on it.

    With `remote` (jobs run on a Ray cluster at RAY_ADDRESS, which may mount the data where this
    machine does not) missing paths are returned as warnings instead of raising.
    """
    from .data.files import FOLDER_LAYOUTS, require_class_dirs

    missing = [f"{name}: {p}" for name, paths in data_paths(config).items() for p in paths if not os.path.isdir(p)]
    if missing and not remote:
        raise ConfigError(f"dataset paths not found: {missing}; put the data there (see README, Datasets) or "
                          "point data_root / datasets.<name>.data.root / extra_test_dirs at it")
    for name, paths in data_paths(config).items():  # image folders: every class folder holds images
        folders = paths if name == "imagefolder" else paths[len(FOLDER_LAYOUTS.get(name, ())):]
        for path in folders:
            if os.path.isdir(path):
                try:
                    require_class_dirs(path, "<dir>/<class>/<image>")
                except FileNotFoundError as e:
                    raise ConfigError(f"datasets.{name}: {e}") from None
    return missing + _check_idx_files(config, remote)


def _check_idx_files(config: dict, remote: bool) -> list[str]:
    """fashion_mnist: its four IDX files must be found and whole (the error names the path and the fix)."""
    from .data.files import find_fashion_mnist

    if "fashion_mnist" not in data_paths(config):
        return []
    entry = (config.get("datasets") or {}).get("fashion_mnist") or {}
    root = deep_merge({"root": config.get("data_root", "data")}, entry.get("data") or {})["root"]
    try:
        find_fashion_mnist(root)
    except (FileNotFoundError, ValueError) as e:
        if not remote:
            raise ConfigError(str(e)) from None
        return [str(e)]
    return []


MIN_FREE_MB = 200  # results_dir must have this much room before a run starts (checkpoints check again)


def check_results_dir(path: str, min_free_mb: float = MIN_FREE_MB) -> None:
    """Before any job: results_dir can be written (a real file is created and removed) and has room."""
    import shutil
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check"):
            pass
        free_mb = shutil.disk_usage(path).free / 2**20
    except OSError as e:
        raise ConfigError(f"results_dir {os.path.abspath(path)} cannot be written ({e.strerror or e}); fix its "
                          "permissions or mount, or point results_dir elsewhere") from None
    if free_mb < min_free_mb:
        raise ConfigError(f"results_dir {os.path.abspath(path)} has {free_mb:.0f} MB free, less than the "
                          f"{min_free_mb:.0f} MB a run needs to start; free some space or point results_dir elsewhere")

