"""Rule bodies: what rules/scripts/*.py and the Snakefile's handlers run.

Each body reads what its rule declares (snakemake.input, snakemake.output, snakemake.params,
snakemake.log, snakemake.config) and recomputes no path. A job rule's params hold the job's
config less its resources (`vitablate.resolve.job_params`); `run_job_rule` adds them from the
workflow config (`with_resources`) and submits the job (`vitablate.submit`, through the run's
dispatcher when there is one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import traceback

from .config import JobConfig, TrackingConfig, consumed_checkpoints, from_dict, to_dict
from .grid import producer_record
from .io import warning_lines, write_text
from .resolve import with_resources

log = logging.getLogger(__name__)


def checkpoint_sources(cfg: JobConfig) -> dict[str, str]:
    """Without a shared filesystem: {checkpoint path: id of the MLflow run that uploaded it}.

    Read from the producers' records, which are this rule's inputs (so present on the Snakemake
    host). A checkpoint with no record beside it (a file: teacher from outside the workflow) is
    read from its path, which every node must then see. Empty with a shared filesystem.
    """
    if cfg.execution.shared_fs:
        return {}
    out = {}
    for path in consumed_checkpoints(cfg):
        record = producer_record(path)
        if not os.path.exists(record):
            continue
        with open(record) as f:
            run_id = json.load(f).get("mlflow_run_id")
        if not run_id:
            raise RuntimeError(f"{record} names no MLflow run, so {path} cannot be downloaded (execution.shared_fs is "
                               "false): that job ran untracked; re-run it with MLFLOW_TRACKING_URI set")
        out[path] = run_id
    return out



def fetch_host_outputs(record: dict, uri: str) -> None:
    """Without a shared filesystem: bring back the files the report rules read on this host (the
    analysis table, the attention maps), from the job's run; checkpoints stay in the artifact store."""
    from .submit import HOST_OUTPUTS
    from .tracking import fetch_artifact

    for key in HOST_OUTPUTS:
        path = record.get(key)
        if path and not os.path.exists(path):
            fetch_artifact(uri, record["mlflow_run_id"], os.path.basename(path), path)



RUN_STARTED_ENV = "VITABLATE_RUN_STARTED"  # when this workflow run started (the onstart's time.time())


def mark_run_started() -> None:
    """The workflow's onstart: remember when this run started, for `end_orphaned_runs`."""
    import time

    os.environ[RUN_STARTED_ENV] = repr(time.time())


def end_orphaned_runs(results: str, uri: str, message: str, since: float | None = None) -> list[str]:
    """The workflow's onerror: end FAILED the MLflow runs that jobs of this run (markers written since `since`,
    default: `mark_run_started`'s time) left RUNNING without a record, e.g. because the dispatcher died or the disk
    filled; returns their dirs."""
    from .tracking import end_latest, latest_run

    since = float(os.environ.get(RUN_STARTED_ENV, "inf")) if since is None else since
    ended = []
    for root, _, files in os.walk(results):
        if "mlflow_run.json" not in files or "record.json" in files:
            continue
        with contextlib.suppress(OSError, ValueError):
            if os.path.getmtime(os.path.join(root, "mlflow_run.json")) >= since and latest_run(root):
                if end_latest(uri, root, message, "FAILED"):
                    ended.append(root)
    return ended


# --- rule bodies --------------------------------------------------------------------------

@contextlib.contextmanager
def logging_to(path: str | None):
    """Send this process's stdout and stderr, and its `vitablate` log records, to the rule's log file,
    a failure's traceback included."""
    from .submit import job_log

    if not path:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f), job_log(path):
        try:
            yield
        except BaseException:
            traceback.print_exc()  # into the log; Snakemake's own output shows it again
            raise


def run_job_rule(smk) -> None:
    """Body of every job rule's script: run its job on Ray inside an MLflow run.

    The rule's log gets, in order: the submission, the job's own start line (node, GPUs) and one
    progress line per epoch (written by the Ray worker), and the result; the Snakemake console
    gets one line saying where the job ran.
    """
    from . import dispatcher
    from .submit import where

    cfg = with_resources(dict(smk.params.job), smk.config)  # params: what determines the result
    tracking = from_dict(TrackingConfig, dict(smk.config.get("tracking") or {}), "tracking")
    log = smk.log[0] if smk.log else None
    log_start = os.path.getsize(log) if log and os.path.exists(log) else 0
    with logging_to(log):
        logging.getLogger("vitablate.workflow").info(
            f"[vitablate] {cfg.job} {cfg.output_dir} -> Ray (RAY_ADDRESS={os.environ.get('RAY_ADDRESS')})")
        sources = checkpoint_sources(cfg)
        system_metrics_s = tracking.system_metrics_interval_s if tracking.system_metrics else None
        if os.environ.get(dispatcher.ENV):  # the run's one Ray driver (started by the Snakefile's onstart)
            record = dispatcher.submit(to_dict(cfg), smk.output.record, smk.params.mlflow_uri, sources=sources,
                                       log_path=log and os.path.abspath(log), system_metrics_s=system_metrics_s)
        else:
            from .submit import run_job

            record = run_job(cfg, smk.output.record, uri=smk.params.mlflow_uri, sources=sources, log_path=log,
                             system_metrics_s=system_metrics_s)
        if not cfg.execution.shared_fs:
            fetch_host_outputs(record, smk.params.mlflow_uri)
        line = (f"[vitablate] done {cfg.output_dir} {where(record)} top1_test={record.get('top1_test')} "
                f"wall={record.get('wall_s', 0):.1f}s")
        logging.getLogger("vitablate.workflow").info(line)
    print(line, flush=True)  # the console too: which job ran where
    for warning in warning_lines(log, log_start):  # and the job's warnings (its log has them)
        print(warning, flush=True)


