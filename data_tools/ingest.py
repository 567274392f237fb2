"""From a raw source to a dataset store: pick the adapter, assign folds, write atomically."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from data_tools.folds import assign_folds
from data_tools.store import Store, write_store


@dataclass
class Ingested:
    """What an adapter hands back: images, their index rows, and what it skipped (and why)."""
    images: np.ndarray
    index: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["item", "reason"]))
    provenance: dict[str, Any] = field(default_factory=dict)


def _demo(root: str | None, on_error: str, size: int = 3000, seed: int = 0, **_) -> Ingested:
    from data_tools.demo import make_demo
    images, index = make_demo(n=int(size), seed=int(seed))
    return Ingested(images, index, provenance={"generator": "data_tools.demo", "n": int(size), "seed": int(seed)})


# name -> adapter(root, on_error, **options) -> Ingested
ADAPTERS: dict[str, Callable[..., Ingested]] = {"demo": _demo}


def ingest(source: str, root: str | None, out: str | Path, *, folds: int = 5, seed: int = 0,
           on_error: str = "raise", name: str | None = None, **options) -> tuple[Store, pd.DataFrame]:
    """Build the store at `out` from `source`; returns it with the table of skipped items."""
    if source not in ADAPTERS:
        raise ValueError(f"unknown source {source!r}; choose one of {sorted(ADAPTERS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    got = ADAPTERS[source](root, on_error, seed=seed, **options)
    index, split = assign_folds(got.index, int(folds), int(seed))
    provenance = {"source": source, "root": str(Path(root).resolve()) if root else None, **got.provenance,
                  "n_skipped": int(len(got.skipped))}
    store = write_store(out, got.images, index, name=name or Path(out).name, adapter=source,
                        provenance=provenance, split=split)
    return store, got.skipped
