# Snakemake script: transfer records -> <reports_dir>/tables/transfer.{csv,md} and its figures.
from vitablate.workflow import run_transfer_report

run_transfer_report(snakemake)  # noqa: F821 (injected by Snakemake)
