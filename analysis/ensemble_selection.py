"""Ensembles across rows (report `ensemble=greedy`): forward selection with replacement
(Caruana et al., ICML 2004) on the rows' pooled out-of-fold predictions.

Rows trained on the same CV store with the same fold assignment predicted every crop once,
each by a fold model that did not see it, so their out-of-fold (OOF) predictions line up crop
by crop. A row's OOF score is moved by its own fold thresholds, z = logit(p) - logit(t_k)
(as evaluate's `fold_ba`: each fold model's boundary at 0), and an ensemble's score is
sigmoid(sum_r c_r z_r / sum_r c_r) with c_r the row's pick count (models/ensemble.py
combines the fold models the same way on new crops). Start empty; repeatedly add the row
(again, if it is the best) whose addition most improves CRITERION; stop after `size` picks or
when no addition improves it. The ensemble's threshold is the calibrated BA-optimal threshold
of its OOF scores (models.metrics.calibrated_ba_threshold, as evaluate fits fold thresholds).

Pure functions of DataFrames: the report finds the rows, their OOF frames and thresholds.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from models.ensemble import FOLD_THRESHOLD_EPS
from models.metrics import auroc, binary_metrics, calibrated_ba_threshold

# The one criterion of the selection: balanced accuracy at the ensemble's own fitted threshold
# on the pooled OOF scores (MIDOG ranks by BA), ties broken by the OOF AUROC.
CRITERION = "OOF balanced accuracy at the ensemble's calibrated threshold (ties: OOF AUROC)"
PROB_EPS = 1e-7  # OOF probabilities kept inside (0, 1) before the logit


class EnsembleError(ValueError):
    """The rows' OOF predictions cannot be pooled (different crops, folds or labels)."""


def _logit(p: np.ndarray, eps: float) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
    return np.log(p / (1 - p))


def shifted_logits(oof: pd.DataFrame, fold_thresholds: dict[int, float]) -> np.ndarray:
    """[N] logit(p) - logit(t_k) of a row's OOF predictions (sample_id, label, prob, fold)."""
    missing = sorted(set(oof["fold"].astype(int)) - set(fold_thresholds))
    if missing:
        raise EnsembleError(f"no fold threshold for fold(s) {missing}")
    t = oof["fold"].astype(int).map({int(k): float(v) for k, v in fold_thresholds.items()}).to_numpy(np.float64)
    return _logit(oof["prob"].to_numpy(), PROB_EPS) - _logit(t, FOLD_THRESHOLD_EPS)


def fold_assignment(oof: pd.DataFrame) -> str:
    """A short digest of the (sample_id, fold) pairs: rows with the same one share their folds."""
    pairs = oof[["sample_id", "fold"]].astype(str).sort_values(["sample_id", "fold"])
    return hashlib.sha256("\n".join(pairs["sample_id"] + ":" + pairs["fold"]).encode()).hexdigest()[:16]


def candidates(rows: dict[str, tuple[str, pd.DataFrame]]) -> tuple[list[str], dict[str, str]]:
    """(the names of the rows that can be pooled, {name: why left out}) for rows {name: (store digest,
    OOF frame)} in table order: the largest set sharing the store digest and the fold assignment
    (ties: the set of the first row)."""
    keys = {name: (digest, fold_assignment(oof)) for name, (digest, oof) in rows.items()}
    counts = Counter(keys.values())
    best = max(counts, key=lambda k: (counts[k], -list(keys.values()).index(k)), default=None)
    kept = [n for n, k in keys.items() if k == best]
    left = {}
    for name, (digest, folds) in keys.items():
        if (digest, folds) != best:
            left[name] = (f"CV store {digest[:12] or '?'} differs from {best[0][:12] or '?'}" if digest != best[0]
                          else "same store but another fold assignment (its OOF crops/folds differ)")
    return kept, left


