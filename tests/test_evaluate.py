"""evaluate: the fold ensemble on a test store, thresholds, bootstrap intervals per domain,
the overlap refusal, and `mlflow run . -e evaluate`."""
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis import keys
from models.metrics import ba_optimal_threshold, binary_metrics
from data_tools.demo import make_demo
from data_tools.ingest import ingest
from data_tools.store import write_store
from pipelines.evaluate import EvaluateConfig, OverlapError, oof_predictions, run_evaluate
from pipelines.train_cv import TrainCVConfig, run_train_cv
from pipelines.config import build
from analysis.runs import load_ensemble

ROOT = Path(__file__).resolve().parents[1]


def _eval(**given) -> EvaluateConfig:
    return build(EvaluateConfig, "demo", **given)


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
    overall = binary_metrics(preds["label"], preds["prob"], 0.5)
    for name in keys.TEST_METRICS:
        assert m[keys.test_metric(name)] == pytest.approx(overall[name])
        assert m[keys.test_ci_metric(name, "lo")] <= m[keys.test_metric(name)] <= m[keys.test_ci_metric(name, "hi")]
    for domain, g in preds.groupby("domain"):
        assert m[keys.test_metric("ba", domain)] == pytest.approx(binary_metrics(g["label"], g["prob"], 0.5)["ba"])
    assert {"roc.png", "confusion.png", keys.PREDICTIONS} <= {f.path for f in MlflowClient().list_artifacts(run_id)}


def test_cv_ba_threshold_comes_from_the_pooled_oof_predictions(tracked):
    train_id, test = tracked
    oof = oof_predictions(train_id)
    assert sorted(oof["fold"].unique()) == [1, 2]
    run_id = run_evaluate(_eval(train_run_id=train_id, test_data=str(test.path), threshold="cv_ba", n_boot=0))
    m = MlflowClient().get_run(run_id).data.metrics
    assert m[keys.P_THRESHOLD] == pytest.approx(ba_optimal_threshold(oof["label"], oof["prob"]))


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
