"""Does synthetic balancing help? The comparison the paper could only eyeball.

Two views of the same question, for one backbone, regime B (synth_balanced) minus regime
A (real_only):
- over folds: a paired t-test and a Wilcoxon signed-rank test on the per-fold AUROCs
  (the folds are the same data in both regimes, so the pairs are real pairs);
- over samples: the AUROC difference on the pooled out-of-fold predictions (every real
  crop predicted once, by the model that did not see it), with a stratified bootstrap
  interval and DeLong's test for two correlated ROC curves (DeLong et al. 1988, in the
  fast form of Sun & Xu 2014).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

from analysis import keys


@dataclass
class PairedFoldTest:
    """B - A over folds; differences in AUROC fractions."""
    folds: list[int]
    mean_diff: float
    sd_diff: float  # sample SD of the differences (ddof=1)
    ci_low: float  # t interval of the mean difference
    ci_high: float
    t_stat: float
    t_pvalue: float
    wilcoxon_stat: float
    wilcoxon_pvalue: float


def paired_fold_test(a: dict[int, float], b: dict[int, float], alpha: float = 0.05) -> PairedFoldTest:
    """Paired t-test and Wilcoxon signed-rank test over the folds both rows have."""
    folds = sorted(set(a) & set(b))
    if len(folds) < 2:
        raise ValueError(f"a paired test needs at least 2 common folds, got {folds}")
    xa, xb = np.array([a[k] for k in folds]), np.array([b[k] for k in folds])
    d = xb - xa
    t = stats.ttest_rel(xb, xa)
    half = stats.t.ppf(1 - alpha / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    if np.all(d == 0):
        w_stat, w_p = float("nan"), 1.0
    else:
        w = stats.wilcoxon(xb, xa)
        w_stat, w_p = float(w.statistic), float(w.pvalue)
    return PairedFoldTest(folds, float(d.mean()), float(d.std(ddof=1)), float(d.mean() - half), float(d.mean() + half),
                          float(t.statistic), float(t.pvalue), w_stat, w_p)


@dataclass
class AurocDifference:
    """AUROC of B minus AUROC of A on the same samples, with an interval and a p-value."""
    method: str
    n: int
    n_pos: int
    auroc_a: float
    auroc_b: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float


def _check(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, p_a, p_b = np.asarray(y).astype(int), np.asarray(p_a, float), np.asarray(p_b, float)
    if not (len(y) == len(p_a) == len(p_b)):
        raise ValueError(f"lengths differ: {len(y)} labels, {len(p_a)} and {len(p_b)} scores")
    if not set(np.unique(y)) <= {0, 1} or y.min() == y.max():
        raise ValueError("an AUROC needs labels 0 and 1, both present")
    return y, p_a, p_b


def _auroc_from_ranks(ranks_pos: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    """Mann-Whitney AUROC from the (average) ranks of the positives among all samples."""
    return (ranks_pos.sum(axis=-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def bootstrap_auroc_difference(y, p_a, p_b, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05,
                               chunk: int = 200) -> AurocDifference:
    """Stratified paired bootstrap: resample positives and negatives (the same draw for A
    and B); percentile interval; two-sided p from the share of resamples on either side of 0."""
    y, p_a, p_b = _check(y, p_a, p_b)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    deltas = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = np.concatenate([rng.choice(pos, (b, len(pos))), rng.choice(neg, (b, len(neg)))], axis=1)
        aucs = [_auroc_from_ranks(stats.rankdata(p[idx], axis=1)[:, :len(pos)], len(pos), len(neg)) for p in (p_a, p_b)]
        deltas.append(aucs[1] - aucs[0])
    deltas = np.concatenate(deltas)
    auc_a, auc_b = (_auroc_from_ranks(stats.rankdata(p)[pos], len(pos), len(neg)) for p in (p_a, p_b))
    lo, hi = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    p_value = min(1.0, 2 * min((np.sum(deltas <= 0) + 1) / (n_boot + 1), (np.sum(deltas >= 0) + 1) / (n_boot + 1)))
    return AurocDifference("bootstrap", len(y), len(pos), float(auc_a), float(auc_b), float(auc_b - auc_a),
                           float(lo), float(hi), float(p_value))


def delong_covariance(y, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of the rows of `scores` [k, N] and their DeLong covariance matrix [k, k]."""
    y = np.asarray(y).astype(int)
    scores = np.atleast_2d(np.asarray(scores, float))
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    tx, ty = stats.rankdata(pos, axis=1), stats.rankdata(neg, axis=1)
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    aucs = _auroc_from_ranks(tz[:, :m], m, n)
    v01 = (tz[:, :m] - tx) / n  # per positive: share of negatives scored below it
    v10 = 1.0 - (tz[:, m:] - ty) / m  # per negative: share of positives scored above it
    cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
    return aucs, cov


