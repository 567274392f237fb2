"""The report registers the chosen fold ensemble with its evaluate run's threshold rule (here
fold_ba: a threshold per fold model), and the loaded model scores as the ensemble itself under
that rule. Then the report's ensemble of rows (ensemble=greedy: that row, 48 px, and a ViT row at
64 px with another normalisation) becomes the submission: `mlflow models serve` answers over HTTP
with the same scores as `predict` and the weighted logit mean of the members computed directly,
the same classes, and d4 TTA as a param."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from analysis import keys
from data_tools.demo import make_demo
from data_tools.images import encode_png_base64
from models.ensemble import FoldEnsemble
from models.metrics import fold_ba_thresholds
from pipelines import predict, report

from ensemble_rows import add_oof, complementary_oof, expected_probabilities, log_row, vit_checkpoints
from services import free_port, stop, wait_http

pytestmark = pytest.mark.slow  # mlflow models serve: a scoring server process


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_registered_ensemble_serves_predictions_over_http(tracking, tiny_train_run, tiny_checkpoints, tmp_path):
    images, _ = make_demo(4, seed=11)
    # fold_ba as evaluate logs it: threshold 0.5 on the score, each fold model's own threshold t_k
    logits = FoldEnsemble.from_dirs(tiny_checkpoints).predict_logits(images).astype(np.float64)
    fold_t = {k: float(1 / (1 + np.exp(-np.median(z)))) for k, z in enumerate(logits, 1)}
    offsets = np.log([t / (1 - t) for t in fold_t.values()])[:, None]
    expected = 1 / (1 + np.exp(-(logits - offsets).mean(0)))
    threshold = 0.5
    assert 0 < (expected >= threshold).sum() < len(expected)  # both classes
    with mlflow.start_run(tags={keys.STEP: keys.EVALUATE, keys.TEST_SET: "prelim"}):
        mlflow.log_params({keys.P_TRAIN_RUN_ID: tiny_train_run, keys.P_THRESHOLD: "fold_ba"})
        mlflow.log_metrics({keys.P_THRESHOLD: threshold, **{f"fold{k}_threshold": t for k, t in fold_t.items()}})
        mlflow.log_metrics({keys.test_metric(m): 0.6 for m in keys.TEST_METRICS})

    summary = report.main(["--n_boot", "20", "--register", "yes"])  # "yes" registers, as "true" does
    assert summary["registered"]["name"] == keys.MODEL_NAME
    version = MlflowClient().get_model_version_by_alias(keys.MODEL_NAME, keys.SUBMISSION_ALIAS)
    assert version.version == summary["registered"]["version"]
    assert version.tags["train_run_id"] == tiny_train_run and float(version.tags["threshold"]) == threshold
    assert json.loads(version.tags["fold_thresholds"]) == pytest.approx({f"fold{k}": t for k, t in fold_t.items()})
    # logged from code with an input example: no pickled Python object in the model folder
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{keys.MODEL_NAME}@{keys.SUBMISSION_ALIAS}",
                                                         dst_path=str(tmp_path / "model")))
    files = {p.name for p in model_dir.rglob("*")}
    assert {"pyfunc_model.py", "input_example.json"} <= files, files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    loaded = mlflow.pyfunc.load_model(str(model_dir)).predict(pd.DataFrame({"image": [encode_png_base64(im)
                                                                                     for im in images]}))
    assert loaded["probability"].to_numpy() == pytest.approx(expected, abs=1e-6)

    # the ensemble of that row and a ViT row of another input size becomes the submission (selected by cv_auroc)
    oof_a, oof_b = complementary_oof(seed=1)
    add_oof(tiny_train_run, oof_a)
    vit_dirs = vit_checkpoints(tmp_path)
    vit_run = log_row("lunit", keys.REAL_ONLY, vit_dirs, oof_b)
    summary = report.main(["--n_boot", "20", "--ensemble", "greedy", "--select_by", "cv_auroc"])
    weights = summary["selection"]["ensemble"]
    assert set(weights) == {tiny_train_run, vit_run} and summary["registered"]["new"]
    members = [(tiny_checkpoints, fold_t, float(weights[tiny_train_run])),  # its fold_ba evaluate run's thresholds
               (vit_dirs, fold_ba_thresholds(oof_b["label"], oof_b["prob"], oof_b["fold"]), float(weights[vit_run]))]
    expected = expected_probabilities(members, images)
    threshold = summary["selection"]["threshold"]  # fitted on the ensemble's OOF scores
    (tmp_path / "crops").mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "crops" / f"crop_{i}.png")
    by_predict = pd.read_csv(predict.main(["--model", f"models:/{keys.MODEL_NAME}@{keys.SUBMISSION_ALIAS}", "--input",
                                           str(tmp_path / "crops"), "--output", str(tmp_path / "p.csv")]))
    assert by_predict["probability"].to_numpy() == pytest.approx(expected, abs=1e-6)

    port = free_port()
    # the scoring server execs `uvicorn` from PATH: the venv's bin, as in an activated environment
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                               f"models:/{keys.MODEL_NAME}@{keys.SUBMISSION_ALIAS}", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=120, proc=server)
        url = f"http://127.0.0.1:{port}/invocations"
        # base64 PNG crops in the `image` column
        status, body = post(url, {"dataframe_split": {"columns": ["image"],
                                                      "data": [[encode_png_base64(im)] for im in images]}})
        assert status == 200, body
        got = body["predictions"]
        assert [g["probability"] for g in got] == pytest.approx(expected.tolist(), abs=1e-6)
        assert [g["probability"] for g in got] == pytest.approx(by_predict["probability"].tolist(), abs=1e-6)
        assert [g["class"] for g in got] == ["atypical" if p >= threshold else "normal" for p in expected]
        # file paths the server can read, in the `path` column, with d4 TTA as a param
        Image.fromarray(images[0]).save(tmp_path / "crop.png")
        status, body = post(url, {"dataframe_split": {"columns": ["path"], "data": [[str(tmp_path / "crop.png")]]},
                                  "params": {"tta": "d4"}})
        assert status == 200, body
        tta = expected_probabilities(members, images[:1], tta="d4")
        assert body["predictions"][0]["probability"] == pytest.approx(float(tta[0]), abs=1e-6)
        assert abs(float(tta[0]) - expected[0]) > 1e-6  # d4 was applied
        # a row that is not an image is an error naming the row, not a prediction
        status, body = post(url, {"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}})
        assert status >= 400 and "row 0" in json.dumps(body)
    finally:
        stop(server)