def run_architecture_report(smk) -> None:
    from . import aggregate, figures

    with logging_to(smk.log[0] if smk.log else None):
        # each classifier's shift numbers come from its shift job's record (smk.input.shifts)
        records = aggregate.load_records(list(smk.input.records), shift=list(smk.input.shifts))
        table = aggregate.architecture_table(records)
        aggregate.write_table(table, smk.output.csv, smk.output.md)
        figures.plot_architecture(table, smk.output.png)
        by = ["dataset", "mixer"]
        curves = aggregate.load_curves(list(smk.input.records), by, ["train_loss", "top1_val"])
        figures.plot_architecture_curves(aggregate.curve_table(curves, by), smk.output.curves_png)
        log.info(f"\n{table}")


def run_pretext_report(smk) -> None:
    from . import aggregate, figures

    with logging_to(smk.log[0] if smk.log else None):
        # each evaluation's shift numbers come from its shift job's record (smk.input.shifts)
        evals = aggregate.load_records(list(smk.input.evals), shift=list(smk.input.shifts))
        table = aggregate.pretext_table(evals)
        aggregate.write_table(table, smk.output.csv, smk.output.md)
        figures.plot_pretext(table, smk.output.png)
        rep = aggregate.representation_table(list(smk.input.analyses))
        aggregate.write_table(rep.filter(~rep["metric"].is_in(["layer_probe_top1"])), smk.output.rep_csv,
                              smk.output.rep_md)
        aggregate.write_table(aggregate.layer_probe_table(rep), smk.output.probe_csv, smk.output.probe_md)
        figures.plot_representation(rep, smk.output.rep_png)
        bias = aggregate.shape_bias_table(evals)
        if bias is not None:
            aggregate.write_table(bias, smk.output.bias_csv, smk.output.bias_md)
        else:
            for path in (smk.output.bias_csv, smk.output.bias_md):
                write_text(path, "no shape/texture labels in these datasets\n")
        by = ["dataset", "pretext"]
        pretrain = aggregate.load_curves(list(smk.input.pretrains), by, ["train_loss"])
        finetune = aggregate.load_curves(list(smk.input.evals), by, ["top1_val"],
                                         where=lambda r: r.get("eval") == "finetune")
        figures.plot_pretext_curves(aggregate.curve_table(pretrain, by), aggregate.curve_table(finetune, by),
                                    smk.output.curves_png)
        figures.plot_pretext_attention(aggregate.attention_cells(list(smk.input.analyses), by),
                                       smk.output.attention_png)
        log.info(f"\n{table}\n{rep}")


def run_transfer_report(smk) -> None:
    from . import aggregate, figures

    with logging_to(smk.log[0] if smk.log else None):
        # each student's shift numbers come from its shift job's record (smk.input.shifts)
        table = aggregate.transfer_table(aggregate.load_records(list(smk.input.records), shift=list(smk.input.shifts)))
        aggregate.write_table(table, smk.output.csv, smk.output.md)
        figures.plot_transfer(table, smk.output.png)
        figures.plot_transfer_layers(table, smk.output.layers_png)
        by = ["dataset", "teacher", "method"]
        # the student's curves: jobs trained by epochs (not linear_probe, ensemble), all layers transferred
        curves = aggregate.load_curves(list(smk.input.records), by, ["top1_val"],
                                       where=lambda r: r.get("layers") == "all" and bool(r.get("history")))
        figures.plot_transfer_curves(aggregate.curve_table(curves, by), smk.output.curves_png)
        cells = aggregate.attention_cells(list(smk.input.records), by,
                                          where=lambda r: r.get("layers") == "all" and r.get("method") != "ensemble")
        figures.plot_transfer_attention(cells, smk.output.attention_png)
        log.info(f"\n{table}")


def run_summary(smk) -> None:
    """reports/summary.md (and .html) from the run records of every question in the config."""
    from .summary import write_summary

    with logging_to(smk.log[0] if smk.log else None):
        text = write_summary(smk.output.md, smk.output.html, architecture=list(smk.input.architecture),
                             pretext=list(smk.input.evals), analyses=list(smk.input.analyses),
                             transfer=list(smk.input.transfer), transfer_shift=list(smk.input.transfer_shift),
                             reference_layers=smk.params.reference_layers)
        log.info(f"\n{text}")
