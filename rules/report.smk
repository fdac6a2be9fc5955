# results/reports/summary.md (+ .html, which Snakemake's report shows inline): each question's answer
# stated from the run records (vitablate.summary), and the `report` target.
# `snakemake --report results/reports/report.html` then bundles every table and figure annotated with
# report() in rules/*.smk, one category per question.


rule summary:
    input:
        architecture=grid_paths(
            "architecture",
            f"{RESULTS}/architecture/{{dataset}}/{{mixer}}/seed{{seed}}/record.json",
        ),
        evals=grid_paths("pretext_eval", f"{PRETEXT_DIR}/{{eval}}/record.json"),
        analyses=grid_paths("analysis", f"{PRETEXT_DIR}/analysis/record.json"),
        transfer=grid_paths("transfer", f"{TRANSFER_DIR}/record.json"),
        transfer_shift=grid_paths("shift", f"{TRANSFER_DIR}/shift/record.json"),
        tables=rules_targets("questions"),
    output:
        md=report(
            f"{REPORTS}/summary.md",
            category="Summary",
            caption="../reports/captions/summary.rst",
        ),
        html=report(
            f"{REPORTS}/summary.html",
            category="Summary",
            caption="../reports/captions/summary.rst",
        ),
    params:
        reference_layers=vw.reference_layers(config),
    log:
        f"{RESULTS}/logs/summary.log",
    conda:
        ENV
    script:
        "scripts/summary.py"


rule report:
    input:
        rules_targets("report"),
