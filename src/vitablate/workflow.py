"""What the Snakemake rules call: a facade over the modules that each do one part of it.

- `vitablate.grid`: grid expansion, the results/reports paths and each job's DAG inputs;
- `vitablate.resolve`: each job's resolved `JobConfig` and the params a rule hands it (what
  determines the job's result: no resources, each evaluation only its own settings);
- `vitablate.checks`: the config, path, data and results-directory checks run before any job;
- `vitablate.rule_bodies`: the bodies of the rules' scripts and the Snakefile's handlers.

The Snakefile, rules/*.smk and the tests import these names from here (`from vitablate import
workflow as vw`); new code may import them from where they live.
"""

from __future__ import annotations

from .checks import (  # noqa: F401
    LARGE_GRID_JOBS,
    MAX_CONFIG_VALUES,
    MAX_SEED,
    MIN_FREE_MB,
    _check_ensemble_members,
    _check_idx_files,
    check_config,
    check_data,
    check_paths,
    check_raw_config,
    check_results_dir,
    check_teacher_files,
    check_tracking,
    data_paths,
)
from .config import ConfigError  # noqa: F401
from .grid import (  # noqa: F401
    BUILTIN_SHIFT_SETS,
    LAYERED_METHODS,
    QUESTIONS,
    SHIFT_READS_TEACHER,
    _path_setting,
    FROZEN_EVALS,
    active_questions,
    architecture_dir,
    architecture_shift_inputs,
    checkpoint_input,
    ensemble_members,
    grid,
    grid_size,
    has_dataset_shift_sets,
    has_shift_sets,
    layers_id,
    layers_spec,
    parse_pretext,
    pretext_dir,
    pretext_ids,
    pretext_shift_inputs,
    producer_record,
    reference_layers,
    reports_dir,
    results_dir,
    seeds_by_keys,
    seeds_for,
    shared_fs,
    shift_inputs,
    teacher_checkpoint,
    transfer_dir,
    transfer_grid,
    transfer_inputs,
)
from .resolve import (  # noqa: F401
    EVAL_READS,
    RESOLVERS,
    RESOURCE_KEYS,
    _by,
    _job,
    _layer,
    _pretext_config,
    SHIFT_EVAL_READS,
    analysis_job,
    architecture_job,
    architecture_shift_job,
    job_params,
    job_resources,
    pretext_eval_job,
    pretext_shift_job,
    pretrain_job,
    shift_job,
    transfer_job,
    with_resources,
)
from .rule_bodies import (  # noqa: F401
    RUN_STARTED_ENV,
    checkpoint_sources,
    end_orphaned_runs,
    fetch_host_outputs,
    logging_to,
    mark_run_started,
    run_architecture_report,
    run_job_rule,
    run_pretext_report,
    run_summary,
    run_transfer_report,
)
