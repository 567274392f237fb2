"""tune: an Optuna search over train_cv's recipe (the learning rate by default), every trial a nested MLflow run.

A trial is train_cv's config with only the searched fields changed (`space`, e.g.
`lr,focal_gamma=0.5:3,lora_rank=4|8|16`: pipelines/search_space.py; the `tune` section of a
profile overrides train_cv's values for the trials: a cheap subset of folds and epochs), so the
search runs under the same augmentation, weights and schedule as the classifiers it tunes.
Objective: the mean best validation AUROC over the trial's folds, pruned on the per-epoch
validation AUROC. The first trial of a new study is the profile's own values (the baseline the
search must beat); `train_cv -P from_study=<study>` trains with the best trial's.
Storage: a journal file by default (several processes on one machine, `n_workers`), or a
database URL such as PostgreSQL (workers on several machines: start this step with the same
`storage` and `study_name` on each). The study and its MLflow study run resume: run the step
again to extend it to `n_trials` finished trials. A study stores what makes its trials
comparable (data, backbone, space, the fixed fields) and refuses to be reopened with anything
else; trials left RUNNING by a worker of this host that was killed are failed and queued again.
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
from typing import Any

import mlflow
import numpy as np
import optuna
import torch
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from analysis import keys
from analysis.plots import plot_study
from data_tools.errors import ConfigError
from data_tools.folds import select_folds
from data_tools.params import param
from data_tools.store import Store, open_store
from models.training import train_fold
from pipelines.children import child_env, thread_share
from pipelines.classifier_runs import parent_params
from pipelines.common import cli_step, log_params, log_store, step_run
from pipelines.config import as_params, build, parser
from pipelines.demo_data import open_data
from pipelines.orphans import gone, process_tags
from pipelines.search_space import baseline, parse_space, space_text
from pipelines.train_cv import TrainCVConfig

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
# trial user attributes: the trial it repeats; the profile's values; created past n_trials (failed at once)
RETRY_OF, BASELINE, SURPLUS = "retry_of", "baseline", "surplus"


@dataclass
class TuneConfig(TrainCVConfig):
    n_trials: int = param("finished trials the study should reach (running it again extends it)", identity=False)
    n_workers: int = param("worker processes on this machine", identity=False)
    storage: str = param("journal file, or a database URL (postgresql://...) for workers on several machines")
    study_name: str = param("Optuna study name (default: <searched fields>-<backbone>-<profile>, e.g. "
                            "lr-convnext-demo)")
    space: str = param("the searched train_cv fields: lr (lr_min:lr_max, log), lo:hi[:log] ranges, a|b|c choices, "
                       "e.g. lr,focal_gamma=0.5:3,lora_rank=4|8|16,augment=flips|strong")
    lr_min: float = param("lower end of the log-uniform learning-rate range (a bare `lr` in space)")
    lr_max: float = param("upper end of the log-uniform learning-rate range (a bare `lr` in space)")

    STEP = keys.TUNE
    SECTIONS = (keys.TRAIN_CV, keys.TUNE)

    def __post_init__(self) -> None:
        if self.from_study:
            raise ConfigError("tune searches; from_study is train_cv's (train with a study's best trial)")
        self.dimensions = parse_space(self.space, (self.lr_min, self.lr_max))
        fields = "+".join(d.name for d in self.dimensions)
        self.study_name = self.study_name or f"{fields}-{self.backbone}-{Path(self.profile).stem}"


CONFIG = TuneConfig


def train_part(cfg: TuneConfig) -> TrainCVConfig:
    return TrainCVConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainCVConfig)})


def trial_config(cfg: TuneConfig, values: dict[str, Any]) -> TrainCVConfig:
    """The trial's train_cv config: the tune config's train_cv part with only the sampled fields changed."""
    return dataclasses.replace(train_part(cfg), **values)


def profile_values(cfg: TuneConfig) -> dict[str, Any]:
    """The searched fields' values without a search (lr: the backbone's default when the profile has none)."""
    train = train_part(cfg)
    return {d.name: train.learning_rate() if d.name == "lr" else getattr(train, d.name) for d in cfg.dimensions}


def comparable(cfg: TuneConfig, store: Store) -> dict[str, str]:
    """What makes two trials comparable: the data, the space, the folds and every fixed identity field."""
    searched = {d.name for d in cfg.dimensions}
    fixed = {k: v for k, v in as_params(train_part(cfg), identity_only=True).items() if k not in searched}
    return {"data_digest": store.digest, "space": space_text(cfg.dimensions), "folds": cfg.folds, **fixed}


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


def trial_run_ids(trial: FrozenTrial) -> list[str]:
    """The trial's MLflow run: its user attribute names it, unless the worker died between starting
    the run and recording it; then the RUNNING trial run of that process (host, pid, start time)."""
    if trial.user_attrs.get(keys.TRIAL_RUN_ID):
        return [trial.user_attrs[keys.TRIAL_RUN_ID]]
    where = {k: trial.user_attrs.get(k) for k in (keys.HOST, keys.PID, keys.PROCESS_START)}
    if not all(where.values()):
        return []
    query = " and ".join([f"tags.`{keys.STEP}` = '{keys.TUNE}'", f"tags.`{keys.TRIAL}` = '{trial.number}'",
                          "attributes.status = 'RUNNING'", *(f"tags.`{k}` = '{v}'" for k, v in where.items())])
    return [r.info.run_id for r in mlflow.search_runs(search_all_experiments=True, filter_string=query,
                                                      output_format="list")]


def end_trial_run(trial: FrozenTrial, state: str = "FAILED") -> None:
    """End a dead trial's MLflow run as FAILED."""
    client = MlflowClient()
    for run_id in trial_run_ids(trial):
        client.set_tag(run_id, keys.TRIAL_STATE, "FAIL")
        client.set_terminated(run_id, state)


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's RDB heartbeat failed a trial whose worker stopped beating (another machine's):
    end its MLflow run and queue its values again, as for a dead worker of this host."""
    end_trial_run(trial)
    study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})


def open_storage(url: str):
    """A journal file path (default) or a database URL (sqlite:///, postgresql://...)."""
    if "://" in url:
        return RDBStorage(url, heartbeat_interval=60, grace_period=120, failed_trial_callback=requeue)
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(url))


