"""The submission: pick a row by a criterion, log its fold ensemble as an MLflow pyfunc model,
register it and give it the `submission` alias.

The pyfunc model is logged from code (`analysis/pyfunc_model.py`: loading it runs that file and
unpickles nothing) with an input example and a signature; it carries the fold checkpoints
(model.safetensors + config.json each) as artifacts and this project's library code, so
`mlflow models serve` and the container need nothing else. Its REST input is a DataFrame with one crop per row, either as a
base64-encoded image (column `image`: PNG, JPEG or TIFF bytes of an RGB crop) or as a
path the server can read (column `path`); the output has, per crop, `probability` (the
ensemble's score of atypical, models/ensemble.py) and `class` ("atypical" when probability >=
the model's threshold, else "normal"); params `tta` (none | flips | d4) and `batch_size`. The
threshold rule is the one the selected row's evaluate run used: the threshold and, for
`fold_ba`, each fold model's own threshold (model_config `fold_thresholds`), so the model
decides offline as evaluate did.
"""
from __future__ import annotations

import json
import os
import re
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
from data_tools.constants import ATYPICAL, LABEL_NAMES, NORMAL
from data_tools.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_THRESHOLD = 0.5
CRITERIA = ("test_auroc", "cv_auroc", "test_ba")
IMAGE_COLUMN, PATH_COLUMN = "image", "path"
PROB_COLUMN, CLASS_COLUMN = "probability", "class"

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", IMAGE_COLUMN, required=False), ColSpec("string", PATH_COLUMN, required=False)]),
    outputs=Schema([ColSpec("double", PROB_COLUMN), ColSpec("string", CLASS_COLUMN)]),
    params=ParamSchema([ParamSpec("tta", "string", "none"), ParamSpec("batch_size", "long", 64)]),
)


class ModelError(UserError, LookupError):
    """`predict`'s model is not there or is not this project's ensemble."""


class OutputError(UserError, ValueError):
    """The predictions cannot be written where asked (format, folder, permissions)."""


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


def _fold_number(name: str) -> int:
    return int(re.sub(r"\D", "", name) or 0)


class EnsemblePyfunc(mlflow.pyfunc.PythonModel):
    """The fold ensemble behind MLflow's pyfunc interface (see the module docstring)."""

    def load_context(self, context) -> None:
        from models.checkpoint import resolve_device
        from models.ensemble import FoldEnsemble  # the heavy part; imported where the model loads
        config = context.model_config or {}
        names = sorted(context.artifacts, key=_fold_number)
        per_fold = config.get("fold_thresholds")  # {"fold<k>": t_k} (fold_ba), named as the artifacts
        device = str(resolve_device(config.get("device")))  # override: MLFLOW_PYFUNC_INFERENCE_CONFIG
        self.config = config
        ensemble = FoldEnsemble.from_dirs([context.artifacts[k] for k in names], device=device,
                                          fold_thresholds=[per_fold[k] for k in names] if per_fold else None)
        self.predictor = Predictor(ensemble, float(config.get("threshold", DEFAULT_THRESHOLD)), "pyfunc")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from data_tools.images import decode_base64_image, load_crop
        params = params or {}
        images = []
        for i, (image, path) in enumerate(zip(_column(model_input, IMAGE_COLUMN), _column(model_input, PATH_COLUMN))):
            if isinstance(image, str) and image:
                images.append(decode_base64_image(image, f"row {i} ({IMAGE_COLUMN})"))
            elif isinstance(path, str) and path:
                images.append(load_crop(path, size=None))
            else:
                raise ValueError(f"row {i}: give a base64 image in column {IMAGE_COLUMN!r} or a file in {PATH_COLUMN!r}")
        if len({im.shape for im in images}) > 1:
            raise ValueError(f"crops differ in size {sorted({im.shape for im in images})}; send crops of one size")
        if not images:
            return pd.DataFrame({PROB_COLUMN: pd.Series(dtype=float), CLASS_COLUMN: pd.Series(dtype=str)})
        prob, cls = self.predictor.predict(np.stack(images), params.get("tta", "none"), int(params.get("batch_size", 64)))
        return pd.DataFrame({PROB_COLUMN: prob, CLASS_COLUMN: cls})


def _column(df: pd.DataFrame, name: str) -> list:
    return df[name].tolist() if name in df.columns else [None] * len(df)


def classes(prob: np.ndarray, threshold: float) -> list[str]:
    """'atypical' where prob >= threshold, else 'normal'."""
    return [LABEL_NAMES[ATYPICAL] if p >= threshold else LABEL_NAMES[NORMAL] for p in np.asarray(prob)]


def _requirements() -> list[str] | None:
    """The project's own dependency list (pyproject), so MLflow need not infer it by loading the model."""
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.is_file():
        return None
    return tomllib.loads(pyproject.read_text())["project"]["dependencies"]


