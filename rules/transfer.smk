# Q3 transfer: are attention patterns enough? A student trained from scratch receives a
# teacher's attention (copied or distilled); compared with scratch and with fine-tuning the
# teacher. Pretext teachers are the pretext question's encoders: the DAG waits for them.

TRANSFER_DIR = f"{RESULTS}/transfer/{{dataset}}/{{teacher}}/{{method}}/{{layers}}/seed{{seed}}"


rule transfer_train:
    input:
        lambda wc: vw.transfer_inputs(config, **dict(wc.items())),
    output:
        record=f"{TRANSFER_DIR}/record.json",
    log:
        f"{RESULTS}/logs/transfer/{{dataset}}/{{teacher}}/{{method}}/{{layers}}/seed{{seed}}.log",
    params:
        job=job_params("transfer"),
        mlflow_uri=MLFLOW_URI,
    threads: 1  # waits on Ray; the job's resources are execution.*
    conda:
        ENV
    script:
        "scripts/job.py"


rule transfer_shift:
    # The student tested under distribution shift (transfer.shift corruptions at their severity, the dataset's
    # extra_test_dirs): its own job, reading the model its transfer job saved, so changing the shift settings
    # re-runs only these jobs.
    input:
        lambda wc: vw.shift_inputs(config, **dict(wc.items())),
    output:
        record=f"{TRANSFER_DIR}/shift/record.json",
    log:
        f"{RESULTS}/logs/transfer/{{dataset}}/{{teacher}}/{{method}}/{{layers}}/seed{{seed}}.shift.log",
    params:
        job=job_params("shift"),
        mlflow_uri=MLFLOW_URI,
    threads: 1  # waits on Ray; the job's resources are execution.*
    conda:
        ENV
    script:
        "scripts/job.py"


rule transfer_report:
    input:
        records=grid_paths("transfer", f"{TRANSFER_DIR}/record.json"),
        shifts=grid_paths("shift", f"{TRANSFER_DIR}/shift/record.json"),
    output:
        csv=report(f"{REPORTS}/tables/transfer.csv", category="Q3 transfer",
                   caption="../reports/captions/transfer_table.rst"),
        md=report(f"{REPORTS}/tables/transfer.md", category="Q3 transfer",
                  caption="../reports/captions/transfer_table.rst"),
        png=report(f"{REPORTS}/figures/transfer.png", category="Q3 transfer",
                   caption="../reports/captions/transfer_figure.rst"),
        layers_png=report(f"{REPORTS}/figures/transfer_layers.png", category="Q3 transfer",
                          caption="../reports/captions/transfer_layers_figure.rst"),
        curves_png=report(f"{REPORTS}/figures/transfer_curves.png", category="Q3 transfer",
                          caption="../reports/captions/transfer_curves.rst"),
        attention_png=report(f"{REPORTS}/figures/transfer_attention.png", category="Q3 transfer",
                             caption="../reports/captions/transfer_attention.rst"),
    log:
        f"{RESULTS}/logs/transfer/report.log",
    conda:
        ENV
    script:
        "scripts/transfer_report.py"


rule transfer:
    input:
        rules_targets("transfer"),
