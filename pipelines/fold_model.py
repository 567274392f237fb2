"""A fold's best checkpoint as an MLflow 3 LoggedModel of its fold run (docs/DESIGN.md, "MLflow runs").

MLflow 3's convention for a trained model: a LoggedModel, the run's output at the step it was
taken (the best epoch), with the metrics that judged it logged against it and against the data
they were measured on. The UI then lists it in the run's "Models" column and on its page, and
the model's page shows its metrics by dataset. Its artifacts are the checkpoint folder's own files
(`config.json` and the weights, models/checkpoint.py): nothing is pickled and no flavor wraps
them; `analysis/runs.py` downloads them back for the ensemble.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import mlflow
from mlflow.data.pandas_dataset import PandasDataset
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.tracking import MlflowClient

from analysis import keys
from data_tools.store import Store


def validation_dataset(store: Store, k: int) -> PandasDataset:
    """Fold k's validation split of the store as an MLflow dataset: its index rows, a digest of the
    store's digest and k (the same split of the same data, the same dataset)."""
    _, val = store.fold_rows(k)
    digest = hashlib.sha256(f"{store.digest}:{keys.VALIDATION}:{k}".encode()).hexdigest()[:32]
    with warnings.catch_warnings():  # MLflow's source-type guess and integer-schema hints: noise here
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_pandas(store.index.iloc[val], source=str(store.path.resolve()),
                                       name=keys.validation_dataset(store.name, k), digest=digest)


def log_fold_model(k: int, checkpoint: str | Path, step: int, metrics: dict[str, float],
                   dataset: PandasDataset | None = None,
                   tags: dict[str, str] | None = None, params: dict[str, str] | None = None) -> str:
    """Log `checkpoint` (a folder) as fold k's LoggedModel of the active run: the run's output at
    `step` (the best epoch), `metrics` logged on the run and against the model and `dataset` (the
    validation split, also the run's input). Returns the model id; a failure leaves it FAILED."""
    if not (Path(checkpoint) / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint folder (no config.json)")
    run_id = mlflow.active_run().info.run_id
    client = MlflowClient()
    if dataset is not None:
        with warnings.catch_warnings():  # the dataset's schema, computed here: integer-column hints are noise
            warnings.simplefilter("ignore", UserWarning)
            mlflow.log_input(dataset, context=keys.VALIDATION)
    model = mlflow.initialize_logged_model(name=keys.fold_model(k), source_run_id=run_id, tags=tags,
                                           params=params, model_type=keys.FOLD_MODEL_TYPE)
    try:
        client.log_model_artifacts(model.model_id, str(checkpoint))
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
        # run_id given: MLflow reads the run afresh and sees the model as its output, not as an input
        mlflow.log_metrics(metrics, step=step, run_id=run_id, model_id=model.model_id, dataset=dataset)
    except BaseException:
        mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id
