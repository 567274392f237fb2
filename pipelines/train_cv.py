"""train_cv: k-fold cross-validation of one backbone in one regime.

MLflow (DESIGN.md, "MLflow runs"): a parent run named "<backbone> / <regime>" with one
nested run "fold k" per fold; per-epoch curves, the best checkpoint and the validation
predictions per fold; fold and mean / population-SD summaries on the parent.

Which parent: under `mlflow run` the run MLflow made (MLFLOW_RUN_ID). Otherwise the
parent is found by a key, a hash of everything that defines the experiment (parameters,
data digest, code version): fold jobs started separately (`--folds 1`, `--folds 2`, on
other machines logging to one tracking server) join one parent, and the same command run
again continues it: finished folds are skipped. Two jobs that start at the same moment
may both create a parent; each then keeps the oldest and deletes its own empty one. A run
becomes visible only when the tracking store commits it, which can lag its start time, so
the oldest is trusted only once it is `PARENT_SETTLE_S` seconds old (clocks of the machines
must agree to within that).

Work folder: `<workroot>/<key>/fold<k>` (default `./.train_cv_work`), on local disk,
not in the artifact store: per-epoch state is large and written often. A killed fold
resumes from it; a finished fold keeps its best checkpoint and history there, so that a
new parent with the same key (a fresh `mlflow run`) logs it again without training.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from analysis import keys
from analysis.metrics import mean_and_population_sd
from data_tools.store import Store, open_store
from models.training import FoldResult, TrainConfig, train_fold
from pipelines.common import code_version, log_params, log_store, shared_write, step_parser
from pipelines.profiles import base_profile, resolve

PARENT_SETTLE_S = 3.0


@dataclass
class TrainCVConfig:
    data: str
    backbone: str = "convnext"
    regime: str = keys.REAL_ONLY
    synth_run_id: str = ""
    n_synthetic: int | None = None  # None: as many as balance fold k's classes
    folds: str = "all"  # "all" or a list such as "1,3"
    epochs: int = 4
    batch_size: int = 32
    lr: float | None = None  # None: the backbone's default
    seed: int = 0
    pretrained: str = "none"
    device: str = "auto"
    augment: str = "paper"  # paper | flips | none
    profile: str = "demo"  # a built-in profile or a profile file
    workroot: str = ".train_cv_work"

    def train_config(self) -> TrainConfig:
        return TrainConfig(backbone=self.backbone, profile=base_profile(self.profile), epochs=self.epochs,
                           batch_size=self.batch_size, lr=self.lr, seed=self.seed, pretrained=self.pretrained,
                           device=self.device, n_synthetic=self.n_synthetic, augment=self.augment)


def parse_folds(spec: str | int | None, available: list[int]) -> list[int]:
    """"all" (or empty) -> every fold of the store; "1,3" -> [1, 3], each checked."""
    text = str(spec if spec is not None else "all").strip()
    if text in ("", "all"):
        return list(available)
    try:
        folds = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"folds must be 'all' or a list such as '1,3', got {text!r}") from None
    unknown = [k for k in folds if k not in available]
    if unknown or not folds:
        raise ValueError(f"folds {unknown or text!r} are not folds of the store (it has {available})")
    return folds


def synthetic_stores(cfg: TrainCVConfig, real: Store, folds: list[int]) -> dict[int, Store]:
    """Fold k's synthetic store from the `synthesize` run, checked against fold k before any training."""
    from data_tools.provenance import check_synthetic_for_fold

    if cfg.regime not in keys.REGIMES:
        raise ValueError(f"regime must be one of {keys.REGIMES}, got {cfg.regime!r}")
    if cfg.regime == keys.REAL_ONLY:
        if cfg.synth_run_id:
            raise ValueError("synth_run_id is only used with regime=synth_balanced")
        return {}
    if not cfg.synth_run_id:
        raise ValueError("regime=synth_balanced needs synth_run_id (a finished synthesize run)")
    params = MlflowClient().get_run(cfg.synth_run_id).data.params
    stores = {}
    for k in folds:
        path = params.get(keys.synth_store_param(k))
        if not path:
            raise ValueError(f"synthesize run {cfg.synth_run_id} has no store for fold {k} "
                             f"(param {keys.synth_store_param(k)}); it made folds "
                             f"{sorted(p for p in params if p.startswith('store_fold'))}")
        stores[k] = open_store(path)
        check_synthetic_for_fold(stores[k], real, k)
    return stores


