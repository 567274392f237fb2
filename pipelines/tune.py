"""tune: an Optuna search over the learning rate, every trial a nested MLflow run.

A trial is train_cv's config with only `lr` changed (the `tune` section of a profile overrides
train_cv's values for the trials: a cheap subset of folds and epochs), so the search runs under
the same augmentation, weights and schedule as the classifiers it tunes. Objective: the mean
best validation AUROC over the trial's folds, pruned on the per-epoch validation AUROC.
Storage: a journal file by default (several processes on one machine, `n_workers`), or a
database URL such as PostgreSQL (workers on several machines: start this step with the same
`storage` and `study_name` on each). The study and its MLflow study run resume: run the step
again to extend it to `n_trials` finished trials.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import optuna
import torch
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from analysis import keys
from analysis.plots import plot_study
from data_tools.folds import select_folds
from data_tools.params import param
from data_tools.store import Store, open_store
from models.training import train_fold
from pipelines.children import child_env, thread_share
from pipelines.classifier_runs import parent_params
from pipelines.common import cli_step, log_params, log_store, step_run
from pipelines.config import as_params, build, parser
from pipelines.demo_data import open_data
from pipelines.train_cv import TrainCVConfig

DONE = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class TuneConfig(TrainCVConfig):
    n_trials: int = param("finished trials the study should reach (running it again extends it)", identity=False)
    n_workers: int = param("worker processes on this machine", identity=False)
    storage: str = param("journal file, or a database URL (postgresql://...) for workers on several machines")
    study_name: str = param("Optuna study name (default: lr-<backbone>-<profile>)")
    lr_min: float = param("lower end of the log-uniform learning-rate range")
    lr_max: float = param("upper end of the log-uniform learning-rate range")

    STEP = keys.TUNE
    SECTIONS = (keys.TRAIN_CV, keys.TUNE)

    def __post_init__(self) -> None:
        self.study_name = self.study_name or f"lr-{self.backbone}-{Path(self.profile).stem}"


CONFIG = TuneConfig


def trial_config(cfg: TuneConfig, lr: float) -> TrainCVConfig:
    """The trial's train_cv config: the tune config's train_cv part with only `lr` changed."""
    return dataclasses.replace(TrainCVConfig(**{f.name: getattr(cfg, f.name)
                                                for f in dataclasses.fields(TrainCVConfig)}), lr=lr)


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE whose randomness comes from (seed, trial number). Trial numbers are unique within a
    storage, so workers sharing a study (processes or machines) never draw the same values, a
    resumed study does not repeat its earlier trials, and one worker with a fixed seed repeats
    itself. (A TPESampler(seed) per worker makes every worker draw the same sequence.)"""

    def __init__(self, seed: int):
        self.seed = seed

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, name, distribution):
        seed = int(np.random.default_rng([self.seed, trial.number]).integers(2 ** 31))
        return optuna.samplers.TPESampler(seed=seed).sample_independent(study, trial, name, distribution)


def open_storage(url: str):
    """A journal file path (default) or a database URL (sqlite:///, postgresql://...)."""
    if "://" in url:
        return RDBStorage(url, heartbeat_interval=60, grace_period=120)
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(url))


def load_study(cfg: TuneConfig) -> optuna.Study:
    return optuna.create_study(study_name=cfg.study_name, storage=open_storage(cfg.storage), direction="maximize",
                               load_if_exists=True, sampler=TrialSeededTPE(cfg.seed),
                               pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=DONE))


def objective(trial: optuna.Trial, cfg: TuneConfig, store: Store, study_run_id: str) -> float:
    train_cfg = trial_config(cfg, trial.suggest_float("lr", cfg.lr_min, cfg.lr_max, log=True))
    folds = select_folds(train_cfg.folds, store.folds)
    scores: list[float] = []
    with mlflow.start_run(run_name=f"trial {trial.number}", nested=True, parent_run_id=study_run_id,
                          tags={keys.STEP: keys.TUNE, keys.PROFILE: cfg.profile, keys.TRIAL: str(trial.number)}):
        log_params({**parent_params(train_cfg, store), keys.P_FOLDS: ",".join(map(str, folds))})
        try:
            for i, k in enumerate(folds):
                def report(epoch: int, m, i=i, k=k) -> None:
                    mlflow.log_metrics({keys.fold_metric(k, n): v for n, v in keys.epoch_metrics(m).items()}, step=epoch)
                    # what the trial would score if this fold stopped here: comparable across trials
                    trial.report(float(np.mean(scores + [m.val_auroc])), i * train_cfg.epochs + epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"fold {k} epoch {epoch}")
                with tempfile.TemporaryDirectory() as work:
                    result = train_fold(train_cfg, store, k, None, work, on_epoch=report)
                scores.append(result.best_val_auroc)
                mlflow.log_metric(keys.fold_metric(k, "auroc"), result.best_val_auroc)
        except optuna.TrialPruned:
            mlflow.set_tag(keys.TRIAL_STATE, "PRUNED")
            raise
        value = float(np.mean(scores))
        mlflow.log_metric(keys.OBJECTIVE, value)
        mlflow.set_tag(keys.TRIAL_STATE, "COMPLETE")
    return value


