"""Binary classification metrics of the study (fractions in [0, 1]), their bootstrap
intervals and the BA-optimal threshold (the best cut, or by a calibration). Shared by
train_cv, evaluate and the report.

AUROC comes from the probabilities; accuracy, sensitivity, specificity and balanced
accuracy (BA, the challenge's metric) from the labels at a threshold (`prob >= t` is
atypical). A metric that is undefined on the data (AUROC with one class, sensitivity
without positives) is NaN, never an exception, so that per-domain tables still build.
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

METRICS = ("auroc", "accuracy", "sensitivity", "specificity", "ba")


def _arrays(y, p) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y).astype(np.int64).ravel(), np.asarray(p, dtype=np.float64).ravel()
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} probabilities")
    if len(y) and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got {sorted(set(np.unique(y)) - {0, 1})[:5]}")
    return y, p


def auroc(y, p) -> float:
    y, p = _arrays(y, p)
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def binary_metrics(y, p, threshold: float = 0.5) -> dict[str, float]:
    """{auroc, accuracy, sensitivity, specificity, ba} at `threshold`."""
    y, p = _arrays(y, p)
    pred = p >= threshold
    tp, fn = float(np.sum(pred & (y == 1))), float(np.sum(~pred & (y == 1)))
    tn, fp = float(np.sum(~pred & (y == 0))), float(np.sum(pred & (y == 0)))
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {"auroc": auroc(y, p), "accuracy": _ratio(tp + tn, len(y)), "sensitivity": sens, "specificity": spec,
            "ba": float((sens + spec) / 2)}


def ba_optimal_threshold(y, p) -> float:
    """The threshold that maximises BA on (y, p): the midpoint between the two scores
    where the best cut lies (ties broken towards 0.5), so it generalises to new scores."""
    y, p = _arrays(y, p)
    if len(np.unique(y)) < 2:
        raise ValueError("the BA-optimal threshold needs both classes")
    scores = np.unique(p)
    cuts = np.concatenate([[scores[0] - 1e-6], (scores[:-1] + scores[1:]) / 2, [scores[-1] + 1e-6]])
    order = np.argsort(p)
    ys = y[order]
    # positives and negatives strictly below each cut
    below = np.searchsorted(p[order], cuts, side="left")
    pos_below = np.concatenate([[0], np.cumsum(ys)])[below]
    neg_below = below - pos_below
    n_pos, n_neg = ys.sum(), len(ys) - ys.sum()
    ba = ((n_pos - pos_below) / n_pos + neg_below / n_neg) / 2
    best = np.flatnonzero(ba >= ba.max() - 1e-12)
    return float(np.clip(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]], 0.0, 1.0))


def _logit(p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    p = np.clip(p, eps, 1 - eps)
    return np.log(p / (1 - p))


def calibrated_ba_threshold(y, p) -> float:
    """The BA-optimal threshold by a Platt calibration: a logistic fit of y on logit(p), and
    the score where the calibrated probability equals the prevalence of y (for calibrated
    probabilities, deciding above the prior maximises the expected BA). Two parameters fitted
    on all the predictions: steadier than the best cut on a few hundred (ba_optimal_threshold),
    which it falls back to when the fit's slope is not positive (a model worse than chance)."""
    y, p = _arrays(y, p)
    if len(np.unique(y)) < 2:
        raise ValueError("the BA-optimal threshold needs both classes")
    fit = LogisticRegression(C=1e4).fit(_logit(p)[:, None], y)  # C: all but unregularised, finite if separable
    slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if slope <= 0:
        return ba_optimal_threshold(y, p)
    return float(1 / (1 + np.exp(-(_logit(np.array([y.mean()]))[0] - intercept) / slope)))


def fold_ba_thresholds(y, p, folds) -> dict[int, float]:
    """{k: the calibrated BA-optimal threshold of fold model k on its own out-of-fold predictions}
    (evaluate's `fold_ba`, and the report's ensembles); ValueError names a fold with one class."""
    y, p = _arrays(y, p)
    folds = np.asarray(folds).astype(np.int64).ravel()
    out = {}
    for k in np.unique(folds):
        mask = folds == k
        if len(np.unique(y[mask])) < 2:
            raise ValueError(f"fold {int(k)}'s out-of-fold predictions hold one class only")
        out[int(k)] = calibrated_ba_threshold(y[mask], p[mask])
    return out


def _weighted_metrics(y: np.ndarray, p: np.ndarray, w: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """The metrics for many resamples at once: `w` [B, N] holds each sample's multiplicity."""
    pos, neg = (y == 1), (y == 0)
    pred = p >= threshold
    tp, fn = (w * (pred & pos)).sum(1), (w * (~pred & pos)).sum(1)
    tn, fp = (w * (~pred & neg)).sum(1), (w * (pred & neg)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens, spec = tp / (tp + fn), tn / (tn + fp)
        acc = (tp + tn) / w.sum(1)
        # AUROC by the Mann-Whitney statistic on score groups (ties count one half)
        order = np.argsort(p, kind="stable")
        ps, ys, ws = p[order], y[order], w[:, order]
        starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
        pos_g = np.add.reduceat(ws * (ys == 1), starts, axis=1)
        neg_g = np.add.reduceat(ws * (ys == 0), starts, axis=1)
        neg_below = np.cumsum(neg_g, axis=1) - neg_g
        auc = (pos_g * (neg_below + 0.5 * neg_g)).sum(1) / (pos_g.sum(1) * neg_g.sum(1))
    return {"auroc": auc, "accuracy": acc, "sensitivity": sens, "specificity": spec, "ba": (sens + spec) / 2}


def bootstrap_metrics(y, p, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                      chunk: int = 250) -> dict[str, tuple[float, float, float]]:
    """{metric: (point estimate, low, high)}: percentile intervals over `n_boot` resamples of
    the samples (with replacement). Resamples where a metric is undefined are left out."""
    y, p = _arrays(y, p)
    point = binary_metrics(y, p, threshold)
    if len(y) == 0 or n_boot <= 0:
        return {m: (point[m], float("nan"), float("nan")) for m in METRICS}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        w = rng.multinomial(len(y), np.full(len(y), 1 / len(y)), size=b).astype(np.float64)
        for m, v in _weighted_metrics(y, p, w, threshold).items():
            draws[m].append(v)
    out = {}
    for m in METRICS:
        v = np.concatenate(draws[m])
        v = v[np.isfinite(v)]
        lo, hi = (np.quantile(v, [alpha / 2, 1 - alpha / 2]) if len(v) else (np.nan, np.nan))
        out[m] = (point[m], float(lo), float(hi))
    return out


def mean_and_population_sd(values) -> tuple[float, float]:
    """Mean and population SD (ddof=0), as in the paper's Table 1."""
    v = np.asarray(list(values), dtype=np.float64)
    return (float(v.mean()), float(v.std(ddof=0))) if len(v) else (float("nan"), float("nan"))
