"""Folds side by side: `train_cv -P fold_jobs=N` trains N folds at a time in separate processes
on the same device (a GPU, or on a CPU each with its share of the cores).

Each job is train_cv with the parent's resolved config, restricted to its folds, started with the parent's run id
in `FOLD_JOB_PARENT` (so it trains nested fold runs under that parent and never ends it) and its
output in a log file in the work folder. Fold runs, resume and skipping finished folds work as
for one process; the parent process waits and then writes the summary.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from data_tools.errors import UserError
from pipelines.children import THREADS_ENV, child_env, thread_share

FOLD_JOB_PARENT = "MITOCLASS_FOLD_JOB_PARENT"  # set by the spawning train_cv, read by its fold jobs


class FoldJobError(UserError):
    """A fold job ended with an error; its log names it."""


def split_folds(folds: list[int], jobs: int) -> list[list[int]]:
    """Round-robin: fold lists of near-equal length, one per job (fewer jobs than folds: no empty job)."""
    jobs = max(1, min(jobs, len(folds)))
    return [folds[i::jobs] for i in range(jobs)]


def job_argv(params: dict[str, str], folds: list[int]) -> list[str]:
    """The command line of a job: the parent's resolved config (`as_params`), its own folds, one job."""
    values = {**params, "folds": ",".join(map(str, folds)), "fold_jobs": "1"}
    return [token for name, value in values.items() if value != "" for token in (f"--{name}", value)]


def run_fold_jobs(params: dict[str, str], folds: list[int], jobs: int, parent_id: str, experiment_id: str,
                  logs: Path) -> None:
    """Train `folds` in `jobs` processes under `parent_id`; raises FoldJobError naming a failed job's log."""
    groups = split_folds(folds, jobs)
    logs.mkdir(parents=True, exist_ok=True)
    env = child_env(experiment_id, threads=thread_share(len(groups)), **{FOLD_JOB_PARENT: parent_id})
    running = []
    for group in groups:
        log = logs / f"fold-job-{'-'.join(map(str, group))}.log"
        out = open(log, "w")
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.train_cv", *job_argv(params, group)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        print(f"fold job {proc.pid}: folds {group}, {env[THREADS_ENV]} thread(s), log {log}", flush=True)
        running.append((group, proc, out, log))
    failed = []
    for group, proc, out, log in running:
        code = proc.wait()
        out.close()
        print(f"fold job {proc.pid}: folds {group} {'done' if code == 0 else f'FAILED (exit {code})'}", flush=True)
        if code != 0:
            failed.append((group, log))
    if failed:
        lines = Path(failed[0][1]).read_text(errors="replace").replace("\r", "\n").splitlines()
        tail = " | ".join(ln.strip() for ln in lines if ln.strip())[-600:]
        raise FoldJobError(f"fold job(s) for folds {[g for g, _ in failed]} failed; log {failed[0][1]}: ...{tail}")
