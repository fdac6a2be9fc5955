# Grid, paths and helpers shared by every stage. Logic lives in vitablate.workflow.

from vitablate import workflow as vw
from vitablate.tracking import default_uri

vw.check_config(config)  # cross-field checks, before any job is scheduled

RESULTS = vw.results_dir(config)
REPORTS = vw.reports_dir(config)
MLFLOW_URI = default_uri(RESULTS)
ENV = "../envs/vitablate.yaml"


wildcard_constraints:
    seed=r"\d+",
    dataset=r"[a-z0-9_]+",
    mixer=r"[a-z_]+",


def grid_paths(question, pattern):
    """Expand `pattern` over the question's grid (a list of wildcard dicts)."""
    return [pattern.format(**wc) for wc in vw.grid(config, question)]


def job_params(question):
    """params: the job's resolved config as a dict (never a shell string)."""
    return lambda wc: vw.job_params(config, question, wc)


def rules_targets(target):
    """Files each target stands for; `all` is every question in the config."""
    architecture = [f"{REPORTS}/tables/architecture.csv", f"{REPORTS}/figures/architecture.png"]
    targets = {"architecture": architecture}
    if target == "all":
        return [f for q, files in targets.items() if config.get(q) for f in files]
    return targets[target]
