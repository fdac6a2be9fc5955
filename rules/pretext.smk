# Q2 pretext: what do self-supervised ViTs learn? Pre-train once per (dataset, pretext, seed);
# every evaluation and analysis reads that encoder, so changing an evaluation setting re-runs
# only the evaluations.

PRETEXT_DIR = f"{RESULTS}/pretext/{{dataset}}/{{pretext}}/seed{{seed}}"
PRETEXT_LOGS = f"{RESULTS}/logs/pretext/{{dataset}}/{{pretext}}/seed{{seed}}"


rule pretrain:
    output:
        record=f"{PRETEXT_DIR}/record.json",
        **checkpoint_output(encoder=f"{PRETEXT_DIR}/encoder.pt"),
    log:
        f"{PRETEXT_LOGS}/pretrain.log",
    params:
        job=job_params("pretrain"),
        mlflow_uri=MLFLOW_URI,
    threads: 1  # waits on Ray; the job's resources are execution.*
    conda:
        ENV
    script:
        "scripts/job.py"


rule pretext_eval:
    input:
        encoder=checkpoint_input(f"{PRETEXT_DIR}/encoder.pt"),
    output:
        record=f"{PRETEXT_DIR}/{{eval}}/record.json",
    log:
        f"{PRETEXT_LOGS}/{{eval}}.log",
    params:
        job=job_params("pretext_eval"),
        mlflow_uri=MLFLOW_URI,
    threads: 1
    conda:
        ENV
    script:
        "scripts/job.py"


rule pretext_shift:
    # The evaluation's model tested on the dataset's shifted sets (its extra_test_dirs, a set it brings): the
    # fine-tuned model.pt; the linear probe's probe.pt on the frozen encoder; k-NN among the frozen encoder's
    # training features. Its own job, so changing extra_test_dirs re-runs only these jobs.
    input:
        lambda wc: vw.pretext_shift_inputs(config, **dict(wc.items())),
    output:
        record=f"{PRETEXT_DIR}/{{eval}}/shift/record.json",
    log:
        f"{PRETEXT_LOGS}/{{eval}}.shift.log",
    params:
        job=job_params("pretext_shift"),
        mlflow_uri=MLFLOW_URI,
    threads: 1
    conda:
        ENV
    script:
        "scripts/job.py"


rule pretext_analysis:
    input:
        encoder=checkpoint_input(f"{PRETEXT_DIR}/encoder.pt"),
    output:
        record=f"{PRETEXT_DIR}/analysis/record.json",
    log:
        f"{PRETEXT_LOGS}/analysis.log",
    params:
        job=job_params("analysis"),
        mlflow_uri=MLFLOW_URI,
    threads: 1
    conda:
        ENV
    script:
        "scripts/job.py"


rule pretext_report:
    input:
        evals=grid_paths("pretext_eval", f"{PRETEXT_DIR}/{{eval}}/record.json"),
        shifts=grid_paths("pretext_shift", f"{PRETEXT_DIR}/{{eval}}/shift/record.json"),
        analyses=grid_paths("analysis", f"{PRETEXT_DIR}/analysis/record.json"),
        pretrains=grid_paths("pretrain", f"{PRETEXT_DIR}/record.json"),
    output:
        csv=report(f"{REPORTS}/tables/pretext.csv", category="Q2 pretext",
                   caption="../reports/captions/pretext_table.rst"),
        md=report(f"{REPORTS}/tables/pretext.md", category="Q2 pretext",
                  caption="../reports/captions/pretext_table.rst"),
        png=report(f"{REPORTS}/figures/pretext_eval.png", category="Q2 pretext",
                   caption="../reports/captions/pretext_figure.rst"),
        rep_csv=report(f"{REPORTS}/tables/representation.csv", category="Q2 pretext",
                       caption="../reports/captions/representation_table.rst"),
        rep_md=report(f"{REPORTS}/tables/representation.md", category="Q2 pretext",
                      caption="../reports/captions/representation_table.rst"),
        rep_png=report(f"{REPORTS}/figures/representation.png", category="Q2 pretext",
                       caption="../reports/captions/representation_figure.rst"),
        probe_csv=report(f"{REPORTS}/tables/layer_probe.csv", category="Q2 pretext",
                         caption="../reports/captions/layer_probe_table.rst"),
        probe_md=report(f"{REPORTS}/tables/layer_probe.md", category="Q2 pretext",
                        caption="../reports/captions/layer_probe_table.rst"),
        bias_csv=report(f"{REPORTS}/tables/shape_bias.csv", category="Q2 pretext",
                        caption="../reports/captions/shape_bias_table.rst"),
        bias_md=report(f"{REPORTS}/tables/shape_bias.md", category="Q2 pretext",
                       caption="../reports/captions/shape_bias_table.rst"),
        curves_png=report(f"{REPORTS}/figures/pretext_curves.png", category="Q2 pretext",
                          caption="../reports/captions/pretext_curves.rst"),
        attention_png=report(f"{REPORTS}/figures/pretext_attention.png", category="Q2 pretext",
                             caption="../reports/captions/pretext_attention.rst"),
    log:
        f"{RESULTS}/logs/pretext/report.log",
    conda:
        ENV
    script:
        "scripts/pretext_report.py"


rule pretext:
    input:
        rules_targets("pretext"),
