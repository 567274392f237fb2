"""Cross-validation folds, assigned once per store so that generator fine-tuning and
classifier CV split the same way by construction.

Two splits: `group` (stratified by label, grouped by slide: the paper's 5-fold CV) and `lodo`
(leave one domain out: one fold per value of a column, e.g. tumour type or scanner, so that
fold k's validation split is a domain the rest of the pool never shows).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from data_tools.constants import ATYPICAL, NORMAL, NOT_IN_CV
from data_tools.errors import UserError


class FoldError(UserError, ValueError):
    """The requested folds cannot be built from this data."""


def balance_count(store, k: int) -> int:
    """Atypical crops that bring fold k's training split of `store` to 50/50 (unlabelled rows aside)."""
    labels = store.index["label"].to_numpy()[store.fold_rows(k)[0]]
    return max(0, int((labels == NORMAL).sum() - (labels == ATYPICAL).sum()))


SPLITS = ("group", "lodo")


def assign_folds(index: pd.DataFrame, k: int, seed: int, split: str = "group", split_by: str = "domain",
                 min_domain_size: int = 0) -> tuple[pd.DataFrame, dict]:
    """Set `fold` for labelled rows: 1..k stratified by label and grouped by `group` (split=group),
    or one fold per value of `split_by` (split=lodo, k unused); unlabelled rows and k == 0 give
    fold -1. Returns the index and the split spec."""
    if split not in SPLITS:
        raise FoldError(f"split must be one of {SPLITS}, got {split!r}")
    if k != 0 and split == "lodo":
        return domain_folds(index, split_by, min_domain_size)
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
    from sklearn.model_selection import StratifiedGroupKFold  # here: serving reads fold lists, never makes folds
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


def merge_small_domains(sizes: dict[str, int], min_size: int) -> list[list[str]]:
    """Groups of domains, one fold each: every domain with at least `min_size` labelled crops alone;
    the smaller ones together (smallest first), and that group, if still below `min_size`, with
    the smallest domain that stands alone. Sorted by the group's first name."""
    small = sorted((d for d in sizes if sizes[d] < min_size), key=lambda d: (sizes[d], d))
    groups = [[d] for d in sorted(d for d in sizes if sizes[d] >= min_size)]
    if small:
        if sum(sizes[d] for d in small) < min_size and groups:
            smallest = min(groups, key=lambda g: (sizes[g[0]], g[0]))
            groups.remove(smallest)
            small += smallest
        groups.append(sorted(small))
    return sorted(groups)


def domain_folds(index: pd.DataFrame, split_by: str = "domain", min_domain_size: int = 0) -> tuple[pd.DataFrame, dict]:
    """Leave one domain out: fold k's validation split is every labelled crop of domain (group) k."""
    if split_by not in index.columns:
        raise FoldError(f"split_by={split_by!r} is not a column of the index (columns: {sorted(index.columns)})")
    index = index.copy()
    labelled = index["label"].isin([ATYPICAL, NORMAL]).to_numpy()
    values = index[split_by].astype(str)
    sizes = values[labelled].value_counts().to_dict()
    groups = merge_small_domains(sizes, int(min_domain_size))
    if len(groups) < 2:
        raise FoldError(f"split_by={split_by!r} gives {len(groups)} domain group(s) {groups}: leaving one out needs "
                        f"two or more (lower min_domain_size, or split by another column)")
    fold_of = {d: k for k, group in enumerate(groups, start=1) for d in group}
    index["fold"] = np.where(labelled, values.map(fold_of).fillna(NOT_IN_CV).astype(int), NOT_IN_CV)
    for k, group in enumerate(groups, start=1):
        classes = set(index.loc[index["fold"] == k, "label"].unique())
        if not {ATYPICAL, NORMAL} <= classes:
            lacking = "atypical" if ATYPICAL not in classes else "normal"
            raise FoldError(f"domain {' + '.join(group)} ({split_by}) has no {lacking} figures: it cannot be a "
                            f"held-out fold (merge it with min_domain_size, or split by another column)")
    spec = {"k": len(groups), "method": "leave-one-domain-out", "split_by": split_by,
            "min_domain_size": int(min_domain_size), "stratify": None, "grouping": split_by,
            "domains": {str(k): group for k, group in enumerate(groups, start=1)}}
    return index, spec


def fold_domains(split: dict) -> dict[int, str]:
    """{k: held-out domain name ("a + b" for a merged group)} of a leave-one-domain-out split, else {}."""
    return {int(k): " + ".join(g) for k, g in (split.get("domains") or {}).items()}


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
