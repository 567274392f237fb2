"""The report's ensemble of rows (ensemble=greedy) is a row of Table 1 and a submission like any
other: two rows with different input sizes and normalisations, picked on their out-of-fold
predictions, registered, and scored the same by `predict` and the loaded pyfunc model, equal to
the weighted logit mean of the members computed directly; a row on another store is left out;
a second report with the same selection registers nothing new."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from analysis import keys
from analysis.runs import step_runs
from data_tools.demo import make_demo
from data_tools.images import encode_png_base64
from models.metrics import fold_ba_thresholds
from pipelines import predict, report

from ensemble_rows import add_oof, complementary_oof, expected_probabilities, log_row, vit_checkpoints


@pytest.mark.slow  # a model registered or trained end to end: ~5-10 s
def test_the_greedy_ensemble_of_two_rows_is_a_row_and_the_submission(tracking, tiny_train_run, tiny_checkpoints,
                                                                     tmp_path):
    oof_a, oof_b = complementary_oof(seed=1)
    add_oof(tiny_train_run, oof_a)
    vit_dirs = vit_checkpoints(tmp_path)
    vit_run = log_row("lunit", keys.REAL_ONLY, vit_dirs, oof_b)
    other = log_row("convnext", keys.SYNTH_BALANCED, tiny_checkpoints, oof_a, digest="e" * 64)
    argv = ["--n_boot", "20", "--ensemble", "greedy", "--ensemble_size", "4", "--select_by", "cv_auroc"]
    summary = report.main(argv)

    ens = summary["ensemble"]
    assert len(ens["weights"]) == 2 and sum(ens["weights"].values()) == len(ens["picks"])  # weights = pick counts
    assert list(ens["left_out"]) and "CV store" in next(iter(ens["left_out"].values()))
    chosen = summary["selection"]
    assert set(chosen["ensemble"]) == {tiny_train_run, vit_run} and other not in chosen["train_run_id"]
    assert summary["registered"]["new"]
    run = step_runs(MlflowClient(), [mlflow.get_experiment_by_name("test").experiment_id], keys.REPORT)[0]
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "report")))
    table1 = pd.read_csv(local / f"{keys.TABLE1}.csv", index_col=0)
    assert table1.loc[table1["backbone"] == "ensemble", "F1"].iloc[0] == pytest.approx(ens["fold_auroc"][1] * 100)
    assert (local / f"{keys.ENSEMBLE_PICKS}.csv").is_file() and (local / f"{keys.ENSEMBLE_COMPARISON}.csv").is_file()
    assert "Ensemble of rows" in (local / keys.REPORT_MD).read_text()

    # the registered ensemble: the members' own fold thresholds (no evaluate run: computed from their OOF
    # predictions as evaluate does), weights = pick counts, the threshold fitted on the ensemble's OOF scores
    version = MlflowClient().get_model_version_by_alias(keys.MODEL_NAME, keys.SUBMISSION_ALIAS)
    weight = {run_id: float(c) for run_id, c in chosen["ensemble"].items()}
    thresholds = [fold_ba_thresholds(df["label"], df["prob"], df["fold"]) for df in (oof_a, oof_b)]
    members = [(tiny_checkpoints, thresholds[0], weight[tiny_train_run]), (vit_dirs, thresholds[1], weight[vit_run])]
    images, index = make_demo(6, seed=11)
    expected = expected_probabilities(members, images)
    threshold = float(version.tags["threshold"])
    assert threshold == pytest.approx(ens["threshold"])
    assert len(json.loads(version.tags["member_weights"])) == 4  # two rows of two fold models

    uri = f"models:/{keys.MODEL_NAME}@{keys.SUBMISSION_ALIAS}"
    pyfunc = mlflow.pyfunc.load_model(uri)
    got = pyfunc.predict(pd.DataFrame({"image": [encode_png_base64(im) for im in images]}))
    assert got["probability"].to_numpy() == pytest.approx(expected, abs=1e-6)
    assert got["class"].tolist() == ["atypical" if p >= threshold else "normal" for p in expected]
    folder = tmp_path / "crops"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"crop_{i}.png")
    df = pd.read_csv(predict.main(["--model", uri, "--input", str(folder), "--output", str(tmp_path / "p.csv")]))
    assert df["probability"].to_numpy() == pytest.approx(expected, abs=1e-6)
    assert df["class"].tolist() == got["class"].tolist()

    again = report.main(argv)  # the same selection: the alias's version is kept
    assert not again["registered"]["new"] and again["registered"]["version"] == summary["registered"]["version"]
