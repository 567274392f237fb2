"""main: the whole workflow for a profile, each step a child process with its own run, linked to one workflow run.

prepare_data -> generator_pretrain -> generator_finetune -> synthesize -> train_cv for
every backbone x regime (`tune_first`: each backbone's rows with its tune study's best trial)
-> evaluate -> report. A step whose finished run has the same
parameters, code version and data digest is reused, not run again, so a workflow killed
halfway and started again goes on where it stopped. Steps that do not depend on each other
(the stores; the generator chain beside real-only training) run side by side, `jobs` at a time,
each on a GPU of its own where there are several (`devices`, pipelines/placement.py), each with its
share of the cores. The console shows a line per step (its headline result) and one status line;
each step's own output goes to `logs/workflow-<id>/<step>.log`, also logged with the step's run.

`executor=slurm` submits every step as a Slurm job instead, after the jobs it depends on, with the
resources of the profile's `slurm` section, and returns with the job ids (`wait=true`: follows
them with this console); `executor=local` runs those same jobs as processes here
(pipelines/submission.py). Finished steps are reused the same way.
"""
from __future__ import annotations

import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from analysis import keys
from data_tools.errors import ConfigError, UserError
from data_tools.params import param
from data_tools.store import open_store
from pipelines.children import thread_share
from pipelines.common import cli_step, code_version, step_run
from pipelines.config import StepConfig, build, config_class, from_cli
from pipelines.console import Console
from pipelines.demo_data import DEMO, demo_stores
from pipelines.launch import LOGS_DIR, launch
from pipelines.placement import Slots, gpus
from pipelines.preflight import check_paths, check_tracking
from pipelines.prepare_data import PrepareDataConfig
from pipelines.slurm import SlurmConfig
from pipelines.submission import EXECUTORS, PROCESS, SLURM, Submission


@dataclass
class Workflow:
    """Runs steps as child processes with their own runs, linked to one workflow run, reusing
    finished ones; each step's output goes to its log file, the console gets a line per step."""
    profile: str
    parent_run_id: str
    experiment_id: str
    client: MlflowClient = field(default_factory=MlflowClient)
    console: Console | None = None
    logs: Path = Path(LOGS_DIR)
    timings: dict[str, float] = field(default_factory=dict)
    threads: int = field(default_factory=lambda: thread_share(1))  # each step's threads
    slots: Slots = field(default_factory=lambda: Slots([]))  # the GPUs steps side by side are placed on
    submission: Submission | None = None  # steps as jobs of a scheduler (executor=local|slurm)

    def finished_run(self, step: str, params: dict[str, str], data: str | None) -> str | None:
        """The newest finished run of `step` with these params, this code version and data digest."""
        query = (f"tags.`{keys.STEP}` = '{step}' and attributes.status = 'FINISHED' "
                 f"and tags.`{keys.CODE_VERSION}` = '{code_version()}'")
        digest = open_store(data).digest if data else None
        for run in self.client.search_runs([self.experiment_id], query, order_by=["attributes.start_time DESC"]):
            if run.data.tags.get(keys.PARENT_RUN) and keys.WORKFLOW_RUN not in run.data.tags:
                continue  # a nested run inside a step (e.g. a fold), not a step run of its own
            logged = run.data.params
            if all(logged.get(k) == v for k, v in params.items()) and \
                    (digest is None or run.data.tags.get(keys.DATASET_DIGEST) == digest):
                return run.info.run_id
        return None

    def step(self, step: str, data: str | None = None, label: str | None = None, after_all: bool = False,
             **params: str) -> str:
        """Run one entry point (or reuse its finished run); returns the run id. Submitted (executor=local|slurm):
        its job is queued after those that make its inputs (`after_all`: after every job so far) and the run id
        returned at once; a step whose inputs a queued job makes is never reused."""
        params = {"profile": self.profile, **({"data": data} if data else {}),
                  **{k: str(v) for k, v in params.items() if v not in (None, "")}}
        label = label or step
        console = self.console or Console(0)
        pending = self.submission is not None and (self.submission.waits_on(params) or
                                                   (after_all and bool(self.submission.all)))
        reused = None if pending else self.finished_run(step, params, data)
        if reused:
            console.reuse(label, reused)
            return reused
        log = self.logs / f"{label.replace(' ', '_').replace('/', '-')}.log"
        if self.submission is not None:
            return self.submission.submit(step, params, label, log, after_all)
        console.start(label, log)
        start = time.time()
        with self.slots.slot() as gpu:
            run_id, code = launch(self.client, self.experiment_id, step, params,
                                  {keys.WORKFLOW_RUN: self.parent_run_id}, log, self.threads, gpu)
        seconds = time.time() - start
        self.timings[step] = self.timings.get(step, 0.0) + seconds
        if code != 0:
            console.fail(label, log, run_id)
            raise StepFailed(f"step {label} failed (run {run_id}); its log: {log}")
        console.finish(label, headline(self.client, self.client.get_run(run_id)), seconds)
        return run_id


