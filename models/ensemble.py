"""The fold models of a train_cv run as one classifier.

Used by `evaluate`, the registered pyfunc model and the platform container, so it takes
plain uint8 crops and does its own resize + normalisation (each fold model by its spec). It
loads from checkpoint folders; finding them in MLflow is `analysis.runs`'s job.

The ensemble's score is the mean probability over the fold models, or, given each fold
model's own threshold t_k (`fold_thresholds`: its BA-optimal threshold, calibrated on its
out-of-fold predictions, evaluate's `threshold=fold_ba`), sigmoid(mean_k(logit_k - logit t_k)):
every model's decision boundary moved to logit 0, so the ensemble decides at 0.5, and the
score stays continuous (a shift per model: AUROC as for the mean logit). A threshold chosen
on single models' pooled out-of-fold predictions does not transfer to the mean of five models
(their calibrations differ); each model's own boundary does.

An ensemble of several train_cv rows (report `ensemble=greedy`) is one FoldEnsemble of all their
fold models with a weight per model (`weights`: the row's pick count over its number of folds):
sigmoid(sum_k w_k (logit_k - logit t_k) / sum_k w_k), the weighted mean of the rows' own scores
in logit space. Each model keeps its own spec (input size, normalisation).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from models.backbones import BackboneSpec
from models.checkpoint import load_checkpoint
from models.classifier import predict_logits

FOLD_THRESHOLD_EPS = 1e-6  # t_k is kept inside (0, 1): a cut below every score would be logit -inf


def fold_offsets(fold_thresholds: Sequence[float]) -> torch.Tensor:
    """[K] logit(t_k), t_k clipped to [eps, 1 - eps]."""
    t = torch.tensor([float(v) for v in fold_thresholds], dtype=torch.float64)
    return torch.logit(t.clamp(FOLD_THRESHOLD_EPS, 1 - FOLD_THRESHOLD_EPS)).float()


def combine(logits: torch.Tensor, offsets: torch.Tensor | None = None,
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """[N] ensemble score of [K, N] fold-model logits: the mean probability, or with
    per-model offsets (logit t_k) sigmoid(mean_k(logit - offset_k)); `weights` [K] make
    either mean a weighted one."""
    scores = torch.sigmoid(logits) if offsets is None else logits - offsets.to(logits.device)[:, None]
    if weights is None:
        mean = scores.mean(0)
    else:
        w = weights.to(logits.device, logits.dtype)
        mean = (scores * (w / w.sum())[:, None]).sum(0)
    return mean if offsets is None else torch.sigmoid(mean)


class FoldEnsemble:
    def __init__(self, models: Sequence[nn.Module], specs: Sequence[BackboneSpec], device: str | torch.device = "cpu",
                 fold_thresholds: Sequence[float] | None = None, weights: Sequence[float] | None = None):
        if not models:
            raise ValueError("an ensemble needs at least one model")
        if fold_thresholds is not None and len(fold_thresholds) != len(models):
            raise ValueError(f"{len(fold_thresholds)} fold thresholds for {len(models)} models")
        if weights is not None and (len(weights) != len(models) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"weights {list(weights)} for {len(models)} models: one non-negative weight each, "
                             f"not all zero")
        self.device = torch.device(device)
        self.models = [m.to(self.device).eval() for m in models]
        self.specs = list(specs)
        self.fold_thresholds = None if fold_thresholds is None else [float(t) for t in fold_thresholds]
        self.offsets = None if fold_thresholds is None else fold_offsets(fold_thresholds)
        self.weights = None if weights is None else torch.tensor([float(w) for w in weights], dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.models)

    @classmethod
    def from_dirs(cls, dirs: Sequence[str | Path], device: str | torch.device = "cpu",
                  fold_thresholds: Sequence[float] | None = None,
                  weights: Sequence[float] | None = None) -> "FoldEnsemble":
        """From checkpoint folders (model.safetensors + config.json), offline; `fold_thresholds`
        and `weights` in the order of `dirs`."""
        loaded = [load_checkpoint(d, device) for d in dirs]
        return cls([m for m, _, _ in loaded], [s for _, s, _ in loaded], device, fold_thresholds, weights)

    @torch.inference_mode()
    def predict_logits(self, images: np.ndarray, batch_size: int = 64, tta: str | bool = "none") -> np.ndarray:
        """float32 [K, N]: each fold model's logit for uint8 crops [N, H, W, 3]."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 crops [N, H, W, 3], got {images.dtype} {images.shape}")
        out = np.empty((len(self.models), len(images)), np.float32)
        for s in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.array(images[s:s + batch_size]))  # a writable copy of the slice
            for i, (m, spec) in enumerate(zip(self.models, self.specs)):
                out[i, s:s + len(batch)] = predict_logits(m, spec, batch, self.device, tta).cpu().numpy()
        return out

    def predict_proba(self, images: np.ndarray, batch_size: int = 64, tta: str | bool = "none") -> np.ndarray:
        """float32 [N] score of atypical for uint8 crops [N, H, W, 3] (see the module docstring);
        `tta`: none | flips | d4 (models.tta)."""
        logits = torch.from_numpy(self.predict_logits(images, batch_size, tta))
        weights = None if self.weights is None else self.weights.float()
        return combine(logits, self.offsets, weights).numpy()
