"""train_cv: k-fold cross-validation of one backbone in one regime.

MLflow (docs/DESIGN.md, "MLflow runs"): a parent run named "<backbone> / <regime>" with one
nested run "fold k" per fold; per-epoch curves, the best checkpoint and the validation
predictions per fold; fold and mean / population-SD summaries on the parent.

Fold jobs started separately join one parent (pipelines.joining, by a key over the config's
identity fields, the data digest and the code version); the same command run again skips
finished folds and resumes an unfinished one.

Work folder: `<workroot>/<key>/fold<k>` (default `./.train_cv_work`), on local disk, not in the
artifact store: per-epoch state is large and written often. A killed fold resumes from it; a
finished fold keeps its best checkpoint and history there, so that a new parent with the same
key (a fresh `mlflow run`) logs it again without training.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from analysis import keys, runs
from data_tools.errors import ConfigError
from data_tools.folds import select_folds
from data_tools.provenance import check_synthetic_for_fold
from data_tools.params import param
from data_tools.store import Store, open_store
from models.checkpoint import resolve_device
from models.metrics import mean_and_population_sd
from models.training import FoldResult, TrainConfig, train_fold
from pipelines.common import (cli_step, code_version, log_params, log_store, mark_training_experiment, shared_write,
                              step_description)
from pipelines.classifier_runs import parent_params
from pipelines.config import StepConfig, as_params, from_cli, identity
from pipelines.demo_data import open_data
from pipelines.fold_jobs import FOLD_JOB_PARENT, run_fold_jobs
from pipelines.fold_model import log_fold_model, validation_dataset
from pipelines.joining import open_parent
from pipelines.orphans import end_orphaned_runs, process_tags
from pipelines.placement import device_tag, gpus


@dataclass
class TrainCVConfig(StepConfig, TrainConfig):
    data: str = param("real store folder (made by prepare_data); its digest identifies the data", identity=False)
    regime: str = param("real_only | synth_balanced", choices=keys.REGIMES)
    synth_run_id: str = param("synthesize run whose fold k store is added to fold k's training split (synth_balanced)")
    folds: str = param("all, or a list such as 1,3 (jobs with other folds join the same parent)", identity=False)
    fold_jobs: int = param("folds trained at a time, each in its own process, spread over `devices` (a CPU's cores "
                           "are shared out)", identity=False)
    devices: str = param("GPUs the fold jobs are placed on, round-robin: auto (every visible GPU) or a list such as "
                         "0,1,3; several jobs share a GPU when there are more jobs than GPUs", identity=False)
    workroot: str = param("local folder for the resumable fold state", identity=False)
    from_study: str = param("a tune run id or study name: train with its best trial's values of the searched fields "
                            "(values given explicitly win)", identity=False)

    STEP = keys.TRAIN_CV


CONFIG = TrainCVConfig


def run_name(cfg: TrainCVConfig) -> str:
    return f"{cfg.backbone} / {cfg.regime}"


def synthetic_stores(cfg: TrainCVConfig, real: Store, folds: list[int]) -> dict[int, Store]:
    """Fold k's synthetic store from the `synthesize` run, checked against fold k before any training
    (the one check: train_fold trusts the stores it is given)."""
    if cfg.regime == keys.REAL_ONLY:
        if cfg.synth_run_id:
            raise ConfigError("synth_run_id is only used with regime=synth_balanced")
        return {}
    if not cfg.synth_run_id:
        raise ConfigError("regime=synth_balanced needs synth_run_id (a finished synthesize run)")
    params = runs.get_run(MlflowClient(), cfg.synth_run_id, keys.SYNTHESIZE).data.params
    stores = {}
    for k in folds:
        path = params.get(keys.synth_store_param(k))
        if not path:
            raise ConfigError(f"synthesize run {cfg.synth_run_id} has no store for fold {k} "
                             f"(param {keys.synth_store_param(k)}); it made folds {keys.synth_store_folds(params)}")
        stores[k] = open_store(path)
        check_synthetic_for_fold(stores[k], real, k)
    return stores


def experiment_key(cfg: TrainCVConfig, store: Store) -> str:
    """What makes two invocations the same experiment: never the folds asked for, the device or paths."""
    ident = {**identity(cfg), "lr": cfg.learning_rate(), "spec": cfg.spec().to_dict(), "data": store.digest,
             "code": code_version()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


def update_summary(client: MlflowClient, parent_id: str) -> dict[str, float]:
    """fold{k}_auroc / fold{k}_ba and the mean and population SD over the finished folds, on the
    parent. Logged at step = number of folds, so concurrent jobs leave the most complete as latest."""
    best = {k: (r.data.metrics[keys.BEST_VAL_AUROC], r.data.metrics[keys.BEST_VAL_BA])
            for k, r in runs.fold_runs(client, parent_id).items() if keys.BEST_VAL_AUROC in r.data.metrics}
    if not best:
        return {}
    summary = {}
    for k, (auroc, ba) in best.items():
        summary[keys.fold_metric(k, "auroc")], summary[keys.fold_metric(k, "ba")] = auroc, ba
    summary[keys.CV_AUROC_MEAN], summary[keys.CV_AUROC_STD] = mean_and_population_sd(a for a, _ in best.values())
    summary[keys.CV_BA_MEAN], summary[keys.CV_BA_STD] = mean_and_population_sd(b for _, b in best.values())
    now, step = int(time.time() * 1000), len(best)
    metrics = [Metric(name, float(v), now, step) for name, v in summary.items()]
    done_tag = RunTag(keys.FOLDS_DONE, ",".join(str(k) for k in sorted(best)))
    shared_write(lambda: client.log_batch(parent_id, metrics=metrics, tags=[done_tag]))
    return summary


def _log_missing_epochs(client: MlflowClient, run_id: str, result: FoldResult) -> None:
    """Per-epoch metrics of epochs this run has not logged (trained before a restart, or from the work folder)."""
    logged = {m.step for m in client.get_metric_history(run_id, keys.VAL_AUROC)}
    now = int(time.time() * 1000)
    metrics = [Metric(name, float(v), now, epoch) for epoch, h in enumerate(result.history, 1) if epoch not in logged
               for name, v in keys.epoch_metrics(h).items()]
    for s in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[s:s + 500])


def run_fold(cfg: TrainCVConfig, store: Store, k: int, synthetic: Store | None, parent_id: str, workdir: Path,
             resume_run_id: str | None) -> FoldResult:
    """One nested fold run: train (or resume, or reuse the work folder), log curves and artifacts; the
    best checkpoint as the run's LoggedModel (pipelines/fold_model.py)."""
    tags = {keys.STEP: keys.TRAIN_CV, keys.PROFILE: cfg.profile, keys.BACKBONE: cfg.backbone,
            keys.REGIME: cfg.regime, keys.FOLD: str(k), keys.CODE_VERSION: code_version(),
            keys.DEVICE: device_tag(resolve_device(cfg.device)),
            **process_tags()}
    with mlflow.start_run(run_id=resume_run_id, run_name=f"fold {k}", parent_run_id=parent_id, nested=True,
                          tags=tags, log_system_metrics=True) as run:
        mlflow.set_tag(keys.DATASET_DIGEST, store.digest)
        if synthetic is not None:
            log_store(synthetic, "synthetic")
        result = train_fold(cfg, store, k, synthetic, workdir,
                            on_epoch=lambda epoch, m: mlflow.log_metrics(keys.epoch_metrics(m), step=epoch))
        _log_missing_epochs(MlflowClient(), run.info.run_id, result)
        sizes = {keys.P_N_TRAIN_REAL: result.n_train_real, keys.P_N_TRAIN_SYNTHETIC: result.n_train_synthetic,
                 keys.P_N_VAL: result.n_val}
        log_params(sizes)
        log_params({keys.P_PRECISION: result.precision})  # what `precision` (parent: as asked) resolved to here
        mlflow.log_metric(keys.BEST_EPOCH, result.best_epoch)
        log_fold_model(k, result.checkpoint, result.best_epoch,
                       {keys.BEST_VAL_AUROC: result.best_val_auroc, keys.BEST_VAL_BA: result.best_val_ba},
                       dataset=validation_dataset(store, k), params={**as_params(cfg, identity_only=True), **sizes},
                       tags={**{t: tags[t] for t in (keys.STEP, keys.BACKBONE, keys.REGIME, keys.FOLD)},
                             keys.DATASET_DIGEST: store.digest})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / keys.VAL_PREDICTIONS
            result.val_predictions.to_csv(path, index=False)
            mlflow.log_artifact(str(path))
    return result