class StepFailed(UserError):
    """A step of the workflow ended with an error (its log names it)."""


def headline(client: MlflowClient, run) -> str:
    """The one result a person looks for when a step ends."""
    m, step = run.data.metrics, run.data.tags.get(keys.STEP)
    if step == keys.GENERATOR_FINETUNE:  # its numbers are on the fold runs
        folds = client.search_runs([run.info.experiment_id], f"tags.`{keys.PARENT_RUN}` = '{run.info.run_id}'")
        losses = [f.data.metrics[keys.DIT_LOSS] for f in folds if keys.DIT_LOSS in f.data.metrics]
        return f"{len(folds)} fold generators" + (f", mean DiT loss {sum(losses) / len(losses):.4f}" if losses else "")
    pct = lambda name: f"{100 * m[name]:.1f}"  # noqa: E731
    if step == keys.TRAIN_CV and keys.CV_AUROC_MEAN in m:
        return f"CV AUROC {pct(keys.CV_AUROC_MEAN)} ± {pct(keys.CV_AUROC_STD)}, BA {pct(keys.CV_BA_MEAN)}"
    test = {n: keys.TEST_PREFIX + n for n in ("auroc", "ba")}
    if step == keys.EVALUATE and test["auroc"] in m:
        return f"test AUROC {pct(test['auroc'])}, BA {pct(test['ba'])} on {run.data.tags.get(keys.TEST_SET, 'the test set')}"
    if step == keys.PREPARE_DATA and keys.N_IMAGES in m:
        return f"{int(m[keys.N_IMAGES])} crops"
    if step == keys.TUNE and keys.BEST_VALUE in m:
        return f"best mean val AUROC {pct(keys.BEST_VALUE)} (trial {run.data.tags.get(keys.BEST_TRIAL)})"
    if step == keys.GENERATOR_PRETRAIN and keys.DIT_LOSS in m:
        return f"DiT loss {m[keys.DIT_LOSS]:.4f}"
    kid = keys.quality_metric(keys.KID, "atypical")
    if step == keys.SYNTHESIZE and kid in m:
        return f"KID (atypical) {m[kid]:.4f}"
    if step == keys.REPORT and keys.SELECTED_ROW in run.data.tags:
        return f"tables written; submission: {run.data.tags[keys.SELECTED_ROW]}"
    return "finished"


