"""tune: an Optuna search over the learning rate, every trial a nested MLflow run.

Objective: the mean best validation AUROC over the chosen folds, pruned on the per-epoch
validation AUROC. Storage: a journal file by default (several processes on one machine,
`n_workers`), or a database URL such as PostgreSQL (workers on several machines: start
this step with the same `storage` and `study_name` on each). The study and its MLflow
study run resume: run the step again to extend it to `n_trials` finished trials.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import optuna
import torch
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from analysis import keys
from data_tools.store import Store, open_store
from models.training import TrainConfig, train_fold
from pipelines.common import log_params, log_store, step_parser, step_run
from pipelines.profiles import base_profile, resolve
from pipelines.train_cv import parse_folds

STUDY_TAG = "optuna_study"
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class TuneConfig:
    data: str
    backbone: str
    profile: str
    n_trials: int
    n_workers: int
    storage: str
    study_name: str
    lr_min: float
    lr_max: float
    folds: str
    epochs: int
    batch_size: int
    seed: int
    device: str


def open_storage(url: str):
    """A journal file path (default) or a database URL (sqlite:///, postgresql://...)."""
    if "://" in url:
        return RDBStorage(url, heartbeat_interval=60, grace_period=120)
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(url))


def load_study(cfg: TuneConfig) -> optuna.Study:
    return optuna.create_study(study_name=cfg.study_name, storage=open_storage(cfg.storage), direction="maximize",
                               load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=cfg.seed),
                               pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=DONE))


def objective(trial: optuna.Trial, cfg: TuneConfig, store: Store, study_run_id: str) -> float:
    lr = trial.suggest_float("lr", cfg.lr_min, cfg.lr_max, log=True)
    train_cfg = TrainConfig(backbone=cfg.backbone, profile=base_profile(cfg.profile), epochs=cfg.epochs,
                            batch_size=cfg.batch_size, lr=lr, seed=cfg.seed, device=cfg.device)
    folds = parse_folds(cfg.folds, store.folds)
    scores: list[float] = []
    with mlflow.start_run(run_name=f"trial {trial.number}", nested=True, parent_run_id=study_run_id,
                          tags={keys.STEP: keys.TUNE, keys.PROFILE: cfg.profile, "trial": str(trial.number)}):
        mlflow.log_params({"lr": lr})
        try:
            for i, k in enumerate(folds):
                def report(epoch: int, metrics: dict[str, float], i=i, k=k) -> None:
                    step = i * cfg.epochs + epoch
                    mlflow.log_metrics({f"fold{k}_{name}": v for name, v in metrics.items()}, step=epoch)
                    # what the trial would score if this fold stopped here: comparable across trials
                    trial.report(float(np.mean(scores + [metrics[keys.VAL_AUROC]])), step)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"fold {k} epoch {epoch}")
                with tempfile.TemporaryDirectory() as work:
                    result = train_fold(train_cfg, store, k, None, work, on_epoch=report)
                scores.append(result.best_val_auroc)
                mlflow.log_metric(keys.fold_metric(k, "auroc"), result.best_val_auroc)
        except optuna.TrialPruned:
            mlflow.set_tag("trial_state", "PRUNED")
            raise
        value = float(np.mean(scores))
        mlflow.log_metric("objective", value)
        mlflow.set_tag("trial_state", "COMPLETE")
    return value


def work(cfg: TuneConfig, study_run_id: str) -> None:
    """One worker: take trials one at a time until the study has n_trials trials finished or
    under way. Counting the running ones keeps workers from all starting the last trial
    (Optuna's MaxTrialsCallback counts finished trials only); two workers that check at the
    same instant can still overshoot by one."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.n_workers))  # workers share the cores
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
    found = mlflow.search_runs(filter_string=f"tags.`{STUDY_TAG}` = '{cfg.study_name}@{cfg.storage}'",
                               max_results=1, output_format="list")
    return found[0].info.run_id if found else ""


def main(argv: list[str] | None = None) -> optuna.Study:
    p = step_parser(keys.TUNE, __doc__)
    for name in ("data", "backbone", "n_trials", "n_workers", "storage", "study_name", "lr_min", "lr_max", "folds",
                 "epochs", "batch_size", "seed", "device"):
        p.add_argument(f"--{name}", default="")
    p.add_argument("--worker_of", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k not in ("profile", "worker_of")}
    merged = {**resolve(keys.TRAIN_CV, args.profile, {}), **resolve(keys.TUNE, args.profile, given)}
    cfg = TuneConfig(data=merged.get("data") or "stores/demo", backbone=merged["backbone"], profile=args.profile,
                     n_trials=int(merged["n_trials"]), n_workers=int(merged["n_workers"]),
                     storage=merged.get("storage") or "optuna/journal.log",
                     study_name=merged.get("study_name") or f"lr-{merged['backbone']}-{args.profile}",
                     lr_min=float(merged["lr_min"]), lr_max=float(merged["lr_max"]), folds=str(merged["folds"]),
                     epochs=int(merged["epochs"]),
                     batch_size=int(merged["batch_size"]), seed=int(merged["seed"]), device=merged.get("device", "auto"))
    if args.worker_of:  # a worker process started by the step below
        work(cfg, args.worker_of)
        return load_study(cfg)

    existing = study_run(cfg)
    with (mlflow.start_run(run_id=existing) if existing else
          step_run(keys.TUNE, args.profile, run_name=f"tune {cfg.study_name}",
                   tags={STUDY_TAG: f"{cfg.study_name}@{cfg.storage}", keys.BACKBONE: cfg.backbone})) as run:
        store = open_store(cfg.data)
        if not existing:
            log_params({k: v for k, v in asdict(cfg).items() if k not in ("n_trials", "n_workers")})
            log_store(store, "training")
        load_study(cfg)  # create it once before the workers race to
        workers = [subprocess.Popen([sys.executable, "-m", "pipelines.tune", "--profile", args.profile,
                                     "--worker_of", run.info.run_id,
                                     *[a for k, v in given.items() if v != "" for a in (f"--{k}", str(v))],
                                     "--storage", cfg.storage, "--study_name", cfg.study_name],
                                    env={**os.environ, "MLFLOW_EXPERIMENT_ID": run.info.experiment_id})
                   for _ in range(cfg.n_workers - 1)]
        work(cfg, run.info.run_id)
        failed = [w.args for w in workers if w.wait() != 0]
        if failed:
            raise RuntimeError(f"{len(failed)} tune worker(s) failed; see their output above")
        study = load_study(cfg)
        best = study.best_trial
        mlflow.log_metrics({"best_value": best.value, "best_lr": best.params["lr"], "n_trials_done": finished_trials(study)})
        mlflow.set_tag("best_params", json.dumps(best.params))
        mlflow.set_tag("best_trial", str(best.number))
    print(f"study {cfg.study_name}: {finished_trials(study)} trials; best mean val AUROC {best.value:.4f} "
          f"at lr {best.params['lr']:.3g} (trial {best.number})")
    print(f"watch it: optuna-dashboard {'' if '://' in cfg.storage else 'journal:///'}{cfg.storage}")
    return study


if __name__ == "__main__":
    main()
