"""analysis.runs: one rule finds a parent's fold runs (the newest finished per fold), and every
consumer (train_cv's summary, evaluate, the ensemble, synthesize, the report, the submission
model) goes through it; a partial fold set is refused the same way everywhere."""
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis import keys, runs
from analysis.queries import oof_or_reason, train_rows
from analysis.runs import experiment_ids
from models.ensemble import FoldEnsemble
from pipelines.synthesize import generator_fold_runs
from pipelines.train_cv import update_summary


def _fold_run(k: int, checkpoint, auroc: float, prob: float, tmp_path, step=keys.TRAIN_CV) -> str:
    """A finished fold run with a checkpoint, validation predictions (all at `prob`) and best_val_auroc."""
    with mlflow.start_run(nested=True, tags={keys.STEP: step, keys.FOLD: str(k)}) as run:
        mlflow.log_metrics({keys.BEST_VAL_AUROC: auroc, keys.BEST_VAL_BA: 0.5})
        mlflow.log_artifacts(str(checkpoint), keys.CHECKPOINT_DIR)
        folder = tmp_path / run.info.run_id
        folder.mkdir()
        pd.DataFrame({"sample_id": [f"f{k}_{i}" for i in range(4)], "label": [0, 1, 0, 1], "prob": prob}).to_csv(
            folder / keys.VAL_PREDICTIONS, index=False)
        mlflow.log_artifact(str(folder / keys.VAL_PREDICTIONS))
    time.sleep(0.01)  # distinct start times: "newest" is well defined
    return run.info.run_id


@pytest.fixture
def fold_run_twice(tracking, tiny_checkpoints, tmp_path):
    """A finished train_cv parent (folds 1,2) whose fold 1 was run twice: an older and a newer finished run."""
    old_ckpt, new_ckpt = tiny_checkpoints
    with mlflow.start_run(run_name="convnext / real_only",
                          tags={keys.STEP: keys.TRAIN_CV, keys.BACKBONE: "convnext", keys.REGIME: keys.REAL_ONLY,
                                keys.PROFILE: "demo"}) as parent:
        mlflow.log_params({keys.P_BACKBONE: "convnext", keys.P_REGIME: keys.REAL_ONLY, keys.P_FOLDS: "1,2"})
        old = _fold_run(1, old_ckpt, 0.61, 0.1, tmp_path)
        fold2 = _fold_run(2, old_ckpt, 0.70, 0.3, tmp_path)
        new = _fold_run(1, new_ckpt, 0.83, 0.9, tmp_path)
        mlflow.log_metrics({keys.fold_metric(1, "auroc"): 0.83, keys.fold_metric(2, "auroc"): 0.70})
    return parent.info.run_id, old, new, fold2, tiny_checkpoints


def test_every_consumer_picks_the_newest_finished_fold_run(fold_run_twice, tmp_path):
    parent, old, new, fold2, (old_ckpt, new_ckpt) = fold_run_twice
    client = MlflowClient()
    assert {k: r.info.run_id for k, r in runs.fold_runs(client, parent).items()} == {1: new, 2: fold2}
    assert [r.info.run_id for r in runs.fold_attempts(client, parent)[1]] == [new, old]

    # train_cv's summary on the parent
    assert update_summary(client, parent)[keys.fold_metric(1, "auroc")] == pytest.approx(0.83)
    # evaluate's out-of-fold predictions (the cv_ba threshold)
    oof = runs.oof_predictions(runs.complete_fold_runs(client, parent))
    assert oof.loc[oof["fold"] == 1, "prob"].eq(0.9).all()
    # the report's row and its out-of-fold predictions (the regime comparison)
    [row], _ = train_rows(client, experiment_ids(client, "test"))
    assert row.fold_runs[1].info.run_id == new
    assert oof_or_reason(row)[0].loc[lambda d: d["fold"] == 1, "prob"].eq(0.9).all()
    # the submission model's checkpoints and the ensemble evaluate / predict load
    dirs = runs.download_checkpoints(row.fold_runs, tmp_path / "sub")
    assert (tmp_path / "sub/fold1/checkpoint/model.safetensors").read_bytes() == \
        (new_ckpt / "model.safetensors").read_bytes() and set(dirs) == {1, 2}
    crops = np.random.default_rng(0).integers(0, 255, (3, 128, 128, 3), dtype=np.uint8)
    expected = FoldEnsemble.from_dirs([new_ckpt, old_ckpt]).predict_proba(crops)
    np.testing.assert_allclose(runs.load_ensemble(parent).predict_proba(crops), expected, atol=1e-6)


def test_synthesize_uses_the_newest_generator_fold_run(tracking, tiny_checkpoints, tmp_path):
    with mlflow.start_run(tags={keys.STEP: keys.GENERATOR_FINETUNE}) as parent:
        mlflow.log_param(keys.P_FOLDS, "1")
        _fold_run(1, tiny_checkpoints[0], 0.5, 0.5, tmp_path, step=keys.GENERATOR_FINETUNE)
        new = _fold_run(1, tiny_checkpoints[1], 0.5, 0.5, tmp_path, step=keys.GENERATOR_FINETUNE)
    assert generator_fold_runs(MlflowClient(), parent.info.run_id) == {1: new}


def test_a_partial_fold_set_is_refused_by_evaluate_and_the_ensemble(tracking, tiny_checkpoints, tmp_path):
    with mlflow.start_run(tags={keys.STEP: keys.TRAIN_CV}) as parent:
        mlflow.log_param(keys.P_FOLDS, "1,2,3")
        _fold_run(1, tiny_checkpoints[0], 0.6, 0.4, tmp_path)
        _fold_run(2, tiny_checkpoints[1], 0.6, 0.4, tmp_path)
        with mlflow.start_run(nested=True, tags={keys.STEP: keys.TRAIN_CV, keys.FOLD: "3"}) as failed:
            pass
        MlflowClient().set_terminated(failed.info.run_id, "FAILED")
    def oof_predictions(parent_id):  # evaluate's cv_ba / fold_ba thresholds
        return runs.oof_predictions(runs.complete_fold_runs(MlflowClient(), parent_id))

    for load in (oof_predictions, runs.load_ensemble):
        with pytest.raises(runs.RunLookupError, match=r"fold\(s\) \[3\]"):
            load(parent.info.run_id)