def train_folds(cfg: TrainCVConfig, store: Store, folds: list[int], synthetic: dict[int, Store], parent_id: str,
                key: str) -> None:
    """Each asked fold not yet finished under the parent: trained, or resumed from its last attempt."""
    client = MlflowClient()
    for k in folds:
        attempts = runs.fold_attempts(client, parent_id).get(k, [])
        if any(r.info.status == runs.FINISHED for r in attempts):
            print(f"fold {k}: finished in run {attempts[0].info.run_id}, skipped")
            continue
        unfinished = [r for r in attempts if r.info.status in ("RUNNING", "FAILED", "KILLED")]
        workdir = Path(cfg.workroot) / key / f"fold{k}"
        print(f"fold {k} of {store.folds}: {run_name(cfg)}, work folder {workdir}", flush=True)
        run_fold(cfg, store, k, synthetic.get(k), parent_id, workdir, unfinished[0].info.run_id if unfinished else None)
        summary = update_summary(client, parent_id)
        print(f"fold {k}: best val AUROC {summary[keys.fold_metric(k, 'auroc')]:.4f}; CV AUROC so far "
              f"{summary[keys.CV_AUROC_MEAN]:.4f} +- {summary[keys.CV_AUROC_STD]:.4f}", flush=True)


def note_random_backbone(cfg: TrainCVConfig) -> None:
    if cfg.finetune != "full" and cfg.pretrained in ("", "none"):
        print(f"note: finetune={cfg.finetune} on a randomly initialised {cfg.backbone}: the frozen backbone's "
              f"features are random, so expect results near chance (measured on the demo ViT with LoRA: CV AUROC "
              f"0.49); LoRA and linear probing adapt pretrained weights (pretrained=hub or a weights file)",
              flush=True)


