# Snakemake script for every training rule: one call, no shell, config passed as params.
from vitablate.workflow import run_train_rule

run_train_rule(snakemake)  # noqa: F821 (injected by Snakemake)
