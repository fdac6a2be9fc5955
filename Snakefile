# vitablate: one workflow for three "attention versus features" questions.
# `snakemake --cores 2` runs the default grid (config/config.yaml) and fills results/reports/.
# Rules declare; the logic lives in src/vitablate (workflow.py is what rules call).

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

    from vitablate.execution import private_cluster_dir, start_session
    from vitablate.tracking import prepare

    for missing in vw.check_data(config, remote=bool(os.environ.get("RAY_ADDRESS"))):
        print(f"[vitablate] warning: {missing} is not on this machine; the Ray cluster's nodes must have it")
    prepare(MLFLOW_URI, vw.active_questions(config))
    address = start_session(num_cpus=workflow._cores)
    private = private_cluster_dir()
    print(f"[vitablate] Ray cluster {address}" + (f" (private, {private})" if private else " (RAY_ADDRESS)")
          + f"; MLflow {MLFLOW_URI}")


onsuccess:
    from vitablate.execution import stop_session

    stop_session()


onerror:
    from vitablate.execution import stop_session

    stop_session()