@dataclass
class MainConfig(StepConfig):
    data: str = param("an existing real store (skips prepare_data)")
    source: str = param("raw source for prepare_data (default: the profile's)")
    root: str = param("where the raw source lies")
    test_data: str = param("test store for evaluate (demo: a held-out demo store)")
    pool: str = param("store the generator is pretrained on (demo: a separate demo pool; paper: the unlabelled WSI "
                      "pool from prepare_data source=sliderunner|midogpp)")
    stores: str = param("folder for the stores the workflow writes")
    backbones: str = param("comma-separated backbones, one train_cv row per backbone and regime")
    regimes: str = param("comma-separated regimes trained for each backbone: real_only,synth_balanced (the paper's "
                         "comparison) or real_only alone (no generator: a baseline first)")
    jobs: str = param("steps run side by side when they do not depend on each other: auto (one per GPU of "
                      "`devices`; on a CPU 2) or a number", identity=False)
    devices: str = param("GPUs the steps side by side are placed on, round-robin: auto (every visible GPU) or a "
                         "list such as 0,1,3", identity=False)
    executor: str = param("process (each step a child process of main, here) | slurm (each step a Slurm job "
                          "through submitit, resources from the profile's slurm section) | local (those jobs as "
                          "processes here)", choices=EXECUTORS, identity=False)
    wait: bool = param("executor=slurm: follow the jobs to the end with main's console (false: return once they are "
                       "queued, with their ids)", identity=False)
    tune_first: bool = param("run tune for each backbone first and train every row with its study's best trial "
                             "(train_cv from_study)")
    pool_size: int = param("demo: crops of the generator's pretraining pool")
    test_size: int = param("demo: crops of the held-out test store")

    STEP = keys.MAIN

    def __post_init__(self) -> None:
        if not self.regime_list or set(self.regimes.split(",")) - set(keys.REGIMES):
            raise ConfigError(f"regimes={self.regimes!r}: give one or more of {','.join(keys.REGIMES)}")

    @property
    def regime_list(self) -> list[str]:
        return [r for r in keys.REGIMES if r in self.regimes.split(",")] if self.regimes else []

    @property
    def synthetic(self) -> bool:
        """Whether the generator chain runs (a synth_balanced row needs it)."""
        return keys.SYNTH_BALANCED in self.regime_list


CONFIG = MainConfig


def prepare_stores(flow: Workflow, pool: ThreadPoolExecutor, cfg: MainConfig) -> tuple[str, str, str]:
    """(CV store, test store, generator pool): given, or built by prepare_data (the demo builds all three).
    The stores folder is the workflow's own: a store it rebuilds (new code, other parameters) replaces the old."""
    prep = build(PrepareDataConfig, cfg.profile, source=cfg.source, root=cfg.root)
    stores = Path(cfg.stores).resolve()
    data, test_data, gen_pool = cfg.data, cfg.test_data, cfg.pool
    demo = demo_stores(stores, prep.seed, prep.split, cfg.test_size, cfg.pool_size) if prep.source == DEMO else {}
    todo = []
    if not data:
        data = str(stores / (prep.source + ("_lodo" if prep.split == keys.LODO else "")))
        todo.append(pool.submit(flow.step, keys.PREPARE_DATA, label=f"prepare_data {Path(data).name}",
                                source=prep.source, root=prep.root, out=data, overwrite="true"))
    if not test_data and demo:  # a held-out demo set: other seed, no CV pool
        path, params = demo["test"]
        test_data = str(path)
        todo.append(pool.submit(flow.step, keys.PREPARE_DATA, label="prepare_data demo_test", out=test_data,
                                overwrite="true", **params))
    if not gen_pool and demo and cfg.synthetic:  # pretraining never sees the CV pool: a pool of its own
        path, params = demo["pool"]
        gen_pool = str(path)
        todo.append(pool.submit(flow.step, keys.PREPARE_DATA, label="prepare_data demo_pool", out=gen_pool,
                                overwrite="true", **params))
    for done in todo:
        done.result()
    return data, test_data, gen_pool or outside_pool(cfg)


def outside_pool(cfg: MainConfig) -> str:
    """The generator's pretraining pool when main does not build it (given, or the profile's), checked
    before any step runs; "" when the demo builds one."""
    prep = build(PrepareDataConfig, cfg.profile, source=cfg.source, root=cfg.root)
    if not cfg.synthetic:
        return ""
    pool = cfg.pool or ("" if prep.source == DEMO else build(config_class(keys.GENERATOR_PRETRAIN), cfg.profile).data)
    if pool and not Path(pool).joinpath("manifest.json").is_file():
        raise SystemExit(f"no generator pretraining pool at {pool!r}: build one first, e.g. "
                         f"mlflow run . -e prepare_data -P source=sliderunner -P root=<db.sqlite> -P out={pool}")
    return pool


