"""evaluate: the fold ensemble on a test store, thresholds (0.5, cv_ba, fold_ba: the same decisions
from `predict` and the registered pyfunc model), bootstrap intervals per domain, the overlap
refusal, and `mlflow run . -e evaluate`."""
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from analysis import keys, runs
from analysis.queries import eval_runs, train_rows
from analysis.submission import log_ensemble_model, select_row
from data_tools.images import encode_png_base64
from models.checkpoint import load_checkpoint
from models.classifier import predict_logits
from models.metrics import ba_optimal_threshold, binary_metrics, calibrated_ba_threshold
from data_tools.demo import make_demo
from data_tools.ingest import ingest
from data_tools.store import write_store
from pipelines import predict
from pipelines.evaluate import EvaluateConfig, OverlapError, run_evaluate
from pipelines.train_cv import TrainCVConfig, run_train_cv
from pipelines.config import build
from analysis.runs import load_ensemble

ROOT = Path(__file__).resolve().parents[1]


def _eval(**given) -> EvaluateConfig:
    return build(EvaluateConfig, "demo", **given)


def fold_logits(train_id: str, images: np.ndarray, dst: Path) -> np.ndarray:
    """[K, N] float64: each fold model's logits, model by model (folds in order)."""
    dirs = runs.download_checkpoints(runs.complete_fold_runs(MlflowClient(), train_id), dst)
    out = []
    for k in sorted(dirs):
        model, spec, _ = load_checkpoint(dirs[k])
        with torch.inference_mode():
            out.append(predict_logits(model, spec, torch.from_numpy(np.array(images)), torch.device("cpu")).numpy())
    return np.stack(out).astype(np.float64)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A train_cv run (folds 1 and 2, one epoch) in a module-wide tracking store, and a
    held-out demo test store (another seed, outside any CV pool)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    store, _ = ingest("demo", None, tmp / "demo400", folds=2, seed=0, size=400)  # both folds: a complete set
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mp.chdir(tmp)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("evaluate")  # not the experiment id another test's store made active
        run_id = run_train_cv(build(TrainCVConfig, "demo", data=str(store.path), epochs=1, augment="flips",
                                    workroot=str(tmp / "work")))
    images, index = make_demo(120, seed=11)
    test = write_store(tmp / "demo_test", images, index.assign(fold=-1), name="demo_test", adapter="demo")
    return uri, run_id, test, store


@pytest.fixture
def tracked(trained, monkeypatch, tmp_path):
    uri, run_id, test, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("evaluate")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    return run_id, test


@pytest.mark.slow
def test_evaluate_logs_the_contract(tracked):
    train_id, test = tracked
    run_id = run_evaluate(_eval(train_run_id=train_id, test_data=str(test.path), threshold="0.5", n_boot=100))
    run = MlflowClient().get_run(run_id)
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p[keys.P_TRAIN_RUN_ID] == train_id and p[keys.P_TEST_DIGEST] == test.digest and p[keys.P_THRESHOLD] == "0.5"
    assert t[keys.TEST_SET] == "demo_test" and t[keys.STEP] == keys.EVALUATE and t[keys.BACKBONE] == "convnext"
    assert m[keys.N_OVERLAP] == 0
    preds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=keys.PREDICTIONS))
    assert list(preds["sample_id"]) == list(test.index["sample_id"])
    expected = load_ensemble(train_id).predict_proba(test.images)
    np.testing.assert_allclose(preds["prob"], expected, atol=1e-6)
    # the paper's rule, unchanged: the mean probability of the fold models at 0.5, no per-fold thresholds
    np.testing.assert_allclose(preds["prob"], sigmoid(fold_logits(train_id, test.images, Path("ck"))).mean(0), atol=1e-6)
    assert runs.run_fold_thresholds(run) is None and (preds["pred"] == (preds["prob"] >= 0.5)).all()
    overall = binary_metrics(preds["label"], preds["prob"], 0.5)
    for name in keys.TEST_METRICS:
        assert m[keys.test_metric(name)] == pytest.approx(overall[name])
        assert m[keys.test_ci_metric(name, "lo")] <= m[keys.test_metric(name)] <= m[keys.test_ci_metric(name, "hi")]
    for domain, g in preds.groupby("domain"):
        assert m[keys.test_metric("ba", domain)] == pytest.approx(binary_metrics(g["label"], g["prob"], 0.5)["ba"])
    assert {"roc.png", "confusion.png", keys.PREDICTIONS} <= {f.path for f in MlflowClient().list_artifacts(run_id)}


@pytest.mark.slow
def test_cv_ba_threshold_comes_from_the_pooled_oof_predictions(tracked):
    train_id, test = tracked
    oof = runs.oof_predictions(runs.complete_fold_runs(MlflowClient(), train_id))
    assert sorted(oof["fold"].unique()) == [1, 2]
    run_id = run_evaluate(_eval(train_run_id=train_id, test_data=str(test.path), threshold="cv_ba", n_boot=0))
    m = MlflowClient().get_run(run_id).data.metrics
    assert m[keys.P_THRESHOLD] == pytest.approx(ba_optimal_threshold(oof["label"], oof["prob"]))