def align(oofs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The rows' OOF frames on one index (sample_id): label, fold, and one column `prob:<name>` per row;
    EnsembleError when they do not cover the same crops with the same folds and labels."""
    first_name, first = next(iter(oofs.items()))
    base = first[["sample_id", "label", "fold"]].set_index("sample_id")
    if base.index.duplicated().any():
        raise EnsembleError(f"{first_name}: a sample_id appears twice in its out-of-fold predictions")
    for name, oof in oofs.items():
        other = oof.set_index("sample_id")
        if set(other.index) != set(base.index) or other.index.duplicated().any():
            raise EnsembleError(f"{name}: its out-of-fold crops differ from {first_name}'s")
        other = other.loc[base.index]
        if (other["fold"].to_numpy() != base["fold"].to_numpy()).any():
            raise EnsembleError(f"{name}: its fold assignment differs from {first_name}'s")
        if (other["label"].to_numpy() != base["label"].to_numpy()).any():
            raise EnsembleError(f"{name}: its labels differ from {first_name}'s")
    return base.reset_index()


def score(z: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[N] sigmoid of the count-weighted mean of the rows' shifted logits z [R, N]."""
    counts = np.asarray(counts, np.float64)
    return 1 / (1 + np.exp(-(counts[:, None] * z).sum(0) / counts.sum()))


def criterion(y: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
    """(BA at the calibrated threshold, AUROC, that threshold) of scores s: CRITERION, then its tie-break."""
    t = calibrated_ba_threshold(y, s)
    return binary_metrics(y, s, t)["ba"], auroc(y, s), t


@dataclass
class Step:
    row: str
    ba: float
    auroc: float


@dataclass
class GreedyEnsemble:
    """The selection: picks in order (with their criterion after each), the weights (pick counts),
    the OOF scores (sample_id, label, fold, score) and the threshold fitted on them."""
    steps: list[Step]
    weights: dict[str, int]
    oof: pd.DataFrame
    threshold: float
    fold_thresholds: dict[str, dict[int, float]] = field(default_factory=dict)  # each member's t_k
    rejected: Step | None = None  # the best addition when the selection stopped early: it did not improve

    @property
    def ba(self) -> float:
        return self.steps[-1].ba

    @property
    def auroc(self) -> float:
        return self.steps[-1].auroc

    def fold_metric(self, name: str = "auroc") -> dict[int, float]:
        """{k: AUROC (or BA at the ensemble's threshold) of the ensemble's OOF scores on fold k}."""
        out = {}
        for k, g in self.oof.groupby("fold", sort=True):
            y, s = g["label"].to_numpy(int), g["score"].to_numpy(float)
            out[int(k)] = auroc(y, s) if name == "auroc" else binary_metrics(y, s, self.threshold)[name]
        return out


def greedy_ensemble(oofs: dict[str, pd.DataFrame], fold_thresholds: dict[str, dict[int, float]],
                    size: int) -> GreedyEnsemble:
    """Forward selection with replacement over the rows `oofs` ({name: OOF frame}, table order:
    ties go to the first), each shifted by its `fold_thresholds`; at most `size` picks."""
    if not oofs:
        raise EnsembleError("no rows to ensemble")
    if size < 1:
        raise EnsembleError(f"ensemble_size must be at least 1, got {size}")
    base = align(oofs)
    names = list(oofs)
    z = np.stack([shifted_logits(oofs[n].set_index("sample_id").loc[base["sample_id"]].reset_index(),
                                 fold_thresholds[n]) for n in names])
    y = base["label"].to_numpy(int)
    if len(np.unique(y)) < 2:
        raise EnsembleError("the out-of-fold predictions hold one class only")
    counts = np.zeros(len(names))
    steps: list[Step] = []
    best, rejected = (-np.inf, -np.inf), None
    for _ in range(size):
        trials = []
        for i in range(len(names)):
            trial = counts.copy()
            trial[i] += 1
            ba, auc, _ = criterion(y, score(z, trial))
            trials.append(((ba, auc), i))
        value, i = max(trials, key=lambda t: t[0])  # max keeps the first of equal values
        if value <= best:
            rejected = Step(names[i], *value)
            break  # no addition improves the criterion
        best = value
        counts[i] += 1
        steps.append(Step(names[i], *value))
    s = score(z, counts)
    threshold = criterion(y, s)[2]
    weights = {names[i]: int(c) for i, c in enumerate(counts) if c}
    return GreedyEnsemble(steps, weights, base.assign(score=s), threshold,
                          {n: dict(fold_thresholds[n]) for n in weights}, rejected)
