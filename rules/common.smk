# Grid, paths and helpers shared by every stage. Logic lives in vitablate.workflow (a facade over
# vitablate.grid, .resolve, .checks and .rule_bodies).

from vitablate import workflow as vw
from vitablate.tracking import default_uri

vw.check_config(config)  # cross-field checks, before any job is scheduled

RESULTS = vw.results_dir(config)
REPORTS = vw.reports_dir(config)
MLFLOW_URI = default_uri(RESULTS)
vw.check_tracking(config, MLFLOW_URI)  # execution.shared_fs false needs a tracking server every node reaches
ENV = "../envs/vitablate.yaml"


wildcard_constraints:
    seed=r"\d+",
    dataset=r"[a-z0-9_]+",
    mixer=r"[a-z_]+",
    pretext=r"[a-z]+(_[0-9.]+)?",
    eval=r"linear_probe|finetune|knn",
    teacher=r"[A-Za-z0-9_.\-]+",
    method=r"scratch|finetune|linear_probe|attn_copy|attn_distill|ensemble|copy_q|copy_k",
    layers=r"all|first\d+|last\d+|l[0-9\-]+",


def grid_paths(kind, pattern):
    """Expand `pattern` over the grid of a rule kind (a list of wildcard dicts)."""
    return [pattern.format(**wc) for wc in vw.grid(config, kind)]


def checkpoint_output(**files):
    """Checkpoints a job leaves for other jobs: declared outputs only where every node sees them
    (execution.shared_fs); otherwise they stay on the job's node and travel as MLflow artifacts."""
    return files if vw.shared_fs(config) else {}


def checkpoint_input(pattern):
    """A consumer's input: the checkpoint, or (no shared filesystem) its producer's record."""
    return vw.checkpoint_input(config, pattern)


def job_params(kind):
    """params: what determines the job's result, as a dict (never a shell string): its resolved config less the
    resources, which the rule body adds from the config at run time (vitablate.resolve.job_params)."""
    return lambda wc: vw.job_params(config, kind, wc)


def rules_targets(target):
    """Files each target stands for; `all` and `report` are every configured question plus the summary."""
    targets = {
        "architecture": [f"{REPORTS}/tables/architecture.csv", f"{REPORTS}/figures/architecture.png"],
        "pretext": [f"{REPORTS}/tables/pretext.csv", f"{REPORTS}/tables/representation.csv",
                    f"{REPORTS}/figures/pretext_eval.png", f"{REPORTS}/figures/representation.png"],
        "transfer": [f"{REPORTS}/tables/transfer.csv", f"{REPORTS}/figures/transfer.png",
                     f"{REPORTS}/figures/transfer_layers.png"],
    }
    outputs = [f for q, files in targets.items() if config.get(q) for f in files]  # the configured questions
    if target == "questions":
        return outputs
    if target in ("all", "report"):
        return outputs + [f"{REPORTS}/summary.md", f"{REPORTS}/summary.html"]
    return targets[target]