def work(cfg: TuneConfig, study_run_id: str) -> None:
    """One worker: take trials one at a time until the study has n_trials trials finished or
    under way. Counting the running ones keeps workers from all starting the last trial
    (Optuna's MaxTrialsCallback counts finished trials only); two workers that check at the
    same instant can still overshoot by one."""
    store = open_store(cfg.data)
    study = load_study(cfg)
    while len(study.get_trials(deepcopy=False, states=(*DONE, TrialState.RUNNING))) < cfg.n_trials:
        study.optimize(lambda t: objective(t, cfg, store, study_run_id), n_trials=1, gc_after_trial=True)


def study_run(cfg: TuneConfig) -> str:
    """The MLflow run of this study in the current experiment (tagged with its name and
    storage), so that running the step again extends the same study run; "" if none.
    Under `mlflow run` the step always gets the fresh run that MLflow made for it."""
    if os.environ.get("MLFLOW_RUN_ID"):
        return ""
    found = mlflow.search_runs(filter_string=f"tags.`{keys.STUDY_TAG}` = '{cfg.study_name}@{cfg.storage}'",
                               max_results=1, output_format="list")
    return found[0].info.run_id if found else ""


def start_workers(argv: list[str], cfg: TuneConfig, run, threads: int) -> list[subprocess.Popen]:
    """n_workers - 1 more processes on this machine, with the same arguments and `threads` each."""
    env = child_env(run.info.experiment_id, threads=threads)
    return [subprocess.Popen([sys.executable, "-m", "pipelines.tune", *argv, "--worker_of", run.info.run_id,
                              "--storage", cfg.storage, "--study_name", cfg.study_name], env=env)
            for _ in range(cfg.n_workers - 1)]


@cli_step(keys.TUNE)
def main(argv: list[str] | None = None) -> optuna.Study:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser(TuneConfig, __doc__)
    p.add_argument("--worker_of", default="", help=argparse.SUPPRESS)
    args = vars(p.parse_args(argv))
    worker_of = args.pop("worker_of")
    try:
        cfg = build(TuneConfig, args.pop("profile"), **args)
    except ValueError as e:
        p.error(str(e))
    if worker_of:  # a worker process started by the step below
        work(cfg, worker_of)
        return load_study(cfg)

    existing = study_run(cfg)
    with (mlflow.start_run(run_id=existing) if existing else
          step_run(keys.TUNE, cfg.profile, run_name=f"tune {cfg.study_name}",
                   tags={keys.STUDY_TAG: f"{cfg.study_name}@{cfg.storage}", keys.BACKBONE: cfg.backbone})) as run:
        store = open_data(cfg.data, cfg.profile, keys.TUNE)
        if not existing:
            log_params({k: v for k, v in as_params(cfg).items() if k not in ("n_trials", "n_workers", "lr", "device")})
            log_store(store, "training")
        load_study(cfg)  # create it once before the workers race to
        threads = thread_share(cfg.n_workers)  # the workers share the cores
        torch.set_num_threads(threads)
        workers = start_workers(argv, cfg, run, threads)
        work(cfg, run.info.run_id)
        failed = [w.args for w in workers if w.wait() != 0]
        if failed:
            raise RuntimeError(f"{len(failed)} tune worker(s) failed; see their output above")
        study = load_study(cfg)
        best = study.best_trial
        mlflow.log_metrics({keys.BEST_VALUE: best.value, keys.BEST_LR: best.params["lr"],
                            keys.N_TRIALS_DONE: finished_trials(study)})
        mlflow.set_tags({keys.BEST_PARAMS: json.dumps(best.params), keys.BEST_TRIAL: str(best.number)})
        with tempfile.TemporaryDirectory() as tmp:
            plot_study(study, tmp)
            mlflow.log_artifacts(tmp, keys.STUDY_FIGURES_DIR)
    print(f"study {cfg.study_name}: {finished_trials(study)} trials; best mean val AUROC {best.value:.4f} "
          f"at lr {best.params['lr']:.3g} (trial {best.number})")
    print(f"figures: the run's {keys.STUDY_FIGURES_DIR}/; live: pip install optuna-dashboard && "
          f"optuna-dashboard {cfg.storage}")
    return study


if __name__ == "__main__":
    main()
