"""A fold's best checkpoint is an MLflow 3 LoggedModel of its fold run: its files as the model's
artifacts (no pickle), the run's output at the best epoch, the validation metrics logged against
it and the validation split; every consumer reads it back, and older runs' `checkpoint/` too."""
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from analysis import keys, runs
from models.ensemble import FoldEnsemble
from pipelines.fold_model import log_fold_model, validation_dataset


def test_a_fold_checkpoint_is_a_logged_model_linked_to_its_metrics_and_split(tracking, tiny_checkpoints, thumb_stores,
                                                                             tmp_path):
    real, _ = thumb_stores
    client = MlflowClient()
    with mlflow.start_run(tags={keys.STEP: keys.TRAIN_CV}) as parent:
        with mlflow.start_run(nested=True, tags={keys.STEP: keys.TRAIN_CV, keys.FOLD: "1"}) as fold1:
            split = validation_dataset(real, 1)
            model_id = log_fold_model(1, tiny_checkpoints[0], 3, {keys.BEST_VAL_AUROC: 0.81, keys.BEST_VAL_BA: 0.7},
                                      dataset=split, tags={keys.FOLD: "1"}, params={keys.P_BACKBONE: "convnext"})
            with pytest.raises(FileNotFoundError, match="no config.json"):
                log_fold_model(1, tmp_path / "missing", 3, {keys.BEST_VAL_AUROC: 0.1})
            with pytest.raises(MlflowException):  # a failure half way leaves the model FAILED, not READY
                log_fold_model(1, tiny_checkpoints[0], 3, {keys.BEST_VAL_AUROC: "not a number"})
        with mlflow.start_run(nested=True, tags={keys.STEP: keys.TRAIN_CV, keys.FOLD: "2"}) as fold2:
            mlflow.log_artifacts(str(tiny_checkpoints[1]), keys.CHECKPOINT_DIR)  # a fold run of older code

    run = client.get_run(fold1.info.run_id)
    outputs = run.outputs.model_outputs
    assert [o.step for o in outputs if o.model_id == model_id] == [3]  # the UI's "Models" column
    assert not run.inputs.model_inputs  # its own output, not an input
    [val] = [d for d in run.inputs.dataset_inputs if d.dataset.name == keys.validation_dataset(real.name, 1)]
    assert [t.value for t in val.tags] == [keys.VALIDATION] and val.dataset.digest == split.digest
    assert run.data.metrics[keys.BEST_VAL_AUROC] == 0.81

    model = client.get_logged_model(model_id)
    assert model.status == LoggedModelStatus.READY and model.name == keys.fold_model(1)
    assert model.source_run_id == fold1.info.run_id and model.model_type == keys.FOLD_MODEL_TYPE
    assert model.params == {keys.P_BACKBONE: "convnext"} and model.tags[keys.FOLD] == "1"
    linked = {m.key: (m.value, m.step, m.dataset_name, m.dataset_digest, m.run_id) for m in model.metrics}
    assert linked[keys.BEST_VAL_AUROC] == (0.81, 3, split.name, split.digest, fold1.info.run_id)
    assert keys.BEST_VAL_BA in linked
    failed = [m for m in client.search_logged_models([run.info.experiment_id])
              if m.status == LoggedModelStatus.FAILED]
    assert len(failed) == 1 and failed[0].source_run_id == fold1.info.run_id

    # the checkpoint's own files, byte for byte, are the model's artifacts: no MLmodel wrapper, no pickle
    folds = runs.fold_runs(client, parent.info.run_id)
    assert runs.fold_model_ids(folds) == {1: model_id, 2: None}
    dirs = runs.download_checkpoints(folds, tmp_path / "dl")
    files = {p.name: p.read_bytes() for p in Path(dirs[1]).iterdir()}
    assert files == {p.name: p.read_bytes() for p in Path(tiny_checkpoints[0]).iterdir()}
    assert {p.name for p in Path(dirs[2]).iterdir()} == {p.name for p in Path(tiny_checkpoints[1]).iterdir()}
    assert len(FoldEnsemble.from_dirs([dirs[1], dirs[2]]).models) == 2
    assert fold2.info.run_id == folds[2].info.run_id