@dataclass
class Parent:
    run_id: str
    owned: bool  # False in a fold job: the spawning train_cv owns the parent, this process adds fold runs only
    scope: str = ""  # the folds the parent stands for (its `folds` param)


def find_parent(cfg: TrainCVConfig, store: Store, folds: list[int], key: str) -> Parent:
    """The parent run of these folds, and the one place that reads the environment for it: a fold
    job gets its spawner's (FOLD_JOB_PARENT); under `mlflow run` it is the run MLflow made
    (MLFLOW_RUN_ID; it stands for the folds asked for); otherwise the parent with this experiment
    key, found or created (pipelines.joining; it stands for every fold: other jobs join it)."""
    job_of = os.environ.pop(FOLD_JOB_PARENT, None)
    if job_of:
        return Parent(job_of, owned=False)
    scope = folds if os.environ.get("MLFLOW_RUN_ID") else store.folds
    return Parent(open_parent(keys.TRAIN_CV_KEY, key, run_name(cfg), {keys.STEP: keys.TRAIN_CV}), owned=True,
                  scope=",".join(map(str, scope)))


@contextlib.contextmanager
def parent_run(cfg: TrainCVConfig, store: Store, parent: Parent, key: str,
               study: StudyPick | None = None) -> Iterator[mlflow.ActiveRun]:
    """The parent as the active run, with its tags, params (a joined parent keeps its scope) and data."""
    client = MlflowClient()
    params = parent_params(cfg, store)
    if keys.P_FOLDS not in client.get_run(parent.run_id).data.params:
        params[keys.P_FOLDS] = parent.scope
    nested = mlflow.active_run() is not None and mlflow.active_run().info.run_id != parent.run_id
    tags = {keys.STEP: keys.TRAIN_CV, keys.PROFILE: cfg.profile, keys.CODE_VERSION: code_version(),
            keys.BACKBONE: cfg.backbone, keys.REGIME: cfg.regime, keys.TRAIN_CV_KEY: key,
            keys.DATA_PATH: str(Path(cfg.data).resolve()), "mlflow.runName": run_name(cfg),
            keys.DESCRIPTION: step_description(keys.TRAIN_CV, cfg.profile), **process_tags(), **study_tags(study)}
    with mlflow.start_run(run_id=parent.run_id, nested=nested) as run:
        shared_write(lambda: mlflow.set_tags(tags))
        mark_training_experiment(run.info.experiment_id)
        log_params(params)
        if client.get_run(parent.run_id).data.tags.get(keys.DATASET_DIGEST) != store.digest:
            log_store(store, "training")
        yield run


