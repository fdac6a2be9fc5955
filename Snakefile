# vitablate: one workflow for three "attention versus features" questions.
# `snakemake --cores 2` runs the default grid (config/config.yaml) and fills results/reports/.
# Rules declare; the logic lives in src/vitablate (workflow.py is what rules call: a facade over
# grid.py, resolve.py, checks.py and rule_bodies.py).

from snakemake.utils import min_version, validate

min_version("9.0")


# The default grid, unless config files are given on the command line: a --configfile (such as
# config/presets/*.yaml) is then the whole config, so none of the default's digits grid (its
# datasets, teachers, recipe keys) is merged into it. --config key=value still overrides keys.
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


from vitablate import workflow as vw

vw.check_raw_config(config)  # a mapping, no alias bomb, finite numbers: before the schema prints the config
validate(config, "config/schema.yaml")

include: "rules/common.smk"


rule all:
    default_target: True
    input:
        rules_targets("all"),


include: "rules/architecture.smk"
include: "rules/pretext.smk"
include: "rules/transfer.smk"
include: "rules/report.smk"


onstart:
    # Without RAY_ADDRESS: a private local Ray cluster for this run only.
    import os
    import signal

    from vitablate.config import TrackingConfig, from_dict
    from vitablate.execution import private_cluster_dir, start_session
    from vitablate.tracking import configure_retries
    from vitablate.watchdog import reap_leftovers

    for missing in vw.check_data(config, remote=bool(os.environ.get("RAY_ADDRESS"))):
        print(f"[vitablate] warning: {missing} is not on this machine; the Ray cluster's nodes must have it")
    vw.check_results_dir(RESULTS)  # writable, with room, before any job
    for line in reap_leftovers(RESULTS):  # clusters earlier runs on this results_dir left running
        print(f"[vitablate] {line}")
    configure_retries(from_dict(TrackingConfig, dict(config.get("tracking") or {}), "tracking").retry_timeout_s)
    signal.signal(signal.SIGHUP, signal.default_int_handler)  # a closed terminal stops the run as Ctrl-C does
    vw.mark_run_started()  # onerror ends the MLflow runs this run's jobs left RUNNING
    # the dispatcher makes the MLflow store and experiments (no job starts before they are ready), so that this
    # process imports neither MLflow nor torch on a run that succeeds (vw.check_data reads the data without torch)
    address = start_session(num_cpus=workflow._cores, results_dir=RESULTS,
                            locks=tuple(getattr(workflow.persistence, "_lockfile", {}).values()),
                            mlflow=(MLFLOW_URI, vw.active_questions(config)))
    private = private_cluster_dir()
    print(f"[vitablate] Ray cluster {address}" + (f" (private, {private})" if private else " (RAY_ADDRESS)")
          + f"; MLflow {MLFLOW_URI}")


onsuccess:
    from vitablate.execution import stop_session

    stop_session()


onerror:
    from vitablate.execution import stop_session

    stop_session()  # the dispatcher ends the runs of jobs still in flight KILLED
    for job_dir in vw.end_orphaned_runs(RESULTS, MLFLOW_URI, "the workflow stopped with an error before this job ended"):
        print(f"[vitablate] ended the MLflow run of {job_dir} FAILED (it was left RUNNING)")
