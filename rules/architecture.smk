# Q1 architecture: do you even need attention? One training job per (dataset, mixer, seed).


rule train_architecture:
    output:
        record=f"{RESULTS}/architecture/{{dataset}}/{{mixer}}/seed{{seed}}/record.json",
    log:
        f"{RESULTS}/logs/architecture/{{dataset}}/{{mixer}}/seed{{seed}}.log",
    params:
        job=job_params("architecture"),
        mlflow_uri=MLFLOW_URI,
    threads: 1  # this process only waits on Ray; the job's CPUs/GPUs are the config's execution.*
    conda:
        ENV
    script:
        "scripts/job.py"


rule architecture_shift:
    # The classifier tested on the dataset's shifted sets (its extra_test_dirs, a set it brings): its own job,
    # reading the model.pt beside the classifier's record, so changing extra_test_dirs re-runs only these jobs.
    input:
        lambda wc: vw.architecture_shift_inputs(config, **dict(wc.items())),
    output:
        record=f"{RESULTS}/architecture/{{dataset}}/{{mixer}}/seed{{seed}}/shift/record.json",
    log:
        f"{RESULTS}/logs/architecture/{{dataset}}/{{mixer}}/seed{{seed}}.shift.log",
    params:
        job=job_params("architecture_shift"),
        mlflow_uri=MLFLOW_URI,
    threads: 1  # waits on Ray; the job's resources are execution.*
    conda:
        ENV
    script:
        "scripts/job.py"


rule architecture_report:
    input:
        records=grid_paths(
            "architecture",
            f"{RESULTS}/architecture/{{dataset}}/{{mixer}}/seed{{seed}}/record.json",
        ),
        shifts=grid_paths(
            "architecture_shift",
            f"{RESULTS}/architecture/{{dataset}}/{{mixer}}/seed{{seed}}/shift/record.json",
        ),
    output:
        csv=report(
            f"{REPORTS}/tables/architecture.csv",
            category="Q1 architecture",
            caption="../reports/captions/architecture_table.rst",
        ),
        md=report(
            f"{REPORTS}/tables/architecture.md",
            category="Q1 architecture",
            caption="../reports/captions/architecture_table.rst",
        ),
        png=report(
            f"{REPORTS}/figures/architecture.png",
            category="Q1 architecture",
            caption="../reports/captions/architecture_figure.rst",
        ),
        curves_png=report(
            f"{REPORTS}/figures/architecture_curves.png",
            category="Q1 architecture",
            caption="../reports/captions/architecture_curves.rst",
        ),
    log:
        f"{RESULTS}/logs/architecture/report.log",
    conda:
        ENV
    script:
        "scripts/architecture_report.py"


rule architecture:
    input:
        rules_targets("architecture"),