def load_study(cfg: TuneConfig) -> optuna.Study:
    return optuna.create_study(study_name=cfg.study_name, storage=open_storage(cfg.storage), direction="maximize",
                               load_if_exists=True, sampler=TrialSeededTPE(cfg.seed),
                               pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=DONE))


def check_comparable(study: optuna.Study, cfg: TuneConfig, wanted: dict[str, str]) -> None:
    """A new study records what its trials share; reopening it with anything else is refused."""
    stored = {k: v for k, v in study.user_attrs.items() if k in wanted}
    if not stored:
        for k, v in wanted.items():
            study.set_user_attr(k, v)
        return
    diff = [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in wanted.items() if stored.get(k) != v]
    if diff:
        raise ConfigError(f"study {cfg.study_name} in {cfg.storage} was made with other settings ({'; '.join(diff)}): "
                          f"its trials would not be comparable; give a new study_name (or the study's settings)")


def recover_dead_trials(study: optuna.Study) -> None:
    """Trials left RUNNING by a worker of this host that is gone: FAIL, their MLflow runs FAILED,
    their values queued again, so the study still ends with n_trials finished trials."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    dead = [t for t in running if gone(t.user_attrs)]
    for trial in dead:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        end_trial_run(trial)
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
    if dead:
        print(f"tune: trial(s) {[t.number for t in dead]} were left RUNNING by workers that are gone: failed, their "
              f"runs ended FAILED, their values queued again", flush=True)
    elsewhere = [t for t in running if t.user_attrs.get(keys.HOST) != process_tags()[keys.HOST]]
    if elsewhere:
        hosts = ", ".join(sorted({str(t.user_attrs.get(keys.HOST, "an unknown host")) for t in elsewhere}))
        print(f"tune: {len(elsewhere)} trial(s) RUNNING on {hosts}: left alone (if their workers are gone, see "
              f"docs/steps.md, 'Trials left RUNNING')", flush=True)


def prepare_study(cfg: TuneConfig, store: Store) -> optuna.Study:
    """Once, before the workers start: create or check the study, recover dead trials, and queue the
    profile's values as the first trial of a new study."""
    study = load_study(cfg)
    check_comparable(study, cfg, comparable(cfg, store))
    recover_dead_trials(study)
    if not study.get_trials(deepcopy=False):
        values = baseline(cfg.dimensions, profile_values(cfg))
        study.enqueue_trial(values, user_attrs={BASELINE: True})
        print(f"tune: trial 0 is the profile's recipe ({', '.join(f'{k}={v}' for k, v in values.items())})", flush=True)
    return study


class Surplus(Exception):
    """The study already had n_trials finished or running when this trial was created."""