def side_by_side(jobs: str, on: list[str]) -> int:
    """Steps at a time: `auto` is one per GPU, or on a CPU 2 (the generator chain beside real-only training)."""
    if jobs == "auto":
        return len(on) or 2
    if not jobs.isdigit() or int(jobs) < 1:
        raise ConfigError(f"jobs={jobs!r}: give auto or a number of steps at a time, e.g. jobs=2")
    return int(jobs)


def submission(cfg: MainConfig, flow: Workflow, jobs: int, on: list[str], console: Console) -> Submission:
    """The scheduler's side of the workflow (executor=local|slurm): its folders absolute (a job starts
    elsewhere), train_cv's folds, and here `jobs` at a time on the GPUs `on`."""
    slurm = build(SlurmConfig, cfg.profile)
    slurm.folder = str(Path(slurm.folder).resolve())
    prep = build(PrepareDataConfig, cfg.profile, source=cfg.source, root=cfg.root)
    return Submission(cfg.executor, slurm, flow.client, flow.experiment_id, flow.parent_run_id,
                      build(config_class(keys.TRAIN_CV), cfg.profile).folds, prep.folds, jobs=jobs, slots=Slots(on),
                      threads=thread_share(jobs), say=console.line)


def check_before_submitting(cfg: MainConfig) -> None:
    """executor=slurm: what a job on another node needs, checked before anything is queued (pipelines/preflight.py)."""
    check_paths({name: getattr(cfg, name) for name in ("data", "test_data", "pool", "root")},
                {"stores": cfg.stores})
    check_tracking(mlflow.get_tracking_uri())


def generator(flow: Workflow, gen_pool: str, data: str) -> str:
    """pretrain -> per-fold finetune -> synthesize; returns the synthesize run id."""
    pretrain = flow.step(keys.GENERATOR_PRETRAIN, data=gen_pool)
    finetune = flow.step(keys.GENERATOR_FINETUNE, data=data, pretrain_run_id=pretrain)
    return flow.step(keys.SYNTHESIZE, finetune_run_id=finetune)


def classifier(flow: Workflow, data: str, test_data: str, backbone: str, regime: str, synth: str = "",
               study: str = "") -> None:
    """train_cv for one backbone x regime (with a tune study's best trial, if any), then its evaluation."""
    row = f"{backbone}/{regime}"
    train = flow.step(keys.TRAIN_CV, data=data, label=f"train_cv {row}", backbone=backbone, regime=regime,
                      synth_run_id=synth, from_study=study)
    if test_data:
        flow.step(keys.EVALUATE, label=f"evaluate {row}", train_run_id=train, test_data=test_data)


def planned_steps(cfg: MainConfig) -> int:
    """How many steps the workflow runs (or reuses): stores, generator chain, rows, evaluations, report."""
    demo = build(PrepareDataConfig, cfg.profile, source=cfg.source, root=cfg.root).source == "demo"
    rows = len(cfg.regime_list) * len(cfg.backbones.split(","))
    stores = (not cfg.data) + (demo and not cfg.test_data) + (demo and cfg.synthetic and not cfg.pool)
    tunes = len(cfg.backbones.split(",")) if cfg.tune_first else 0
    return stores + 3 * cfg.synthetic + tunes + rows + (rows if cfg.test_data or demo else 0) + 1


def comparison_url(ui: str, experiment_id: str) -> str:
    """The MLflow UI's runs table of the evaluate runs (one per backbone x regime x test set, each with
    its row's CV summary and its test metrics), best test BA first."""
    query = urllib.parse.urlencode({"searchFilter": f"tags.{keys.STEP} = '{keys.EVALUATE}'",
                                    "orderByKey": f"metrics.`{keys.TEST_PREFIX}ba`", "orderByAsc": "false"})
    return f"{ui}/#/experiments/{experiment_id}/runs?{query}"


def print_report(client: MlflowClient, report_run_id: str) -> None:
    """The report step's tables, on main's console (the step's own output is in its log)."""
    path = client.download_artifacts(report_run_id, keys.REPORT_MD)
    print("\n" + Path(path).read_text())


