# Snakemake script: evaluation and analysis records -> <reports_dir>/tables/pretext*, representation*, figures.
from vitablate.workflow import run_pretext_report

run_pretext_report(snakemake)  # noqa: F821 (injected by Snakemake)
