"""Runs and trials whose process is gone. Every run (and tune trial) records where it runs: host,
pid and the process's start time (a pid alone can be reused). A run left RUNNING by a process of
this host that no longer exists (SIGKILL, the OOM killer, a preempted job) would show as running
in the UI for ever: `main`, `tune` and `train_cv` end such runs as KILLED when they start.
Runs of other hosts are left alone: this host cannot see their processes."""
from __future__ import annotations

import functools
import os
import socket
from typing import Mapping

import psutil
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from analysis import keys, runs


@functools.cache
def process_tags() -> dict[str, str]:
    """{host, pid, process_start} of this process, as run tags or trial user attributes."""
    return {keys.HOST: socket.gethostname(), keys.PID: str(os.getpid()),
            keys.PROCESS_START: f"{psutil.Process().create_time():.2f}"}


def gone(where: Mapping[str, object]) -> bool:
    """True when `where` (a run's tags, a trial's user attributes) names a process of this host
    that no longer exists; False for another host's, or when it names none."""
    if where.get(keys.HOST) != socket.gethostname() or not str(where.get(keys.PID, "")).isdigit():
        return False
    try:
        started = psutil.Process(int(where[keys.PID])).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    except psutil.AccessDenied:
        return False
    return abs(started - float(where.get(keys.PROCESS_START) or started)) > 1.0  # the pid now names another process


def end_orphaned_runs(client: MlflowClient, experiment_id: str, step: str) -> list[str]:
    """End as KILLED the experiment's RUNNING runs of this host's processes that are gone; say so in one line."""
    orphans = [r for r in runs.running_runs(client, [experiment_id]) if gone(r.data.tags)]
    for run in orphans:
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    if orphans:
        names = ", ".join(f"{r.info.run_name or '?'} ({r.info.run_id[:8]}, pid {r.data.tags[keys.PID]})"
                          for r in orphans[:5])
        more = f" and {len(orphans) - 5} more" if len(orphans) > 5 else ""
        print(f"{step}: ended {len(orphans)} run(s) left RUNNING by processes of this host that are gone, as KILLED: "
              f"{names}{more}", flush=True)
    return [r.info.run_id for r in orphans]
