"""Forward selection with replacement over rows (analysis/ensemble_selection.py) on synthetic
out-of-fold frames: complementary rows are combined and beat each, a dominated row is never
picked, weights are pick counts, the scores are the weighted mean of the shifted logits, and
rows on another store or other folds are left out."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.ensemble_selection import (EnsembleError, candidates, criterion, greedy_ensemble, shifted_logits)
from models.ensemble import combine, fold_offsets

N, K = 600, 3


def oof_frame(y: np.ndarray, logit: np.ndarray, folds: np.ndarray, order: np.ndarray | None = None) -> pd.DataFrame:
    df = pd.DataFrame({"sample_id": [f"s{i:04d}" for i in range(len(y))], "label": y,
                       "prob": 1 / (1 + np.exp(-logit)), "fold": folds})
    return df if order is None else df.iloc[order].reset_index(drop=True)  # row order may differ between rows


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    y = (rng.random(N) < 0.3).astype(int)
    folds = np.arange(N) % K + 1
    signal = 2.0 * (y - 0.5)
    a = oof_frame(y, signal + 1.5 * rng.normal(size=N) + 0.7, folds)  # miscalibrated: its thresholds fix that
    b = oof_frame(y, signal + 1.5 * rng.normal(size=N) - 0.4, folds, order=rng.permutation(N))
    dominated = oof_frame(y, 0.3 * signal + 1.5 * rng.normal(size=N), folds)
    return {"a": a, "b": b, "dominated": dominated}


def thresholds_of(oofs: dict[str, pd.DataFrame]) -> dict[str, dict[int, float]]:
    from models.metrics import fold_ba_thresholds
    return {n: fold_ba_thresholds(df["label"], df["prob"], df["fold"]) for n, df in oofs.items()}


def test_complementary_rows_beat_each_and_the_dominated_row_is_never_picked(rows):
    t = thresholds_of(rows)
    ens = greedy_ensemble(rows, t, size=4)
    picked = [s.row for s in ens.steps]
    assert "dominated" not in picked and {"a", "b"} <= set(picked)
    assert ens.weights == {n: picked.count(n) for n in set(picked)}  # weights = pick counts
    for name, df in rows.items():  # the ensemble beats every single row on the criterion and on AUROC
        y = df["label"].to_numpy()
        single_ba, single_auc, _ = criterion(y, 1 / (1 + np.exp(-shifted_logits(df, t[name]))))
        assert ens.ba > single_ba and ens.auroc > single_auc
    assert [s.ba for s in ens.steps] == sorted(s.ba for s in ens.steps)  # each pick improved it
    if len(picked) < 4:  # stopped early: the best addition would not have improved the criterion
        assert ens.rejected is not None and (ens.rejected.ba, ens.rejected.auroc) <= (ens.ba, ens.auroc)
    # the OOF score is the count-weighted mean of the members' shifted logits, as FoldEnsemble combines
    # fold models (one model per member here: each crop's OOF prediction came from one fold model)
    frame = ens.oof.set_index("sample_id")
    members = list(ens.weights)
    logits = torch.tensor(np.stack([np.log(rows[m].set_index("sample_id").loc[frame.index, "prob"] /
                                           (1 - rows[m].set_index("sample_id").loc[frame.index, "prob"]))
                                    for m in members]))
    fold = frame["fold"].to_numpy()
    expected = np.zeros(len(frame))
    for k in range(1, K + 1):  # each fold's crops through the combiner, with that fold's thresholds
        offsets = fold_offsets([t[m][k] for m in members]).double()
        weights = torch.tensor([float(ens.weights[m]) for m in members])
        expected[fold == k] = combine(logits[:, fold == k], offsets, weights).numpy()
    assert frame["score"].to_numpy() == pytest.approx(expected, abs=1e-6)
    assert 0 < ens.threshold < 1 and set(ens.fold_metric("auroc")) == {1, 2, 3}


def test_size_one_is_the_best_single_row_and_misaligned_rows_are_refused(rows):
    t = thresholds_of(rows)
    ens = greedy_ensemble(rows, t, size=1)
    assert len(ens.steps) == 1 and list(ens.weights.values()) == [1] and ens.steps[0].row != "dominated"
    shuffled = rows["b"].assign(fold=rows["b"]["fold"] % K + 1)
    with pytest.raises(EnsembleError, match="fold assignment"):
        greedy_ensemble({"a": rows["a"], "b": shuffled}, t, size=2)


def test_rows_on_another_store_or_other_folds_are_left_out(rows):
    other_folds = rows["b"].assign(fold=rows["b"]["fold"] % K + 1)
    kept, left = candidates({"a": ("d1", rows["a"]), "b": ("d1", rows["b"]), "c": ("d2", rows["dominated"]),
                             "d": ("d1", other_folds)})
    assert kept == ["a", "b"]
    assert set(left) == {"c", "d"} and "store" in left["c"] and "fold assignment" in left["d"]
