# vitablate: one workflow for three "attention versus features" questions.
# `snakemake --cores 2` runs the default grid (config/config.yaml) and fills reports/.
# Rules declare; the logic lives in src/vitablate (workflow.py is what rules call).

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


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
    from vitablate.execution import start_session
    from vitablate.tracking import prepare

    prepare(MLFLOW_URI, vw.active_questions(config))
    address = start_session(num_cpus=workflow._cores)
    print(f"[vitablate] Ray cluster {address}; MLflow {MLFLOW_URI}")


onsuccess:
    from vitablate.execution import stop_session

    stop_session()


onerror:
    from vitablate.execution import stop_session

    stop_session()