@cli_step(keys.MAIN)
def main(argv: list[str] | None = None) -> str:
    cfg = from_cli(MainConfig, argv, __doc__)
    if Path(cfg.profile).is_file():  # steps run in the project folder: give them the file's absolute path
        cfg.profile = str(Path(cfg.profile).resolve())
    cfg.stores = str(Path(cfg.stores).resolve())  # the workflow's own folder, wherever its steps run
    on = gpus(cfg.devices)
    jobs = side_by_side(cfg.jobs, on)
    submitting = cfg.executor != PROCESS
    outside_pool(cfg)
    if cfg.executor == SLURM:
        check_before_submitting(cfg)
    started = time.time()
    with step_run(keys.MAIN, cfg.profile, run_name=f"workflow {cfg.profile}") as run, \
            Console(planned_steps(cfg)) as console:
        logs = Path(LOGS_DIR) / f"workflow-{run.info.run_id[:8]}"
        flow = Workflow(cfg.profile, run.info.run_id, run.info.experiment_id, console=console,
                        logs=logs.resolve() if submitting else logs, threads=thread_share(jobs), slots=Slots(on))
        if submitting:
            flow.submission = submission(cfg, flow, jobs, on, console)
        experiment = flow.client.get_experiment(run.info.experiment_id).name
        console.line(f"[main] workflow {run.info.run_id} ({console.total} steps) in experiment {experiment!r}; "
                     f"each step's output: {flow.logs}/")
        mlflow.log_params({keys.P_JOBS: jobs, keys.P_EXECUTOR: cfg.executor})
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            try:
                data, test_data, gen_pool = prepare_stores(flow, pool, cfg)
                # the generator chain is the longest path: it goes first, real-only training beside it
                synth = pool.submit(generator, flow, gen_pool, data) if cfg.synthetic else None
                backbones = cfg.backbones.split(",")
                studies = {b: pool.submit(flow.step, keys.TUNE, data=data, label=f"tune {b}", backbone=b)
                           for b in backbones if cfg.tune_first}
                studies = {b: studies[b].result() if b in studies else "" for b in backbones}
                arms = [pool.submit(classifier, flow, data, test_data, b, keys.REAL_ONLY, study=studies[b])
                        for b in backbones if keys.REAL_ONLY in cfg.regime_list]
                arms += [pool.submit(classifier, flow, data, test_data, b, keys.SYNTH_BALANCED, synth.result(),
                                     studies[b]) for b in backbones if synth]
                for arm in arms:
                    arm.result()
            except BaseException:  # a failed step: what has not started never starts; running steps finish
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        report = flow.step(keys.REPORT, after_all=True)
        if submitting:
            mlflow.set_tag(keys.SUBMITTED_JOBS, flow.submission.job_ids()[:5000])
            if cfg.executor == SLURM and not cfg.wait:
                print(f"[main] submitted {len(flow.submission.all)} job(s): {flow.submission.job_ids() or 'none'}; "
                      f"follow them with squeue --me, their runs in MLflow (workflow {run.info.run_id}); "
                      f"each job's output: {flow.logs}/")
                return run.info.run_id
            flow.submission.follow(console, headline)
            flow.timings = flow.submission.timings
        mlflow.log_metrics({keys.seconds_metric(k): v for k, v in flow.timings.items()})
        mlflow.log_metric(keys.SECONDS_TOTAL, time.time() - started)
    print_report(flow.client, report)
    print(f"[main] workflow finished in {time.time() - started:.0f} s. Open the results with:\n"
          f"  mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}\n"
          f"and the regimes side by side (Columns: {keys.CV_AUROC_MEAN}, {keys.CV_AUROC_STD}, {keys.TEST_PREFIX}ba; "
          f"Group by: {keys.BACKBONE}, {keys.REGIME}):\n  {comparison_url('http://127.0.0.1:5000', run.info.experiment_id)}")
    return run.info.run_id


if __name__ == "__main__":
    main()
