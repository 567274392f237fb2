"""Rows for the ensemble-of-rows tests (report ensemble=greedy): the tiny ConvNeXt row of
conftest's `tiny_train_run` (48 px, ImageNet normalisation) and a tiny ViT row at 64 px with
Lunit's normalisation, each fold run holding out-of-fold predictions of the same crops in the
same folds (complementary noise: the greedy selection picks both), and the ensemble's
probabilities computed directly from the members' logits."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from analysis import keys
from models.backbones import resolve_backbone
from models.checkpoint import save_checkpoint
from models.classifier import build_classifier
from models.ensemble import FoldEnsemble

DIGEST = "d" * 64  # the CV store both rows trained on
VIT_SIZE = 64


def vit_checkpoints(root: Path) -> list[Path]:
    """Two fold checkpoints of the demo ViT at VIT_SIZE px (random init, seeds 3 and 4)."""
    spec = resolve_backbone("lunit", "demo")
    spec = dataclasses.replace(spec, input_size=VIT_SIZE, model_kwargs={**spec.model_kwargs, "img_size": VIT_SIZE})
    dirs = []
    for k in (1, 2):
        torch.manual_seed(k + 2)
        dirs.append(save_checkpoint(build_classifier(spec, "none"), spec, root / f"vit_fold{k}"))
    return dirs


def complementary_oof(seed: int, n: int = 160) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two rows' OOF predictions (sample_id, label, prob, fold) of the same crops: one signal, independent noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    fold = np.arange(n) // (n // 2) + 1
    frames = []
    for _ in range(2):
        logit = 1.2 * (2 * y - 1) + 1.5 * rng.normal(size=n)
        frames.append(pd.DataFrame({"sample_id": [f"c{i:03d}" for i in range(n)], "label": y,
                                    "prob": 1 / (1 + np.exp(-logit)), "fold": fold}))
    return frames[0], frames[1]


def _log_oof(fold_run_id: str, oof: pd.DataFrame) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / keys.VAL_PREDICTIONS
        oof.drop(columns="fold").to_csv(path, index=False)
        MlflowClient().log_artifact(fold_run_id, str(path))


def add_oof(train_run_id: str, oof: pd.DataFrame, digest: str = DIGEST) -> None:
    """Give a train_cv run (and its fold runs) OOF predictions and the store digest."""
    from analysis.runs import fold_runs
    client = MlflowClient()
    client.log_param(train_run_id, keys.P_DATA_DIGEST, digest)
    for k, run in fold_runs(client, train_run_id).items():
        _log_oof(run.info.run_id, oof[oof["fold"] == k])


def log_row(backbone: str, regime: str, checkpoints: list[Path], oof: pd.DataFrame, digest: str = DIGEST,
            fold_auroc: float = 0.8) -> str:
    """A finished train_cv run with a fold run (LoggedModel + OOF predictions) per checkpoint; its id."""
    from pipelines.fold_model import log_fold_model
    tags = {keys.STEP: keys.TRAIN_CV, keys.PROFILE: "demo", keys.BACKBONE: backbone, keys.REGIME: regime}
    with mlflow.start_run(run_name=f"{backbone} {regime}", tags=tags) as parent:
        mlflow.log_params({keys.P_BACKBONE: backbone, keys.P_REGIME: regime, keys.P_FOLDS: "1,2",
                           keys.P_DATA_DIGEST: digest})
        for k, folder in enumerate(checkpoints, 1):
            mlflow.log_metrics({keys.fold_metric(k, "auroc"): fold_auroc, keys.fold_metric(k, "ba"): 0.7})
            with mlflow.start_run(nested=True, tags={keys.STEP: keys.TRAIN_CV, keys.FOLD: str(k)}) as fold:
                log_fold_model(k, folder, 1, {keys.BEST_VAL_AUROC: fold_auroc, keys.BEST_VAL_BA: 0.7})
            _log_oof(fold.info.run_id, oof[oof["fold"] == k])
    return parent.info.run_id


def expected_probabilities(members: list[tuple[list[Path], dict[int, float], float]], images: np.ndarray,
                           tta: str = "none") -> np.ndarray:
    """sigmoid(sum_r w_r mean_k(logit_rk - logit t_rk) / sum_r w_r) for members (fold checkpoints, {k: t_k},
    weight w_r), each fold model's logit computed on its own (its input size and normalisation)."""
    total, weights = np.zeros(len(images)), 0.0
    for dirs, thresholds, weight in members:
        logits = FoldEnsemble.from_dirs(dirs).predict_logits(images, tta=tta).astype(np.float64)
        t = np.array([thresholds[k] for k in range(1, len(dirs) + 1)])
        total += weight * (logits - np.log(t / (1 - t))[:, None]).mean(0)
        weights += weight
    return 1 / (1 + np.exp(-total / weights))