def run_train_cv(cfg: TrainCVConfig, study: StudyPick | None = None) -> str:
    """config -> parent -> folds (`fold_jobs` at a time) -> summary; returns the parent's id.
    `study`: the tune study whose best trial gave values (tags on the parent)."""
    store = open_data(cfg.data, cfg.profile, keys.TRAIN_CV)
    folds = select_folds(cfg.folds, store.folds)
    note_random_backbone(cfg)
    synthetic = synthetic_stores(cfg, store, folds)  # refuses leaking stores before anything runs
    key = experiment_key(cfg, store)
    parent = find_parent(cfg, store, folds, key)
    if parent.owned:
        end_orphaned_runs(MlflowClient(), runs.experiment_ids(MlflowClient())[0], keys.TRAIN_CV)
    if not parent.owned:
        train_folds(cfg, store, folds, synthetic, parent.run_id, key)
        return parent.run_id
    with parent_run(cfg, store, parent, key, study) as run:
        client = MlflowClient()
        finished = runs.fold_runs(client, parent.run_id)
        todo = [k for k in folds if k not in finished]
        if cfg.fold_jobs > 1 and len(todo) > 1:
            job_params = {k: v for k, v in as_params(cfg).items() if k != "from_study"}  # values already taken
            run_fold_jobs(job_params, todo, cfg.fold_jobs, parent.run_id, run.info.experiment_id,
                          Path(cfg.workroot) / key, gpus(cfg.devices, cfg.device))
        else:
            train_folds(cfg, store, folds, synthetic, parent.run_id, key)
        update_summary(client, parent.run_id)
    return parent.run_id


@dataclass
class StudyPick:
    """The best trial of a tune study, whose values a train_cv run takes (`from_study`)."""
    run_id: str
    study: str
    trial: str
    values: dict[str, object]
    backbone: str


def study_tags(study: StudyPick | None) -> dict[str, str]:
    if study is None:
        return {}
    return {keys.FROM_STUDY_RUN: study.run_id, keys.FROM_STUDY: study.study, keys.FROM_TRIAL: study.trial}


def take_study_values(args: dict[str, str]) -> StudyPick | None:
    """Fill the command line's unset fields with the best trial's values of `from_study` (a tune
    run id or study name); a value given explicitly wins, and the console says so."""
    if not args.get("from_study"):
        return None
    run = runs.study_run(MlflowClient(), args["from_study"])
    pick = StudyPick(run.info.run_id, run.data.tags[keys.STUDY_TAG].rsplit("@", 1)[0], run.data.tags[keys.BEST_TRIAL],
                     json.loads(run.data.tags[keys.BEST_PARAMS]), run.data.tags.get(keys.BACKBONE, ""))
    for name, value in pick.values.items():
        if args.get(name) not in (None, ""):
            print(f"train_cv: {name}={args[name]} given explicitly, not study {pick.study}'s {value} "
                  f"(trial {pick.trial})", flush=True)
        else:
            args[name] = str(value)
    print(f"train_cv: from study {pick.study} (run {pick.run_id[:8]}), trial {pick.trial}: "
          + ", ".join(f"{n}={args[n]}" for n in pick.values), flush=True)
    return pick


@cli_step(keys.TRAIN_CV)
def main(argv: list[str] | None = None) -> str:
    picked: list[StudyPick | None] = []
    cfg = from_cli(TrainCVConfig, argv, __doc__, fill=lambda args: picked.append(take_study_values(args)))
    study = picked[0] if picked else None
    if study and study.backbone and study.backbone != cfg.backbone:
        raise ConfigError(f"study {study.study} searched the recipe of {study.backbone}; this run trains "
                          f"{cfg.backbone}: give -P backbone={study.backbone} or another study")
    parent = run_train_cv(cfg, study)
    summary = MlflowClient().get_run(parent).data.metrics
    if keys.CV_AUROC_MEAN in summary:
        print(f"train_cv {run_name(cfg)}: CV AUROC {summary[keys.CV_AUROC_MEAN]:.4f} "
              f"+- {summary[keys.CV_AUROC_STD]:.4f}, "
              f"BA {summary[keys.CV_BA_MEAN]:.4f} +- {summary[keys.CV_BA_STD]:.4f} (run {parent})")
    print(json.dumps({"config": asdict(cfg), "parent_run_id": parent}, default=str))
    return parent


if __name__ == "__main__":
    main()