def download_checkpoints(row: TrainRow, dst: str | Path) -> dict[str, str]:
    """{"fold<k>": local checkpoint folder} of the row's fold runs (all of them, each with its config.json)."""
    lacking = missing_fold_runs(row)
    if lacking:
        raise SelectionError(f"{row.name}: no finished fold run for fold(s) {lacking}")
    try:
        return {f"fold{k}": path for k, path in runs.download_checkpoints(row.fold_runs, dst).items()}
    except runs.RunLookupError as e:
        raise SelectionError(f"{row.name}: {e}") from None


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
        config["fold_thresholds"] = {f"fold{k}": float(t) for k, t in sorted(fold_thresholds.items())}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow's own handling of the input example trips a pandas deprecation inside mlflow.models.utils:
        # harmless for this DataFrame, and nothing a user of the report can act on
        warnings.filterwarnings("ignore", message="Operation with range is deprecated")
        artifacts = download_checkpoints(row, tmp)
        if check_load:
            from models.ensemble import FoldEnsemble
            names = sorted(artifacts, key=_fold_number)
            FoldEnsemble.from_dirs([artifacts[k] for k in names], device="cpu",
                                   fold_thresholds=[config["fold_thresholds"][k] for k in names]
                                   if fold_thresholds is not None else None)
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


@dataclass
class Predictor:
    """A loaded ensemble with its threshold: what `predict` and the container run."""
    ensemble: object  # models.ensemble.FoldEnsemble
    threshold: float
    source: str

    def predict(self, images: np.ndarray, tta: str = "none", batch_size: int = 64,
                chunk: int = 1024) -> tuple[np.ndarray, list[str]]:
        """Scores of atypical and classes for uint8 RGB crops [N, H, W, 3] (may be a memmap);
        `tta`: none | flips | d4."""
        starts = range(0, len(images), chunk)
        if len(images) > chunk:
            from tqdm import tqdm
            starts = tqdm(starts, desc="predict", unit="chunk", mininterval=2.0)
        parts = [np.asarray(self.ensemble.predict_proba(np.array(images[s:s + chunk]), batch_size=batch_size,
                                                        tta=tta), dtype=np.float64) for s in starts]
        prob = np.concatenate(parts) if parts else np.zeros(0)
        return prob, classes(prob, self.threshold)


def load_predictor(model: str, device: str = "auto", threshold: float | None = None) -> Predictor:
    """The ensemble behind `model` and its threshold rule (`threshold` overrides the threshold).

    `model`: a model URI (`models:/name@alias`, `models:/name/3`, `runs:/<id>/submission_model`),
    a local pyfunc model folder (as baked into the container), or the id of a train_cv run
    (its fold checkpoints; the threshold rule of its newest evaluate run, else 0.5).
    """
    from models.checkpoint import resolve_device
    device = str(resolve_device(device))
    if re.fullmatch(r"[0-9a-f]{32}", model):
        ev = runs.latest_evaluate_run(model)
        found = runs.run_threshold(ev) if ev is not None else None
        ensemble = runs.load_ensemble(model, device=device,
                                      fold_thresholds=runs.run_fold_thresholds(ev) if ev is not None else None)
        t = threshold if threshold is not None else (found if found is not None else DEFAULT_THRESHOLD)
        return Predictor(ensemble, float(t), f"train_cv run {model}")
    if "://" not in model and ":/" not in model and not (Path(model) / "MLmodel").is_file():
        raise ModelError(f"{model}: not a model URI, a pyfunc model folder (no MLmodel file) or a run id")
    pyfunc = mlflow.pyfunc.load_model(model, model_config={"device": device})
    inner = pyfunc.unwrap_python_model()
    if not isinstance(inner, EnsemblePyfunc):
        raise ModelError(f"{model} is a {type(inner).__name__}, not this project's ensemble model")
    t = inner.predictor.threshold if threshold is None else threshold
    return Predictor(inner.predictor.ensemble, float(t), model)


def export_model(model: str, dst: str | Path) -> Path:
    """Copy a registered/logged pyfunc model to a local folder (the container bakes this in)."""
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(dst)))
    if not (local / "MLmodel").is_file():
        raise FileNotFoundError(f"{model} downloaded to {local} but holds no MLmodel file")
    return local


def platform_entries(prob: np.ndarray, cls: list[str]) -> list[dict]:
    """The platform's list: {"class": "atypical" | "normal", "confidence": float}, one per crop."""
    return [{"class": c, "confidence": float(p)} for p, c in zip(np.asarray(prob, dtype=np.float64), cls)]


OUTPUT_SUFFIXES = (".json", ".csv")


def check_output(path: str | Path) -> Path:
    """Refuse, before any work, an output that cannot be written: another format, a folder, no write access."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise OutputError(f"{path}: the output must end in .json (the platform's format) or .csv")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name ending in .json or .csv")
    parent = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: {parent} is not writable")
    return path


def write_predictions(path: str | Path, ids: list[str], prob: np.ndarray, cls: list[str]) -> Path:
    """`*.csv`: id, probability, class; `*.json`: the platform JSON. Written atomically."""
    path = check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix.lower() == ".csv":
        pd.DataFrame({"id": ids, PROB_COLUMN: np.asarray(prob, dtype=np.float64), CLASS_COLUMN: cls}).to_csv(tmp, index=False)
    else:
        tmp.write_text(json.dumps(platform_entries(prob, cls), indent=2))
    os.replace(tmp, path)
    return path