def experiment_key(cfg: TrainCVConfig, store: Store) -> str:
    """What makes two invocations the same experiment (never the folds asked for, the device or paths)."""
    tc = cfg.train_config()
    ident = {"backbone": cfg.backbone, "regime": cfg.regime, "synth_run_id": cfg.synth_run_id,
             "n_synthetic": cfg.n_synthetic, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
             "lr": tc.learning_rate(), "seed": cfg.seed, "pretrained": cfg.pretrained, "profile": tc.profile,
             "augment": cfg.augment,
             "spec": tc.spec().to_dict(), "data": store.digest, "code": code_version()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


def parent_params(cfg: TrainCVConfig, store: Store, scope: str) -> dict[str, str]:
    tc = cfg.train_config()
    spec = tc.spec()
    return {keys.P_BACKBONE: cfg.backbone, keys.P_REGIME: cfg.regime, keys.P_FOLDS: scope, keys.P_EPOCHS: cfg.epochs,
            keys.P_BATCH_SIZE: cfg.batch_size, keys.P_LR: tc.learning_rate(), keys.P_SEED: cfg.seed,
            keys.P_SYNTH_RUN_ID: cfg.synth_run_id, keys.P_DATA_DIGEST: store.digest,
            keys.P_PRETRAINED: cfg.pretrained, keys.P_N_SYNTHETIC: "balance" if cfg.n_synthetic is None else
            cfg.n_synthetic, keys.PROFILE: cfg.profile, keys.P_TIMM_NAME: spec.timm_name,
            keys.P_INPUT_SIZE: spec.input_size, keys.P_AUGMENT: cfg.augment}


def _experiment_id() -> str:
    from mlflow.tracking.fluent import _get_experiment_id
    return _get_experiment_id()


def _parents_with_key(client: MlflowClient, experiment_id: str, key: str) -> list:
    runs = client.search_runs([experiment_id], f"tags.`{keys.TRAIN_CV_KEY}` = '{key}'", max_results=1000)
    return sorted((r for r in runs if keys.FOLD not in r.data.tags),
                  key=lambda r: (r.info.start_time, r.info.run_id))


def _settled_oldest_parent(client: MlflowClient, experiment_id: str, key: str) -> str | None:
    """The oldest parent with this key, once every run that started before it must be visible."""
    while True:
        found = _parents_with_key(client, experiment_id, key)
        if not found:
            return None
        wait = found[0].info.start_time / 1000 + PARENT_SETTLE_S - time.time()
        if wait <= 0:
            return found[0].info.run_id
        time.sleep(wait)


def open_parent(cfg: TrainCVConfig, store: Store, key: str) -> str:
    """The parent run id: MLflow's run under `mlflow run`, else the oldest run with this key, else a new one."""
    client = MlflowClient()
    own = os.environ.pop("MLFLOW_RUN_ID", None)  # consumed here: nested fold runs must not resume it
    if own:
        client.set_tag(own, keys.TRAIN_CV_KEY, key)
        return own
    experiment_id = _experiment_id()
    found = _settled_oldest_parent(client, experiment_id, key)
    if found:
        return found
    active = mlflow.active_run()
    tags = {keys.TRAIN_CV_KEY: key, keys.STEP: keys.TRAIN_CV}
    if active:  # called in-process inside another run (e.g. a workflow): nest under it
        tags[keys.PARENT_RUN] = active.info.run_id
    created = client.create_run(experiment_id, tags=tags, run_name=run_name(cfg)).info.run_id
    oldest = _settled_oldest_parent(client, experiment_id, key)
    if oldest != created:  # another job created one at the same moment: join the older one
        client.delete_run(created)
    return oldest


def run_name(cfg: TrainCVConfig) -> str:
    return f"{cfg.backbone} / {cfg.regime}"


def fold_runs(client: MlflowClient, parent_id: str) -> dict[int, list]:
    """{k: fold runs of the parent, newest first}."""
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.`{keys.PARENT_RUN}` = '{parent_id}'", order_by=["attributes.start_time DESC"],
                              max_results=1000)
    out: dict[int, list] = {}
    for r in runs:
        k = r.data.tags.get(keys.FOLD, "")
        if k.isdigit():
            out.setdefault(int(k), []).append(r)
    return out


