"""Serving the fold ensemble: load a registered, exported or train_cv model with its threshold
rule, score crops, and write the predictions. `predict` (and the container), the pyfunc model
(`analysis/pyfunc_model.py`) and the benchmarks use it; `analysis/submission.py` logs and
registers the model this module loads.

The pyfunc model (`EnsemblePyfunc`): its REST input is a DataFrame with one crop per row,
either as a base64-encoded image (column `image`: PNG, JPEG or TIFF bytes of an RGB crop) or
as a path the server can read (column `path`); the output has, per crop, `probability` (the
ensemble's score of atypical, models/ensemble.py) and `class` ("atypical" when probability >=
the model's threshold, else "normal"); params `tta` (none | flips | d4; by default the TTA the
threshold was chosen under, model_config `tta`) and `batch_size`. The model_config holds the
threshold and, for `fold_ba`, each fold model's own threshold (`fold_thresholds`, named as the
checkpoint artifacts), so the model decides as evaluate did. An ensemble of rows (report
`ensemble=greedy`) names its artifacts `row<r>_fold<k>` and adds `member_weights` (same names):
one FoldEnsemble of every member's fold models, each with its own input size and normalisation.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from analysis import keys, runs
from data_tools.atomic import atomic_file
from data_tools.constants import ATYPICAL, LABEL_NAMES, NORMAL
from data_tools.errors import UserError

DEFAULT_THRESHOLD = 0.5
IMAGE_COLUMN, PATH_COLUMN = "image", "path"
PROB_COLUMN, CLASS_COLUMN = "probability", "class"
OUTPUT_SUFFIXES = (".json", ".csv")


class ModelError(UserError, LookupError):
    """`predict`'s model is not there or is not this project's ensemble."""


class OutputError(UserError, ValueError):
    """The predictions cannot be written where asked (format, folder, permissions)."""


def ensemble_from_artifacts(artifacts: dict[str, str], fold_thresholds: dict[str, float] | None = None,
                            device: str = "cpu", member_weights: dict[str, float] | None = None):
    """The fold ensemble (models.ensemble.FoldEnsemble) of the pyfunc model's checkpoint artifacts
    ({keys.fold_model(k): folder}), in fold order; `fold_thresholds` (fold_ba) named as the artifacts.
    An ensemble of rows names its artifacts keys.member_model(r, k) and gives each a weight
    (`member_weights`, same names; its fold thresholds name them all)."""
    from models.ensemble import FoldEnsemble  # the heavy part; imported where the model loads
    if member_weights:
        names = sorted(member_weights)
        missing = [n for n in names if n not in artifacts or n not in (fold_thresholds or {})]
        if missing:
            raise ValueError(f"ensemble members {missing} lack a checkpoint artifact or a fold threshold")
        return FoldEnsemble.from_dirs([artifacts[n] for n in names], device=device,
                                      fold_thresholds=[float(fold_thresholds[n]) for n in names],
                                      weights=[float(member_weights[n]) for n in names])
    dirs = keys.fold_values(artifacts, None)
    per_fold = keys.fold_values(fold_thresholds, None) if fold_thresholds else None
    return FoldEnsemble.from_dirs(list(dirs.values()), device=device,
                                  fold_thresholds=[per_fold[k] for k in dirs] if per_fold else None)


class EnsemblePyfunc(mlflow.pyfunc.PythonModel):
    """The fold ensemble behind MLflow's pyfunc interface (see the module docstring)."""

    def load_context(self, context) -> None:
        from models.checkpoint import resolve_device
        config = context.model_config or {}
        device = str(resolve_device(config.get("device")))  # override: MLFLOW_PYFUNC_INFERENCE_CONFIG
        self.config = config
        ensemble = ensemble_from_artifacts(context.artifacts, config.get("fold_thresholds"), device,
                                           config.get("member_weights"))
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
        tta = params.get("tta", self.config.get("tta", "none"))  # the signature's default is the selection's TTA
        prob, cls = self.predictor.predict(np.stack(images), tta, int(params.get("batch_size", 64)))
        return pd.DataFrame({PROB_COLUMN: prob, CLASS_COLUMN: cls})


def _column(df: pd.DataFrame, name: str) -> list:
    return df[name].tolist() if name in df.columns else [None] * len(df)


def classes(prob: np.ndarray, threshold: float) -> list[str]:
    """'atypical' where prob >= threshold, else 'normal'."""
    return [LABEL_NAMES[ATYPICAL] if p >= threshold else LABEL_NAMES[NORMAL] for p in np.asarray(prob)]


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
    try:
        pyfunc = mlflow.pyfunc.load_model(model, model_config={"device": device})
    except MlflowException as e:
        hint = ("; `mlflow run . -e report` registers the submission model (after train_cv and evaluate; "
                "`make demo` runs the whole workflow)" if model.startswith("models:/") else "")
        raise ModelError(f"{model}: {e.message.splitlines()[0]}{hint}") from None
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
    with atomic_file(path) as tmp:
        if path.suffix.lower() == ".csv":
            pd.DataFrame({"id": ids, PROB_COLUMN: np.asarray(prob, dtype=np.float64), CLASS_COLUMN: cls}).to_csv(
                tmp, index=False)
        else:
            tmp.write_text(json.dumps(platform_entries(prob, cls), indent=2))
    return path