def delong_auroc_difference(y, p_a, p_b, alpha: float = 0.05) -> AurocDifference:
    """DeLong's z-test and normal interval for the difference of two correlated AUROCs."""
    y, p_a, p_b = _check(y, p_a, p_b)
    aucs, cov = delong_covariance(y, np.vstack([p_a, p_b]))
    delta = aucs[1] - aucs[0]
    se = float(np.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)))
    z = stats.norm.ppf(1 - alpha / 2)
    p_value = 1.0 if se == 0 else float(2 * stats.norm.sf(abs(delta) / se))
    return AurocDifference("delong", len(y), int(y.sum()), float(aucs[0]), float(aucs[1]), float(delta),
                           float(delta - z * se), float(delta + z * se), p_value)


def paired_predictions(a: pd.DataFrame, b: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and the two regimes' scores on the samples both predicted (joined on sample_id)."""
    joined = a[["sample_id", "label", "prob"]].merge(b[["sample_id", "label", "prob"]], on="sample_id",
                                                     suffixes=("_a", "_b"), validate="one_to_one")
    if len(joined) == 0:
        raise ValueError("the two regimes' out-of-fold predictions share no sample_id")
    clash = joined[joined["label_a"] != joined["label_b"]]
    if len(clash):
        raise ValueError(f"labels differ between the regimes for sample {clash['sample_id'].iloc[0]!r}")
    return joined["label_a"].to_numpy(int), joined["prob_a"].to_numpy(float), joined["prob_b"].to_numpy(float)


def compare_regimes(rows, oof_predictions, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05,
                    base: str = "real_only", other: str = "synth_balanced",
                    name=lambda row: row.backbone) -> tuple[list[dict], list[str]]:
    """Per group of rows (backbone and recipe) with both regimes: `other` minus `base`, over folds
    and over OOF samples.

    `rows` are TrainRows; `oof_predictions(row) -> (DataFrame | None, reason)` gives a row's
    pooled validation predictions; `name(row)` names its group in records and sentences. Returns
    one record per group (AUROC fractions) and a sentence for every comparison, or part of one,
    that could not be made.
    """
    by_key = {(r.group, r.regime): r for r in rows}
    records, skipped = [], []
    for group in dict.fromkeys(r.group for r in rows):
        a, b = by_key.get((group, base)), by_key.get((group, other))
        backbone = name(a or b)
        if a is None or b is None:
            skipped.append(f"{backbone}: no {base if a is None else other} row, nothing to compare")
            continue
        rec: dict = {"backbone": a.backbone, "group": backbone, "backbone_set": a.run.data.params.get(keys.P_BACKBONE_SET),
                     "recipe": dict(a.recipe), "base_run_id": a.run_id, "other_run_id": b.run_id}
        try:
            rec["folds"] = asdict(paired_fold_test(a.fold_metric("auroc"), b.fold_metric("auroc"), alpha))
        except ValueError as e:
            skipped.append(f"{backbone}: paired fold test skipped ({e})")
        (oof_a, why_a), (oof_b, why_b) = oof_predictions(a), oof_predictions(b)
        if oof_a is None or oof_b is None:
            why = f"{base}: {why_a}" if oof_a is None else f"{other}: {why_b}"
            skipped.append(f"{backbone}: out-of-fold AUROC difference skipped ({why})")
        else:
            try:
                y, p_a, p_b = paired_predictions(oof_a, oof_b)
                rec["bootstrap"] = asdict(bootstrap_auroc_difference(y, p_a, p_b, n_boot=n_boot, seed=seed, alpha=alpha))
                rec["delong"] = asdict(delong_auroc_difference(y, p_a, p_b, alpha=alpha))
            except (ValueError, pd.errors.MergeError) as e:
                skipped.append(f"{backbone}: out-of-fold AUROC difference skipped ({e})")
        if "folds" in rec or "bootstrap" in rec:
            records.append(rec)
    return records, skipped
