"""main's steps as jobs of a scheduler, through submitit: `executor=slurm` queues them on a Slurm
cluster, `executor=local` runs the same jobs as processes of this machine (what the tests run).

Each step's run is made here before its job is queued (status SCHEDULED, its params as given, as
`main` makes them locally), so a job knows the run ids of the steps it follows and the whole
workflow is submitted at once. A job runs its step in that run (pipelines/launch.py `run_step`).
A step follows the jobs that make what it reads (a run id or a store among its params; the report
follows every job): on Slurm `--dependency=afterok:<ids>`, a failed job cancelling those after it;
locally this process starts a job once those before it ended well, `jobs` at a time, each on a GPU
of its own where there are any (pipelines/placement.py).

train_cv's folds are a job array, one task per fold, under the step's run (their parent, passed
down as FOLD_JOB_PARENT, as to fold jobs); then one short job writes the summary and ends the run.
Finished steps are reused before anything is submitted (main's Workflow.finished_run), so a rerun
submits only what is missing; a fold that finished keeps its work folder and is logged again
under the new parent without training.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import mlflow
import submitit
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from analysis import keys
from data_tools.errors import UserError
from data_tools.folds import select_folds
from data_tools.store import open_store
from pipelines.console import Console, minutes
from pipelines.fold_jobs import FOLD_JOB_PARENT
from pipelines.launch import create_step_run, run_step
from pipelines.placement import Slots
from pipelines.slurm import SlurmConfig, executor

PROCESS, LOCAL, SLURM = "process", "local", "slurm"
EXECUTORS = (PROCESS, LOCAL, SLURM)
SCHEDULED = RunStatus.to_string(RunStatus.SCHEDULED)
ACTIVE = ("queued", "submitted", "running")


class JobFailed(UserError):
    """A submitted step ended with an error (its log names it)."""


@dataclass
class JobSpec:
    """What a job runs. Pickled by submitit into its folder: no secrets (credentials come from the
    job's environment, which sbatch copies from the submitting shell)."""
    step: str
    params: dict[str, str]
    log: Path
    experiment_id: str
    tracking_uri: str
    threads: int
    run_id: str | None = None  # the step's run, resumed; None: a fold task (its parent is in extra_env)
    gpu: str | None = None  # local: the GPU this process placed it on (Slurm places jobs itself)
    extra_env: dict[str, str] = field(default_factory=dict)
    log_run: str | None = None  # where the log goes, if not to `run_id`


def run_job(spec: JobSpec) -> None:
    """The body of every job: the step in its run; a non-zero exit fails the job."""
    mlflow.set_tracking_uri(spec.tracking_uri)
    code = run_step(spec.step, spec.params, spec.log, experiment_id=spec.experiment_id, threads=spec.threads,
                    run_id=spec.run_id, gpu=spec.gpu, extra_env=spec.extra_env, log_run=spec.log_run)
    if code != 0:
        raise JobFailed(f"{spec.step} exited with code {code}; its log: {spec.log}")


@dataclass(eq=False)
class Job:
    label: str
    run_id: str  # the step's run (a fold task: its parent's)
    spec: JobSpec
    resources: str  # the line of the profile's slurm section it asks for
    after: list["Job"]
    ends_step: bool = True  # False: a fold task; its step ends with the summary job
    handle: submitit.Job | None = None
    state: str = "queued"  # queued -> submitted -> running -> done | failed | cancelled
    started: float = 0.0

    @property
    def id(self) -> str:
        return str(self.handle.job_id) if self.handle is not None else "-"


@dataclass
class Submission:
    """The workflow's jobs, as main's Workflow submits its steps; `follow` watches them to the end."""
    kind: str  # local | slurm
    slurm: SlurmConfig
    client: MlflowClient
    experiment_id: str
    workflow_run_id: str
    train_folds: str  # train_cv's `folds` (all, or a list): one array task each
    store_folds: int  # folds of a store not made yet (prepare_data's)
    jobs: int = 1  # local: jobs at a time
    slots: Slots = field(default_factory=lambda: Slots([]))
    threads: int = 1  # local: each job's threads (Slurm: the step's cpus)
    say: Callable[[str], None] = print
    all: list[Job] = field(default_factory=list)
    made: dict[str, Job] = field(default_factory=dict)  # run id or store path -> the job that makes it
    timings: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def waits_on(self, params: dict[str, str]) -> bool:
        """True when a param is a run or store a submitted job is still to make (nothing can be reused)."""
        with self._lock:
            return any(str(v) in self.made for v in params.values())

    def submit(self, step: str, params: dict[str, str], label: str, log: Path, after_all: bool = False) -> str:
        """Make the step's run and queue its job(s) after those that make its inputs; returns the run id."""
        run_id = create_step_run(self.client, self.experiment_id, step, params,
                                 {keys.WORKFLOW_RUN: self.workflow_run_id}, run_name=label)
        self.client.update_run(run_id, SCHEDULED)
        with self._lock:
            after = list(self.all) if after_all else \
                list(dict.fromkeys(self.made[str(v)] for v in params.values() if str(v) in self.made))
        spec = JobSpec(step, params, log, self.experiment_id, mlflow.get_tracking_uri(), self.threads, run_id=run_id)
        final = Job(label, run_id, spec, step, after)
        if step == keys.TRAIN_CV:
            tasks = [Job(f"{label} fold {k}", run_id,
                         replace(spec, params={**params, keys.P_FOLDS: str(k), "fold_jobs": "1"}, run_id=None,
                                 log=log.with_name(f"{log.stem}-fold{k}.log"), extra_env={FOLD_JOB_PARENT: run_id},
                                 log_run=run_id), step, after, ends_step=False)
                     for k in self.folds_of(params)]
            self._queue(tasks)
            final.resources, final.after = "default", tasks  # the summary: no GPU, after every fold
        self._queue([final])
        with self._lock:
            self.made[run_id] = final
            if params.get("out"):
                self.made[params["out"]] = final
        return run_id

    def folds_of(self, params: dict[str, str]) -> list[int]:
        """train_cv's folds, one array task each: of its store, or of the store a queued job is to make."""
        data = Path(params["data"])
        made_later = self.waits_on({"data": str(data)}) or not (data / "manifest.json").is_file()
        available = list(range(1, self.store_folds + 1)) if made_later else open_store(data).folds
        return select_folds(params.get(keys.P_FOLDS) or self.train_folds, available)

    def _queue(self, group: list[Job]) -> None:
        """Slurm: submit now (a group of several: one job array). Local: wait for `pump`."""
        with self._lock:
            self.all.extend(group)
        if self.kind == "slurm":
            self._start(group)

    def _start(self, group: list[Job]) -> None:
        first = group[0]
        after = sorted({a.id.split("_")[0] for a in first.after})
        res = self.slurm.resources(first.resources)
        label = first.label.split(" fold ")[0]
        name = label.replace(" ", "_").replace("/", "-")
        ex = executor(self.kind, self.slurm, first.resources, name, after if self.kind == "slurm" else [], len(group))
        for job in group:
            if self.kind == "slurm":
                job.spec.threads = res.cpus
            job.spec.log.parent.mkdir(parents=True, exist_ok=True)
        handles = ex.map_array(run_job, [j.spec for j in group]) if len(group) > 1 else [ex.submit(run_job, first.spec)]
        for job, handle in zip(group, handles):
            job.handle, job.state = handle, "submitted"
            if job.ends_step:
                self.client.set_tag(job.run_id, keys.JOB_ID, job.id)
        where = f" on GPU {first.spec.gpu}" if first.spec.gpu is not None else ""
        ids = first.id.split("_")[0] + (f"_[0-{len(group) - 1}]" if len(group) > 1 else "")
        self.say(f"[main] {label}: {'job array' if len(group) > 1 else 'job'} {ids}{where}"
                 + (f", after {', '.join(after)}" if after and self.kind == "slurm" else "")
                 + f" ({res.gpus} GPU, {res.cpus} CPUs, {res.mem_gb:g} GB, {res.hours:g} h)" * (self.kind == "slurm"))

    def pump(self) -> None:
        """Local: start the queued jobs whose predecessors ended well, `jobs` at a time; cancel those after a failure."""
        for job in list(self.all):
            if job.state != "queued":
                continue
            if any(a.state in ("failed", "cancelled") for a in job.after):
                self._end(job, "cancelled")
            elif all(a.state == "done" for a in job.after) and \
                    sum(j.state in ("submitted", "running") for j in self.all) < self.jobs:
                job.spec.gpu = self.slots.take()
                self._start([job])

    def _end(self, job: Job, state: str) -> None:
        job.state = state
        if self.kind == "local":
            self.slots.give(job.spec.gpu)
        if state != "done" and job.ends_step and \
                self.client.get_run(job.run_id).info.status in (SCHEDULED, RunStatus.to_string(RunStatus.RUNNING)):
            self.client.set_terminated(job.run_id, RunStatus.to_string(
                RunStatus.KILLED if state == "cancelled" else RunStatus.FAILED))

    def follow(self, console: Console, headline: Callable, every: float | None = None) -> None:
        """Watch the jobs to the end with main's console (a line when each starts and ends, a failed one's
        log and last lines); raises JobFailed naming the first failed job's log."""
        every = every if every is not None else (1.0 if self.kind == "local" else 20.0)
        try:
            while any(j.state in ACTIVE for j in self.all):
                if self.kind == "local":
                    self.pump()
                for job in [j for j in self.all if j.state in ("submitted", "running")]:
                    self._watch(job, console, headline)
                time.sleep(every)
        except BaseException:  # Ctrl-C, an error here: local jobs end with this process (Slurm's go on)
            if self.kind == "local":
                self.cancel()
            raise
        failed = [j for j in self.all if j.state == "failed"]
        if failed:
            job = failed[0]
            raise JobFailed(f"step {job.label} failed (run {job.run_id}, job {job.id}); its log: {self._log(job)}")

    def _watch(self, job: Job, console: Console, headline: Callable) -> None:
        state = job.handle.state
        if job.state == "submitted" and state not in ("PENDING", "REQUEUED", "CONFIGURING", "UNKNOWN"):
            job.state, job.started = "running", time.time()
            if job.ends_step:
                console.start(job.label, job.spec.log)
            else:
                console.line(f"[main] {job.label}: started (log {job.spec.log})")
        if not job.handle.done():
            return
        error = job.handle.exception()
        seconds = time.time() - (job.started or time.time())
        if error is None:
            self._end(job, "done")
            self.timings[job.spec.step] = self.timings.get(job.spec.step, 0.0) + seconds
            if job.ends_step:
                console.finish(job.label, headline(self.client, self.client.get_run(job.run_id)), seconds)
            else:
                console.line(f"[main] {job.label}: done ({minutes(seconds)})")
        elif job.state == "submitted" and state.startswith("CANCELLED"):
            self._end(job, "cancelled")  # Slurm cancelled it: a job before it failed
            console.line(f"[main] {job.label}: cancelled (job {job.id}): a job before it failed")
        else:
            self._end(job, "failed")
            console.fail(job.label, self._log(job), job.run_id)

    def cancel(self) -> None:
        """Stop the local jobs that run and drop those queued; their runs end KILLED."""
        for job in self.all:
            if job.state in ("submitted", "running"):
                job.handle.cancel(check=False)
            if job.state in ACTIVE:
                self._end(job, "cancelled")

    @staticmethod
    def _log(job: Job) -> Path:
        """The step's own log, or submitit's output where the step never started."""
        return job.spec.log if job.spec.log.is_file() else Path(job.handle.paths.stdout)

    def job_ids(self) -> str:
        """`<label>=<job id>; ...` of every submitted job (a fold array once)."""
        return "; ".join(dict.fromkeys(f"{j.label.split(' fold ')[0]}={j.id.split('_')[0]}" for j in self.all))
