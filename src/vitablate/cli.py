"""The `vitablate` command: small helpers around the workflow.

  vitablate list                      mixers, model variants, datasets, job kinds
  vitablate job CONFIG.json [--ray]   run one job from a resolved config (written by the
                                      workflow next to every result) in this process, or on Ray
  vitablate check [CONFIG.yaml]       validate a workflow config without running anything
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _list(_: argparse.Namespace) -> int:
    from .data import DATASETS
    from .jobs import JOBS
    from .analysis.registry import EVALS, METRICS
    from .methods import TRANSFER_METHODS
    from .models import MIXERS, VARIANTS
    from .objectives.registry import PRETEXTS

    print("mixers:   ", ", ".join(MIXERS))
    print("variants: ", ", ".join(VARIANTS))
    print("datasets: ", ", ".join(DATASETS))
    print("jobs:     ", ", ".join(JOBS))
    print("pretexts: ", ", ".join(PRETEXTS))
    print("evals:    ", ", ".join(EVALS))
    print("methods:  ", ", ".join(TRANSFER_METHODS))
    print("metrics:  ", ", ".join(METRICS))
    return 0


def _job(args: argparse.Namespace) -> int:
    from .config import load_job_config

    cfg = load_job_config(args.config)
    record_path = args.record or os.path.join(cfg.output_dir, "record.json")
    if args.ray:
        from .execution import run_job, start_session, stop_session
        from .tracking import default_uri

        start_session(dispatcher=False)  # this process submits the job itself
        try:
            record = run_job(cfg, record_path, uri=default_uri(args.results_dir))
        finally:
            stop_session()
    else:
        from .io import write_json
        from .jobs import run

        record = run(cfg, lambda epoch, m: print(json.dumps(m), flush=True))
        write_json(record_path, record)
    print(json.dumps({k: v for k, v in record.items() if k.startswith("top1")}))
    return 0


# The workflow's schema in a source checkout (`pip install -e .`): <repository>/config/schema.yaml.
REPO_SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "config", "schema.yaml")


def workflow_schema(config_path: str) -> str:
    """The schema `vitablate check` validates against: the repository's config/schema.yaml (the one the
    Snakefile uses), wherever the config lives; for an installed copy without the repository, a
    schema.yaml beside the config or in its parent folder (a copied workflow's config/)."""
    here = os.path.dirname(os.path.abspath(config_path))
    beside = [os.path.join(here, "schema.yaml"), os.path.join(os.path.dirname(here), "schema.yaml")]
    for candidate in (REPO_SCHEMA, *beside):
        if os.path.isfile(candidate):
            return os.path.normpath(candidate)
    raise OSError(f"no config/schema.yaml found (looked in the vitablate repository, {os.path.normpath(REPO_SCHEMA)}, "
                  "and beside the config); pass --schema PATH")


def _check(args: argparse.Namespace) -> int:
    import yaml
    from snakemake.utils import validate

    from .workflow import check_config, check_raw_config

    with open(args.config) as f:
        config = yaml.safe_load(f)
    check_raw_config(config, args.config)
    validate(config, args.schema or workflow_schema(args.config))
    check_config(config)
    print(f"{args.config}: ok")
    return 0


def _check_cmd(args: argparse.Namespace) -> int:
    """`vitablate check`: a bad config is one line naming the key, not a traceback."""
    from snakemake.exceptions import WorkflowError

    from .config import ConfigError

    try:
        return _check(args)
    except (ConfigError, WorkflowError, OSError) as e:
        print(f"{args.config}: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="what can be named in a config").set_defaults(fn=_list)
    p = sub.add_parser("job", help="run one job from its resolved config")
    p.add_argument("config")
    p.add_argument("--record", help="where to write the run record (default: <output_dir>/record.json)")
    p.add_argument("--ray", action="store_true", help="run as a Ray task with MLflow tracking")
    p.add_argument("--results-dir", default="results")
    p.set_defaults(fn=_job)
    p = sub.add_parser("check", help="validate a workflow config")
    p.add_argument("config", nargs="?", default="config/config.yaml")
    p.add_argument("--schema", help="default: the repository's config/schema.yaml (the Snakefile's)")
    p.set_defaults(fn=_check_cmd)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