def objective(trial: optuna.Trial, cfg: TuneConfig, store: Store, study_run_id: str) -> float:
    ahead = [t for t in trial.study.get_trials(deepcopy=False, states=(*DONE, TrialState.RUNNING, TrialState.WAITING))
             if t.number < trial.number]
    if len(ahead) >= cfg.n_trials:  # another worker took the last trial at the same instant
        trial.set_user_attr(SURPLUS, True)
        raise Surplus(f"trial {trial.number}: the study already has {cfg.n_trials} trials")
    train_cfg = trial_config(cfg, {d.name: d.suggest(trial) for d in cfg.dimensions})
    folds = select_folds(train_cfg.folds, store.folds)
    scores: list[float] = []
    for name, value in process_tags().items():  # first: a worker killed from here on is found by its trial
        trial.set_user_attr(name, value)
    with mlflow.start_run(run_name=f"trial {trial.number}", nested=True, parent_run_id=study_run_id,
                          log_system_metrics=True,
                          tags={keys.STEP: keys.TUNE, keys.PROFILE: cfg.profile, keys.TRIAL: str(trial.number),
                                **process_tags()}) as run:
        trial.set_user_attr(keys.TRIAL_RUN_ID, run.info.run_id)
        log_params({**as_params(train_cfg), **parent_params(train_cfg, store), keys.P_FOLDS: ",".join(map(str, folds))})
        try:
            for i, k in enumerate(folds):
                def report(epoch: int, m, i=i, k=k) -> None:
                    mlflow.log_metrics({keys.fold_metric(k, n): v for n, v in keys.epoch_metrics(m).items()},
                                       step=epoch)
                    # what the trial would score if this fold stopped here: comparable across trials
                    trial.report(float(np.mean(scores + [m.val_auroc])), i * train_cfg.epochs + epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"fold {k} epoch {epoch}")
                with tempfile.TemporaryDirectory() as work:
                    result = train_fold(train_cfg, store, k, None, work, on_epoch=report)
                scores.append(result.best_val_auroc)
                mlflow.log_metric(keys.fold_metric(k, "auroc"), result.best_val_auroc)
        except optuna.TrialPruned as stopped:
            pruned = stopped  # raised once the run has ended FINISHED: pruning is a result, not a failure
            mlflow.set_tag(keys.TRIAL_STATE, "PRUNED")
        else:
            pruned = None
            mlflow.log_metric(keys.OBJECTIVE, float(np.mean(scores)))
            mlflow.set_tag(keys.TRIAL_STATE, "COMPLETE")
    if pruned:
        raise pruned
    return float(np.mean(scores))


def work(cfg: TuneConfig, study_run_id: str) -> None:
    """One worker: take trials one at a time until the study has n_trials trials finished or
    under way (counting the running ones keeps workers from all starting the last trial; of two
    that create it at the same instant, the later-numbered one stops as surplus)."""
    store = open_store(cfg.data)
    study = load_study(cfg)
    while len(study.get_trials(deepcopy=False, states=(*DONE, TrialState.RUNNING))) < cfg.n_trials:
        study.optimize(lambda t: objective(t, cfg, store, study_run_id), n_trials=1, gc_after_trial=True,
                       catch=(Surplus,))


def log_importances(study: optuna.Study) -> None:
    """Optuna's importance of each searched field, as study-run metrics (two or more fields, two trials)."""
    names = {n for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) for n in t.params}
    if len(names) < 2 or len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return
    importances = optuna.importance.get_param_importances(study)
    mlflow.log_metrics({keys.IMPORTANCE_PREFIX + name: float(v) for name, v in importances.items()})


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


def finish_after_dead_workers(workers: list[subprocess.Popen], cfg: TuneConfig, study_run_id: str) -> None:
    """Wait for the other workers; the trials of any that died are queued again and finished here."""
    dead = [w for w in workers if w.wait() != 0]
    if dead:
        print(f"tune: {len(dead)} worker(s) ended with exit code(s) {[w.returncode for w in dead]}; "
              f"finishing the study here", flush=True)
        recover_dead_trials(load_study(cfg))
        work(cfg, study_run_id)


def log_result(study: optuna.Study) -> FrozenTrial:
    """The study run's summary: the best trial's value, number and values, importances, figures."""
    best = study.best_trial
    mlflow.log_metrics({keys.BEST_VALUE: best.value, keys.N_TRIALS_DONE: finished_trials(study),
                        **({keys.BEST_LR: best.params["lr"]} if "lr" in best.params else {})})
    mlflow.set_tags({keys.BEST_PARAMS: json.dumps(best.params), keys.BEST_TRIAL: str(best.number)})
    log_importances(study)
    with tempfile.TemporaryDirectory() as tmp:
        plot_study(study, tmp)
        mlflow.log_artifacts(tmp, keys.STUDY_FIGURES_DIR)
    return best


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

    store = open_data(cfg.data, cfg.profile, keys.TUNE)
    study = prepare_study(cfg, store)  # before any run: a refused study leaves its study run as it was
    existing = study_run(cfg)
    with (mlflow.start_run(run_id=existing, tags=process_tags()) if existing else
          step_run(keys.TUNE, cfg.profile, run_name=f"tune {cfg.study_name}",
                   tags={keys.STUDY_TAG: f"{cfg.study_name}@{cfg.storage}", keys.BACKBONE: cfg.backbone})) as run:
        if not existing:
            log_params({k: v for k, v in as_params(cfg).items()
                        if k not in ("n_trials", "n_workers", "lr", "device", "from_study")})
            log_store(store, "training")
        threads = thread_share(cfg.n_workers)  # the workers share the cores
        torch.set_num_threads(threads)
        workers = start_workers(argv, cfg, run, threads)
        work(cfg, run.info.run_id)
        finish_after_dead_workers(workers, cfg, run.info.run_id)
        study = load_study(cfg)
        best = log_result(study)
    values = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    print(f"study {cfg.study_name}: {finished_trials(study)} trials; best mean val AUROC {best.value:.4f} "
          f"at {values} (trial {best.number}); train with it: mlflow run . -e train_cv -P backbone={cfg.backbone} "
          f"-P from_study={run.info.run_id}")
    print(f"figures: the run's {keys.STUDY_FIGURES_DIR}/; live: pip install optuna-dashboard && "
          f"optuna-dashboard {cfg.storage}")
    return study


if __name__ == "__main__":
    main()