def test_the_calibrated_ba_threshold_finds_the_known_optimum_more_steadily_than_the_best_cut():
    # scores of a known model: logit = z + shift, z ~ N(+-1, 1) by class, 15% positives; the BA-optimal
    # cut is where the class densities meet, z = 0, i.e. prob = sigmoid(shift)
    rng = np.random.default_rng(0)
    for shift in (-1.5, 0.0, 1.0):
        true, platt, cut = 1 / (1 + np.exp(-shift)), [], []
        for _ in range(10):
            y = (rng.random(300) < 0.15).astype(int)
            p = 1 / (1 + np.exp(-(rng.normal(2.0 * y - 1, 1.0) + shift)))
            platt.append(calibrated_ba_threshold(y, p))
            cut.append(ba_optimal_threshold(y, p))
        assert abs(np.mean(platt) - true) < 0.02 and np.std(platt) < np.std(cut)
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.9, 0.8, 0.2, 0.1, 0.7, 0.3])  # worse than chance: the best cut, as ba_optimal_threshold
    assert calibrated_ba_threshold(y, p) == ba_optimal_threshold(y, p)


@pytest.mark.slow
def test_overlap_with_the_training_store_is_refused_unless_allowed(tracked, trained, tmp_path):
    train_id, _ = tracked
    store = trained[3]
    rows = np.arange(0, 390, 13)  # 30 training crops under new ids: the same pixels
    index = store.index.iloc[rows].assign(sample_id=lambda d: "copy_" + d["sample_id"], fold=-1)
    leaky = write_store(tmp_path / "leaky", np.asarray(store.images[rows]), index, name="leaky", adapter="demo")
    with pytest.raises(OverlapError, match="shares 30 image"):
        run_evaluate(_eval(train_run_id=train_id, test_data=str(leaky.path), n_boot=0))
    run_id = run_evaluate(_eval(train_run_id=train_id, test_data=str(leaky.path), n_boot=0,
                                         allow_overlap=True))
    client = MlflowClient()
    assert client.get_run(run_id).data.metrics[keys.N_OVERLAP] == 30
    pairs = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=keys.OVERLAP_CSV))
    assert set(pairs["id_b"]) == set(index["sample_id"])


@pytest.mark.slow
def test_mlflow_run_evaluate_from_the_command_line(tracked):
    train_id, test = tracked
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}
    env.update(OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    out = subprocess.run(["mlflow", "run", str(ROOT), "-e", "evaluate", "--env-manager", "local",
                          "--experiment-name", "cli-eval", "-P", f"train_run_id={train_id}",
                          "-P", f"test_data={test.path}", "-P", "threshold=cv_ba", "-P", "n_boot=50"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("cli-eval").experiment_id], "")
    assert run.info.status == "FINISHED" and run.data.params[keys.P_THRESHOLD] == "cv_ba"
    assert keys.test_metric("auroc") in run.data.metrics and run.data.tags[keys.TEST_SET] == "demo_test"


@pytest.mark.slow
def test_fold_ba_and_the_same_decisions_from_predict_and_the_registered_model(tracked, tmp_path):
    train_id, test = tracked
    oof = runs.oof_predictions(runs.complete_fold_runs(MlflowClient(), train_id))
    t = {k: calibrated_ba_threshold(g["label"], g["prob"]) for k, g in oof.groupby("fold")}  # each model on its own
    run_id = run_evaluate(_eval(train_run_id=train_id, test_data=str(test.path), threshold="fold_ba", n_boot=0))
    run = MlflowClient().get_run(run_id)
    assert run.data.params[keys.P_THRESHOLD] == "fold_ba" and run.data.metrics[keys.P_THRESHOLD] == 0.5
    assert runs.run_fold_thresholds(run) == pytest.approx(t)
    # the rule, computed directly: each model's logit moved by logit(t_k), averaged, at 0.5
    offsets = np.log([t[k] / (1 - t[k]) for k in sorted(t)])[:, None]
    expected = sigmoid((fold_logits(train_id, test.images, tmp_path / "ck") - offsets).mean(0))
    preds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=keys.PREDICTIONS))
    np.testing.assert_allclose(preds["prob"], expected, atol=1e-5)
    assert (preds["pred"] == (expected >= 0.5)).all() and preds["pred"].nunique() == 2
    assert run.data.metrics[keys.test_metric("ba")] == pytest.approx(
        binary_metrics(preds["label"], preds["prob"], 0.5)["ba"])
    decided = np.where(preds["pred"] == 1, "atypical", "normal")

    # predict from the train_cv run: the rule of its latest evaluate run
    out = pd.read_csv(predict.main(["--model", train_id, "--input", str(test.path), "--output", str(tmp_path / "p.csv")]))
    assert (out["class"] == decided).all()
    np.testing.assert_allclose(out["probability"], preds["prob"], atol=1e-6)

    # the report's selection registers the rule with the model, which decides offline as evaluate did
    client = MlflowClient()
    exp_ids = runs.experiment_ids(client, "evaluate")
    rows = [r for r in train_rows(client, exp_ids)[0] if r.run_id == train_id]
    selection = select_row(rows, eval_runs(client, exp_ids, rows)["demo_test"])
    assert selection.threshold == 0.5 and selection.fold_thresholds == pytest.approx(t)
    with mlflow.start_run(tags={keys.STEP: keys.REPORT}):
        version = log_ensemble_model(selection.row, selection.threshold, fold_thresholds=selection.fold_thresholds,
                                     registered_name="fold-ba")
    model = mlflow.pyfunc.load_model(f"models:/fold-ba/{version.version}")
    served = model.predict(pd.DataFrame({"image": [encode_png_base64(im) for im in np.asarray(test.images)]}))
    assert (served["class"] == decided).all()
    np.testing.assert_allclose(served["probability"], preds["prob"], atol=1e-6)
