"""The environment of a child process that runs project code: a workflow step (launch), a
fold job (fold_jobs) or a tune worker. One recipe, so that every child gets the same things:
this project on `PYTHONPATH`, unbuffered output, the tracking URI this process uses, its
experiment by id, its share of the cores, and never this process's `MLFLOW_RUN_ID` unless it
is meant to resume that run (a child that inherits it by accident writes into its parent).
"""
from __future__ import annotations

import os

import mlflow

from pipelines.common import ROOT

THREADS_ENV = "OMP_NUM_THREADS"


def thread_share(processes: int) -> int:
    """Threads for each of `processes` processes side by side: this process's own share
    (`OMP_NUM_THREADS`, as a parent gave it) or the machine's cores, divided. Tiny models slow
    down many times over when their OpenMP threads outnumber the free cores."""
    cores = int(os.environ.get(THREADS_ENV) or os.cpu_count() or 1)
    return max(1, cores // max(1, processes))


def child_env(experiment_id: str, *, threads: int, run_id: str | None = None, **extra: str) -> dict[str, str]:
    """os.environ for a child process, as described above; `extra` variables are added last."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MLFLOW_EXPERIMENT_ID": experiment_id,
           THREADS_ENV: str(threads), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    if run_id:
        env["MLFLOW_RUN_ID"] = run_id
    return {**env, **extra}