def update_summary(client: MlflowClient, parent_id: str) -> dict[str, float]:
    """fold{k}_auroc / fold{k}_ba and the mean and population SD over the finished folds, on the
    parent. Logged at step = number of folds, so concurrent jobs leave the most complete as latest."""
    best = {}
    for k, runs in fold_runs(client, parent_id).items():
        done = [r for r in runs if r.info.status == "FINISHED" and keys.BEST_VAL_AUROC in r.data.metrics]
        if done:
            best[k] = (done[0].data.metrics[keys.BEST_VAL_AUROC], done[0].data.metrics[keys.BEST_VAL_BA])
    if not best:
        return {}
    summary = {}
    for k, (auroc, ba) in sorted(best.items()):
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
               for name, v in h.items()]
    for s in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[s:s + 500])


def run_fold(cfg: TrainCVConfig, store: Store, k: int, synthetic: Store | None, parent_id: str, workdir: Path,
             resume_run_id: str | None) -> FoldResult:
    """One nested fold run: train (or resume, or reuse the work folder), log curves and artifacts."""
    client = MlflowClient()
    tags = {keys.STEP: keys.TRAIN_CV, keys.PROFILE: cfg.profile, keys.BACKBONE: cfg.backbone,
            keys.REGIME: cfg.regime, keys.FOLD: str(k), keys.CODE_VERSION: code_version(), keys.DEVICE: cfg.device}
    with mlflow.start_run(run_id=resume_run_id, run_name=f"fold {k}", parent_run_id=parent_id, nested=True,
                          tags=tags) as run:
        mlflow.set_tag(keys.DATASET_DIGEST, store.digest)
        if synthetic is not None:
            log_store(synthetic, "synthetic")
        result = train_fold(cfg.train_config(), store, k, synthetic, workdir,
                            on_epoch=lambda epoch, m: mlflow.log_metrics(m, step=epoch))
        _log_missing_epochs(client, run.info.run_id, result)
        log_params({keys.P_N_TRAIN_REAL: result.n_train_real, keys.P_N_TRAIN_SYNTHETIC: result.n_train_synthetic,
                    keys.P_N_VAL: result.n_val})
        mlflow.log_metrics({keys.BEST_VAL_AUROC: result.best_val_auroc, keys.BEST_VAL_BA: result.best_val_ba,
                            keys.BEST_EPOCH: result.best_epoch})
        mlflow.log_artifacts(str(result.checkpoint), keys.CHECKPOINT_DIR)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / keys.VAL_PREDICTIONS
            result.val_predictions.to_csv(path, index=False)
            mlflow.log_artifact(str(path))
    return result


