"""Cross-validation folds, assigned once per store so that generator fine-tuning and
classifier CV split the same way by construction."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from data_tools.constants import ATYPICAL, NORMAL, NOT_IN_CV


class FoldError(ValueError):
    """The requested folds cannot be built from this data."""


def balance_count(store, k: int) -> int:
    """Atypical crops that bring fold k's training split of `store` to 50/50 (unlabelled rows aside)."""
    labels = store.index["label"].to_numpy()[store.fold_rows(k)[0]]
    return max(0, int((labels == NORMAL).sum() - (labels == ATYPICAL).sum()))


def assign_folds(index: pd.DataFrame, k: int, seed: int) -> tuple[pd.DataFrame, dict]:
    """Set `fold` to 1..k for labelled rows (stratified by label, grouped by `group`);
    unlabelled rows and k == 0 give fold -1. Returns the index and the split spec."""
    index = index.copy()
    index["fold"] = NOT_IN_CV
    spec = {"k": int(k), "seed": int(seed), "grouping": "group", "stratify": "label", "method": "StratifiedGroupKFold"}
    if k == 0:
        return index, spec
    if k < 2:
        raise FoldError(f"folds must be 0 (no CV pool) or >= 2, got {k}")
    pool = np.flatnonzero(index["label"].isin([ATYPICAL, NORMAL]).to_numpy())
    labels = index["label"].to_numpy()[pool]
    groups = index["group"].astype(str).to_numpy()[pool]
    if len(np.unique(groups)) < k:
        raise FoldError(f"{len(np.unique(groups))} groups cannot make {k} folds that never split a group")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.full(len(index), NOT_IN_CV, dtype=np.int64)
    for i, (_, val) in enumerate(splitter.split(np.zeros(len(pool)), labels, groups), start=1):
        fold[pool[val]] = i
    index["fold"] = fold
    for i in range(1, k + 1):
        classes = set(index.loc[index["fold"] == i, "label"].unique())
        if not {ATYPICAL, NORMAL} <= classes:
            lacking = "atypical" if ATYPICAL not in classes else "normal"
            raise FoldError(f"fold {i} of {k} has no {lacking} figures: too few {lacking} groups for {k} folds "
                            f"(try fewer folds or a different seed)")
    return index, spec


def parse_fold_list(spec) -> list[int] | None:
    """"all" / "" / None -> None (every fold); "3,1,3" -> [1, 3] (sorted, repeats dropped)."""
    text = str(spec if spec is not None else "").strip()
    if text in ("", "all"):
        return None
    try:
        folds = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise FoldError(f"folds must be 'all' or a list such as '1,3', got {text!r}") from None
    if not folds:
        raise FoldError(f"folds must be 'all' or a list such as '1,3', got {text!r}")
    return folds


def select_folds(spec, available: list[int]) -> list[int]:
    """The folds `spec` asks for, each checked to be one of the store's."""
    folds = parse_fold_list(spec)
    if folds is None:
        return list(available)
    unknown = [k for k in folds if k not in available]
    if unknown:
        raise FoldError(f"folds {unknown} are not folds of the store (it has {available})")
    return folds
