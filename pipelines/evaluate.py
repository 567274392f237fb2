"""evaluate: the fold ensemble of a train_cv run on a test store.

The mean probability of the fold models at threshold `0.5` (the paper), a number, or `cv_ba`
(the BA-optimal threshold on the pooled out-of-fold validation predictions, which the
paper names as missing); or `fold_ba`: each fold model's own BA-optimal threshold t_k, by a
Platt calibration on its out-of-fold predictions (models.metrics.calibrated_ba_threshold), and
the ensemble's score sigmoid(mean_k(logit_k - logit t_k)) at 0.5 (models/ensemble.py): a
threshold on single models' pooled predictions does not transfer to their mean, each model's
own boundary does. The t_k are logged (`fold<k>_threshold`), so the registered model and
`predict` decide as evaluate did. Before predicting, the test store is checked against the
training store for shared images; overlap is refused unless `allow_overlap`, and then the
ids are logged. Metrics with bootstrap 95% intervals overall and per domain,
`predictions.csv`, ROC and confusion-matrix figures.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from analysis import keys, runs
from analysis.plots import plot_confusion, plot_domain_rocs
from data_tools.constants import ATYPICAL, NORMAL
from data_tools.errors import ConfigError, UserError
from data_tools.params import param
from data_tools.store import Store, open_store
from models.checkpoint import resolve_device
from models.metrics import METRICS, ba_optimal_threshold, bootstrap_metrics, fold_ba_thresholds
from models.tta import TTA_MODES
from pipelines.common import cli_step, log_params, log_store, step_run
from pipelines.config import StepConfig, as_params, from_cli
from pipelines.demo_data import open_data


class OverlapError(UserError, RuntimeError):
    """The test store shares images with the training store."""


@dataclass
class EvaluateConfig(StepConfig):
    train_run_id: str = param("train_cv parent run whose fold ensemble is evaluated (none given: the error names "
                              "the newest)")
    test_data: str = param("test store folder (demo: the held-out demo store, built where it is missing)")
    threshold: str = param("0.5 (the paper) | a number in [0, 1] | cv_ba (BA-optimal on the pooled out-of-fold "
                           "predictions) | fold_ba (each fold model at its own BA-optimal threshold, calibrated on "
                           "its out-of-fold predictions)")
    allow_overlap: bool = param("go on when the test store shares images with the training store (ids logged)")
    device: str = param("auto | cpu | cuda", identity=False)
    n_boot: int = param("bootstrap resamples of the 95% intervals")
    batch_size: int = param("inference batch size", identity=False)
    tta: str = param("test-time augmentation: none | flips (the four flips) | d4 (the 8 rotations and flips)",
                     choices=TTA_MODES)

    STEP = keys.EVALUATE


CONFIG = EvaluateConfig


def fold_thresholds(oof: pd.DataFrame) -> dict[int, float]:
    """{k: the BA-optimal threshold of fold model k, calibrated on its own out-of-fold predictions}."""
    try:
        return fold_ba_thresholds(oof["label"].to_numpy(), oof["prob"].to_numpy(), oof["fold"].to_numpy())
    except ValueError as e:
        raise ConfigError(f"{e}: threshold=fold_ba cannot place its threshold; use cv_ba or a number") from None


def choose_threshold(spec: str, train_run_id: str) -> tuple[float, dict[int, float] | None]:
    """(threshold on the ensemble's score, {k: t_k} for fold_ba else None)."""
    if spec in ("cv_ba", "fold_ba"):
        oof = runs.oof_predictions(runs.complete_fold_runs(MlflowClient(), train_run_id))
        if spec == "fold_ba":
            return 0.5, fold_thresholds(oof)
        return ba_optimal_threshold(oof["label"].to_numpy(), oof["prob"].to_numpy()), None
    try:
        value = float(spec)
    except ValueError:
        raise ConfigError(f"threshold must be a number in [0, 1], 'cv_ba' or 'fold_ba', got {spec!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"threshold must lie in [0, 1], got {value}")
    return value, None


def training_store(train_run_id: str) -> Store:
    """The store the train_cv run trained on (its data path tag), checked by digest."""
    run = MlflowClient().get_run(train_run_id)
    path, digest = run.data.tags.get(keys.DATA_PATH), run.data.params.get(keys.P_DATA_DIGEST)
    if not path or not Path(path).joinpath("manifest.json").is_file():
        raise FileNotFoundError(f"the training store of run {train_run_id} ({path!r}) is not here, so the test set "
                                f"cannot be checked for overlap; make it available or pass allow_overlap=true")
    store = open_store(path)
    if digest and store.digest != digest:
        raise ConfigError(f"{path} changed since run {train_run_id} trained on it (digest {store.digest[:12]} != "
                         f"{digest[:12]}); the overlap check would test the wrong data")
    return store


def find_test_overlap(train_run_id: str, test: Store, allow: bool) -> pd.DataFrame:
    """Pairs (id_a: training, id_b: test) of shared images, by the foundation's overlap check."""
    from data_tools.overlap import find_overlap

    try:
        train = training_store(train_run_id)
    except FileNotFoundError:
        if not allow:
            raise
        print(f"warning: the training store of {train_run_id} is not here; overlap not checked (allow_overlap)")
        return pd.DataFrame(columns=["id_a", "id_b", "kind", "distance"])
    return find_overlap(train, test)


def domain_metrics(frame: pd.DataFrame, threshold: float, n_boot: int, seed: int = 0) -> dict[str, float]:
    """test_<metric> (+ _ci95_lo/_hi) overall and per domain; undefined values are left out."""
    out: dict[str, float] = {}
    groups = [(None, frame)] + [(str(d), g) for d, g in frame.groupby("domain", sort=True)]
    for domain, g in groups:
        ci = bootstrap_metrics(g["label"].to_numpy(), g["prob"].to_numpy(), threshold, n_boot=n_boot, seed=seed)
        for name in METRICS:
            point, lo, hi = ci[name]
            if np.isfinite(point):
                out[keys.test_metric(name, domain)] = point
            if np.isfinite(lo) and np.isfinite(hi):
                out[keys.test_ci_metric(name, "lo", domain)] = lo
                out[keys.test_ci_metric(name, "hi", domain)] = hi
    return out


def _shown(metrics: dict[str, float], name: str) -> str:
    value, lo, hi = (metrics.get(k) for k in (keys.test_metric(name), keys.test_ci_metric(name, "lo"),
                                              keys.test_ci_metric(name, "hi")))
    text = f"{name} {value:.4f}" if value is not None else f"{name} n/a"
    return text + (f" [{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else "")


def check_given(cfg: EvaluateConfig) -> None:
    """A train_cv run and a test store are needed: a missing one is a one-line error saying what makes it."""
    if not cfg.train_run_id:
        newest = runs.newest_in_experiment(MlflowClient(), keys.TRAIN_CV)
        hint = (f"the newest here is {newest.info.run_id} ({newest.info.run_name})" if newest else
                "there is none yet: make one with `mlflow run . -e train_cv -P backbone=convnext`")
        raise ConfigError(f"no train_run_id given: evaluate a train_cv run with -P train_run_id=<run id>; {hint}")
    if not cfg.test_data:
        raise ConfigError("no test_data given: a test store made by prepare_data, e.g. `mlflow run . -e prepare_data "
                          "-P source=<source> -P root=<raw data> -P folds=0 -P out=stores/test`")


def run_evaluate(cfg: EvaluateConfig) -> str:
    """Evaluate and log; returns the evaluate run id."""
    check_given(cfg)
    test = open_data(cfg.test_data, cfg.profile, keys.EVALUATE)
    if len(test) == 0:
        raise ConfigError(f"test store {test.path} holds no crops: nothing to evaluate")
    train = runs.get_run(MlflowClient(), cfg.train_run_id, keys.TRAIN_CV)
    if runs.is_fold_run(train):
        raise ConfigError(f"run {cfg.train_run_id} is a fold run; give its train_cv parent run")
    threshold, per_fold = choose_threshold(cfg.threshold, cfg.train_run_id)
    tags = {keys.TEST_SET: test.name, keys.BACKBONE: train.data.tags.get(keys.BACKBONE, ""),
            keys.REGIME: train.data.tags.get(keys.REGIME, "")}
    name = f"evaluate {tags[keys.BACKBONE]} / {tags[keys.REGIME]} on {test.name}"
    with step_run(keys.EVALUATE, cfg.profile, run_name=name, tags=tags) as run:
        log_params({**as_params(cfg, identity_only=True), keys.P_TEST_DIGEST: test.digest})
        log_store(test, "test")
        # the training row's CV summary beside its test metrics: the evaluate runs alone then compare
        # regimes in the MLflow UI (filter tags.step = 'evaluate'; README "Results in the MLflow UI")
        mlflow.log_metrics({k: train.data.metrics[k] for k in keys.CV_SUMMARY if k in train.data.metrics})
        with tempfile.TemporaryDirectory() as tmp:
            overlap = find_test_overlap(cfg.train_run_id, test, cfg.allow_overlap)
            mlflow.log_metrics({keys.P_THRESHOLD: threshold, keys.N_OVERLAP: float(overlap["id_b"].nunique()),
                                **{keys.fold_metric(k, keys.FOLD_THRESHOLD): t for k, t in (per_fold or {}).items()}})
            if len(overlap):
                overlap.to_csv(Path(tmp) / keys.OVERLAP_CSV, index=False)
                mlflow.log_artifact(str(Path(tmp) / keys.OVERLAP_CSV))
                if not cfg.allow_overlap:
                    raise OverlapError(
                        f"test store {test.path} shares {overlap['id_b'].nunique()} image(s) with the training store "
                        f"(e.g. {overlap['id_b'].head(5).tolist()}; all in the run's overlap.csv); evaluate on a "
                        f"disjoint test set, or pass allow_overlap=true to go on")
                print(f"warning: {overlap['id_b'].nunique()} test images overlap the training store (allow_overlap)")
            ensemble = runs.load_ensemble(cfg.train_run_id, resolve_device(cfg.device), dst=Path(tmp) / "folds",
                                          fold_thresholds=per_fold)
            prob = ensemble.predict_proba(test.images, batch_size=cfg.batch_size, tta=cfg.tta)
            frame = test.index[["sample_id", "label", "domain"]].assign(prob=prob.astype(np.float64))
            frame["pred"] = (frame["prob"] >= threshold).astype(int)
            frame.to_csv(Path(tmp) / keys.PREDICTIONS, index=False)
            mlflow.log_artifact(str(Path(tmp) / keys.PREDICTIONS))
            mlflow.log_metric(keys.N_FOLDS, len(ensemble))
            labelled = frame[frame["label"].isin([NORMAL, ATYPICAL])]
            if len(labelled):
                metrics = domain_metrics(labelled, threshold, cfg.n_boot)
                mlflow.log_metrics(metrics)
                mlflow.log_artifact(str(plot_domain_rocs(labelled, Path(tmp) / keys.FIG_ROC)))
                mlflow.log_artifact(str(plot_confusion(labelled, threshold, Path(tmp) / keys.FIG_CONFUSION)))
                rule = f"{cfg.threshold} " if per_fold else ""
                print(f"{name}: threshold {rule}{threshold:.4f}; " + ", ".join(_shown(metrics, m) for m in METRICS))
            else:
                print(f"{name}: the test store has no labels; predictions only")
    return run.info.run_id


@cli_step(keys.EVALUATE)
def main(argv: list[str] | None = None) -> str:
    cfg = from_cli(EvaluateConfig, argv, __doc__)
    run_id = run_evaluate(cfg)
    print(json.dumps({"evaluate_run_id": run_id}))
    return run_id


if __name__ == "__main__":
    main()
