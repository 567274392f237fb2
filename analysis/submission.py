"""The submission: pick a row by a criterion, log its fold ensemble as an MLflow pyfunc model,
register it and give it the `submission` alias (`analysis/serving.py` loads and runs it).

The pyfunc model is logged from code (`analysis/pyfunc_model.py`: loading it runs that file and
unpickles nothing) with an input example and a signature; it carries the fold checkpoints
(model.safetensors + config.json each) as artifacts and this project's library code, so
`mlflow models serve` and the container need nothing else. The threshold rule is the one the
selected row's evaluate run used: the threshold and, for `fold_ba`, each fold model's own
threshold (model_config `fold_thresholds`), so the model decides offline as evaluate did.
"""
from __future__ import annotations

import json
import tempfile
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from analysis import keys, runs
from analysis.queries import EvalRun, TrainRow, missing_fold_runs
from analysis.serving import (CLASS_COLUMN, DEFAULT_THRESHOLD, IMAGE_COLUMN, PATH_COLUMN, PROB_COLUMN,
                              ensemble_from_artifacts)
from data_tools.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
CRITERIA = ("test_auroc", "cv_auroc", "test_ba")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", IMAGE_COLUMN, required=False), ColSpec("string", PATH_COLUMN, required=False)]),
    outputs=Schema([ColSpec("double", PROB_COLUMN), ColSpec("string", CLASS_COLUMN)]),
    params=ParamSchema([ParamSpec("tta", "string", "none"), ParamSpec("batch_size", "long", 64)]),
)


class SelectionError(UserError, LookupError):
    """No row has what the criterion needs."""


@dataclass
class Selection:
    row: TrainRow
    criterion: str
    value: float
    eval_run: EvalRun | None  # the evaluate run behind a test criterion (and the threshold)

    @property
    def threshold(self) -> float:
        t = self.eval_run.threshold if self.eval_run is not None else None
        return DEFAULT_THRESHOLD if t is None else t

    @property
    def fold_thresholds(self) -> dict[int, float] | None:
        """fold_ba: {k: fold model k's threshold} of the evaluate run, else None."""
        return runs.run_fold_thresholds(self.eval_run.run) if self.eval_run is not None else None


def criterion_value(row: TrainRow, criterion: str, evals: dict[str, EvalRun]) -> float | None:
    if criterion == "cv_auroc":
        folds = row.fold_metric("auroc")
        return float(np.mean(list(folds.values()))) if folds else None
    ev = evals.get(row.run_id)
    return None if ev is None else ev.metric(criterion.removeprefix(keys.TEST_PREFIX))


def select_row(rows: list[TrainRow], evals: dict[str, EvalRun], criterion: str = "test_auroc") -> Selection:
    """The row with the highest value of the criterion (ties: the first in table order).

    `evals` maps train_run_id -> evaluate run on the test set the criterion refers to.
    Rows without a finished fold run per fold cannot be ensembled and are not candidates.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"select_by must be one of {CRITERIA}, got {criterion!r}")
    scored = []
    for row in rows:
        value = criterion_value(row, criterion, evals)
        if value is not None and not missing_fold_runs(row):
            scored.append((value, row))
    if not scored:
        raise SelectionError(f"no row has {criterion} and a finished run for every fold")
    value, row = max(scored, key=lambda vr: vr[0])  # max keeps the first of equal values
    return Selection(row, criterion, value, evals.get(row.run_id))


def _requirements() -> list[str] | None:
    """The project's own dependency list (pyproject), so MLflow need not infer it by loading the model."""
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.is_file():
        return None
    return tomllib.loads(pyproject.read_text())["project"]["dependencies"]


def input_example() -> pd.DataFrame:
    """One mid-grey 128x128 crop as the REST input shows it (a base64 PNG in column `image`)."""
    from data_tools.images import CROP_SIZE, encode_png_base64
    return pd.DataFrame({IMAGE_COLUMN: [encode_png_base64(np.full((CROP_SIZE, CROP_SIZE, 3), 128, np.uint8))]})


def log_ensemble_model(row: TrainRow, threshold: float, *, fold_thresholds: dict[int, float] | None = None,
                       registered_name: str = keys.MODEL_NAME, alias: str | None = keys.SUBMISSION_ALIAS,
                       extra_config: dict | None = None, check_load: bool = True) -> ModelVersion:
    """Log the row's fold ensemble as a pyfunc model in the active run, register it, set the alias.

    `fold_thresholds` ({k: t_k}, evaluate's fold_ba) travel in the model_config and must name
    the row's folds. `check_load` builds the ensemble once before logging, so a checkpoint that
    does not load fails here, in the report, rather than on the platform.
    """
    # "device" is listed so that loaders may override it (MLflow only overrides logged keys)
    config = {"threshold": float(threshold), "device": "auto", "train_run_id": row.run_id, "backbone": row.backbone,
              "regime": row.regime, **(extra_config or {})}
    if fold_thresholds is not None:
        if set(fold_thresholds) != set(row.fold_runs):
            raise SelectionError(f"{row.name}: fold thresholds for folds {sorted(fold_thresholds)}, but its fold runs "
                                 f"are {sorted(row.fold_runs)}; evaluate it again")
        config["fold_thresholds"] = {keys.fold_model(k): float(t) for k, t in sorted(fold_thresholds.items())}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow's own handling of the input example trips a pandas deprecation inside mlflow.models.utils:
        # harmless for this DataFrame, and nothing a user of the report can act on
        warnings.filterwarnings("ignore", message="Operation with range is deprecated")
        lacking = missing_fold_runs(row)
        if lacking:
            raise SelectionError(f"{row.name}: no finished fold run for fold(s) {lacking}")
        try:  # each fold's checkpoint folder, checked for its config.json
            dirs = runs.download_checkpoints(row.fold_runs, tmp)
        except runs.RunLookupError as e:
            raise SelectionError(f"{row.name}: {e}") from None
        artifacts = {keys.fold_model(k): path for k, path in dirs.items()}
        if check_load:
            ensemble_from_artifacts(artifacts, config.get("fold_thresholds"), device="cpu")
        info = mlflow.pyfunc.log_model(
            name=keys.SUBMISSION_ARTIFACT, python_model=str(ROOT / "analysis" / "pyfunc_model.py"),
            artifacts=artifacts, model_config=config, input_example=input_example(),
            code_paths=[str(ROOT / pkg) for pkg in ("analysis", "models", "data_tools")],
            signature=SIGNATURE, pip_requirements=_requirements(), registered_model_name=registered_name,
            metadata={"train_run_id": row.run_id, "threshold": float(threshold)})
    client = MlflowClient()
    version = client.get_model_version(registered_name, str(info.registered_model_version))
    for key, value in config.items():
        client.set_model_version_tag(registered_name, version.version, key,
                                     json.dumps(value) if isinstance(value, dict) else str(value))
    if alias:
        client.set_registered_model_alias(registered_name, alias, version.version)
    return version
