"""Provenance of synthetic stores, and the fold-isolation check that train_cv runs on them.

A synthetic store's manifest carries, under `provenance`: `kind` = "synthetic", the
`generator_run_id`, the `fold` k whose training split the generator was fine-tuned on,
the `real_digest` of that real store, and `train_ids_digest`, the digest of exactly the
sample ids it saw. train_cv recomputes fold k's training ids from the real store: equal
digests prove the generator never saw a validation id of fold k.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable

from data_tools.errors import UserError
from data_tools.store import Store


class LeakageError(UserError, ValueError):
    """A synthetic store cannot be used for this fold without leaking validation data."""


def ids_digest(sample_ids: Iterable[str]) -> str:
    """Order-free sha256 of a set of sample ids."""
    return hashlib.sha256("\n".join(sorted(map(str, sample_ids))).encode()).hexdigest()


def fold_train_ids(real: Store, k: int) -> list[str]:
    train_rows, _ = real.fold_rows(k)
    return real.index["sample_id"].iloc[train_rows].astype(str).tolist()


def synthetic_provenance(real: Store, k: int, generator_run_id: str, train_ids: Iterable[str]) -> dict[str, Any]:
    """The provenance block a synthetic store for fold k must carry."""
    return {"kind": "synthetic", "generator_run_id": generator_run_id, "fold": int(k),
            "real_digest": real.digest, "train_ids_digest": ids_digest(train_ids)}


def check_synthetic_for_fold(synthetic: Store, real: Store, k: int) -> None:
    """Refuse a synthetic store made for another fold, another real store, or by a
    generator whose training ids are not exactly fold k's training split."""
    prov = synthetic.manifest.get("provenance", {})
    where = f"synthetic store {synthetic.path}"
    if prov.get("kind") != "synthetic":
        raise LeakageError(f"{where} has no synthetic provenance in its manifest")
    if int(prov.get("fold", -1)) != int(k):
        raise LeakageError(f"{where} was made by fold {prov.get('fold')}'s generator, not fold {k}'s")
    if prov.get("real_digest") != real.digest:
        raise LeakageError(f"{where} comes from real store {str(prov.get('real_digest'))[:12]}, "
                           f"not this one ({real.digest[:12]}): its folds may differ")
    if prov.get("train_ids_digest") != ids_digest(fold_train_ids(real, k)):
        raise LeakageError(f"{where}: its generator did not train on exactly fold {k}'s training ids; "
                           f"it may have seen fold {k}'s validation crops")