def run_train_cv(cfg: TrainCVConfig) -> str:
    """Train the asked folds (skipping finished ones) under one parent run; returns its id."""
    store = open_store(cfg.data)
    folds = parse_folds(cfg.folds, store.folds)
    synthetic = synthetic_stores(cfg, store, folds)  # refuses leaking stores before anything runs
    key = experiment_key(cfg, store)
    under_mlflow_run = bool(os.environ.get("MLFLOW_RUN_ID"))
    # the parent's scope: under `mlflow run` the folds asked for, else every fold (jobs join it);
    # a parent that has its folds param already (joined, or given as -P folds=...) keeps it
    scope = ",".join(map(str, folds if under_mlflow_run else store.folds))
    parent_id = open_parent(cfg, store, key)
    client = MlflowClient()
    params = parent_params(cfg, store, scope)
    if keys.P_FOLDS in client.get_run(parent_id).data.params:
        params.pop(keys.P_FOLDS)
    nested = mlflow.active_run() is not None and mlflow.active_run().info.run_id != parent_id
    tags = {keys.STEP: keys.TRAIN_CV, keys.PROFILE: cfg.profile, keys.CODE_VERSION: code_version(),
            keys.BACKBONE: cfg.backbone, keys.REGIME: cfg.regime, keys.TRAIN_CV_KEY: key,
            keys.DATA_PATH: str(Path(cfg.data).resolve())}
    with mlflow.start_run(run_id=parent_id, nested=nested):
        shared_write(lambda: mlflow.set_tags({**tags, "mlflow.runName": run_name(cfg)}))
        log_params(params)
        if client.get_run(parent_id).data.tags.get(keys.DATASET_DIGEST) != store.digest:
            log_store(store, "training")
        for k in folds:
            runs = fold_runs(client, parent_id).get(k, [])
            if any(r.info.status == "FINISHED" for r in runs):
                print(f"fold {k}: finished in run {runs[0].info.run_id}, skipped")
                continue
            unfinished = [r for r in runs if r.info.status in ("RUNNING", "FAILED", "KILLED")]
            workdir = Path(cfg.workroot) / key / f"fold{k}"
            print(f"fold {k} of {store.folds}: {run_name(cfg)}, work folder {workdir}", flush=True)
            run_fold(cfg, store, k, synthetic.get(k), parent_id, workdir,
                     unfinished[0].info.run_id if unfinished else None)
            summary = update_summary(client, parent_id)
            print(f"fold {k}: best val AUROC {summary[keys.fold_metric(k, 'auroc')]:.4f}; CV AUROC so far "
                  f"{summary[keys.CV_AUROC_MEAN]:.4f} +- {summary[keys.CV_AUROC_STD]:.4f}", flush=True)
        update_summary(client, parent_id)
    return parent_id


def config_from_args(argv: list[str] | None = None) -> TrainCVConfig:
    p = step_parser(keys.TRAIN_CV, __doc__)
    for name, help_ in (("data", "real store folder"), ("backbone", "convnext | lunit | lunit_s16 | a timm name"),
                        ("regime", "real_only | synth_balanced"), ("synth_run_id", "synthesize run (synth_balanced)"),
                        ("n_synthetic", "synthetic atypical crops per fold (default: balance the classes)"),
                        ("folds", "all, or a list such as 1,3"), ("epochs", ""), ("batch_size", ""),
                        ("lr", "default: the backbone's"), ("seed", ""), ("pretrained", "hub | none | weights file"),
                        ("device", "auto | cpu | cuda"), ("augment", "paper | flips | none"),
                        ("workroot", "local folder for resumable fold state")):
        p.add_argument(f"--{name}", default="", help=help_)
    args = p.parse_args(argv)
    c = resolve(keys.TRAIN_CV, args.profile, vars(args))
    if not c.get("data"):
        raise SystemExit("train_cv needs --data (a store folder made by prepare_data)")
    optional = lambda v, cast: None if v in (None, "", "none", "balance") else cast(v)  # noqa: E731
    return TrainCVConfig(data=str(c["data"]), backbone=str(c["backbone"]), regime=str(c["regime"]),
                         synth_run_id=str(c.get("synth_run_id") or ""), n_synthetic=optional(c.get("n_synthetic"), int),
                         folds=str(c["folds"]), epochs=int(c["epochs"]), batch_size=int(c["batch_size"]),
                         lr=optional(c.get("lr"), float), seed=int(c["seed"]), pretrained=str(c["pretrained"]),
                         device=str(c["device"]), augment=str(c.get("augment") or "paper"), profile=args.profile,
                         workroot=str(c.get("workroot") or ".train_cv_work"))


def main(argv: list[str] | None = None) -> str:
    cfg = config_from_args(argv)
    parent = run_train_cv(cfg)
    summary = MlflowClient().get_run(parent).data.metrics
    if keys.CV_AUROC_MEAN in summary:
        print(f"train_cv {run_name(cfg)}: CV AUROC {summary[keys.CV_AUROC_MEAN]:.4f} "
              f"+- {summary[keys.CV_AUROC_STD]:.4f}, "
              f"BA {summary[keys.CV_BA_MEAN]:.4f} +- {summary[keys.CV_BA_STD]:.4f} (run {parent})")
    print(json.dumps({"config": asdict(cfg), "parent_run_id": parent}, default=str))
    return parent


if __name__ == "__main__":
    main()
