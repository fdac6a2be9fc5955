# Snakemake script for every job rule: one call, no shell; the job's config arrives as params.
from vitablate.workflow import run_job_rule

run_job_rule(snakemake)  # noqa: F821 (injected by Snakemake)
