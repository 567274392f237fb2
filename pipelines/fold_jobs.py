"""Folds side by side: `train_cv -P fold_jobs=N` trains N folds at a time in separate processes,
spread round-robin over the GPUs `devices` names (pipelines/placement.py: several jobs share a GPU
when there are more jobs than GPUs), or on a CPU each with its share of the cores.

Each job is train_cv with the parent's resolved config, restricted to its folds, started with the parent's run id
in `FOLD_JOB_PARENT` (so it trains nested fold runs under that parent and never ends it) and its
output in a log file in the work folder. Fold runs, resume and skipping finished folds work as
for one process; the parent process waits and then writes the summary.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from data_tools.errors import UserError
from pipelines.children import THREADS_ENV, child_env, thread_share
from pipelines.placement import VISIBLE, gpu_env, round_robin

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


@dataclass
class FoldJob:
    folds: list[int]
    command: list[str]
    env: dict[str, str]
    log: Path


def plan_fold_jobs(params: dict[str, str], folds: list[int], jobs: int, parent_id: str, experiment_id: str,
                   logs: Path, gpus: list[str]) -> list[FoldJob]:
    """One job per fold group, each with its command, its environment (its GPU, round-robin over `gpus`;
    its share of the cores) and its log."""
    groups = split_folds(folds, jobs)
    threads = thread_share(len(groups))
    return [FoldJob(group, [sys.executable, "-m", "pipelines.train_cv", *job_argv(params, group)],
                    child_env(experiment_id, threads=threads, **{FOLD_JOB_PARENT: parent_id}, **gpu_env(gpu)),
                    logs / f"fold-job-{'-'.join(map(str, group))}.log")
            for group, gpu in zip(groups, round_robin(len(groups), gpus))]


def run_fold_jobs(params: dict[str, str], folds: list[int], jobs: int, parent_id: str, experiment_id: str,
                  logs: Path, gpus: list[str] = ()) -> None:
    """Train `folds` in `jobs` processes under `parent_id`, spread over `gpus` (none: a CPU); raises
    FoldJobError naming a failed job's log."""
    logs.mkdir(parents=True, exist_ok=True)
    running = []
    for job in plan_fold_jobs(params, folds, jobs, parent_id, experiment_id, logs, list(gpus)):
        group, log = job.folds, job.log
        out = open(log, "w")
        proc = subprocess.Popen(job.command, env=job.env, stdout=out, stderr=subprocess.STDOUT)
        where = f", GPU {job.env[VISIBLE]}" if VISIBLE in job.env and gpus else ""
        print(f"fold job {proc.pid}: folds {group}, {job.env[THREADS_ENV]} thread(s){where}, log {log}", flush=True)
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
