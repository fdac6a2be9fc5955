# Snakemake script: run records of every configured question -> <reports_dir>/summary.md.
from vitablate.workflow import run_summary

run_summary(snakemake)  # noqa: F821 (injected by Snakemake)
