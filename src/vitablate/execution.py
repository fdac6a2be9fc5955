"""Ray: a facade over the cluster's lifecycle and the submission of jobs to it.

- `vitablate.cluster`: connect to RAY_ADDRESS or start this run's private cluster
  (`start_session` / `stop_session`), its dispatcher and its watchdog;
- `vitablate.submit`: run one job as a Ray task with its resources inside an MLflow run
  (`run_job`, `submit`, `_execute`), the resources check, where a job ran.

The Snakefile, the CLI, bench/ and the tests import these names from here; new code may import
them from where they live. Training code never imports Ray: only those two modules do.
"""

from __future__ import annotations

from .cluster import (  # noqa: F401
    _LOOPBACK_ENV,
    _PRIVATE_ENV,
    _await_dispatcher,
    _dispatcher_env,
    _free_port,
    _kill_stragglers,
    _probe,
    _ray,
    _reap,
    _refresh_ray_settings,
    _spawn_dispatcher,
    _start_private_cluster,
    _start_watchdog,
    _stop,
    _stop_watchdog,
    connect,
    private_cluster_dir,
    start_session,
    stop_session,
)
from .submit import (  # noqa: F401
    CHECKPOINTS,
    HOST_OUTPUTS,
    PENDING_WARNING_S,
    JobFailed,
    _alive_node_resources,
    _end_failed_run,
    _execute,
    _fetch_checkpoints,
    _run_name,
    _unwrap,
    _wait,
    _warn_pending,
    check_resources,
    job_log,
    placement,
    run_job,
    submit,
    unschedulable,
    where,
)
