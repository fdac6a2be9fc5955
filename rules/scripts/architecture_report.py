# Snakemake script: run records -> <reports_dir>/tables/architecture.{csv,md} and the figure.
from vitablate.workflow import run_architecture_report

run_architecture_report(snakemake)  # noqa: F821 (injected by Snakemake)
