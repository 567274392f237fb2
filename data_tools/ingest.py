"""From a raw source to a dataset store: pick the adapter, assign folds, write atomically."""
from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Callable

import pandas as pd

from data_tools.adapters import crops, gc_stack, wsi
from data_tools.adapters.base import AdapterError, Ingested
from data_tools.atomic import clean_leftovers, staging_dir
from data_tools.folds import FoldError, assign_folds
from data_tools.store import MANIFEST, Store, StoreError, open_store, write_store

__all__ = ["ADAPTERS", "AdapterError", "Ingested", "adapter_options", "ingest", "prepare_out"]


def _demo(root: str | None, on_error: str, *, size: int = 3000, seed: int = 0) -> Ingested:
    from data_tools.demo import make_demo
    images, index = make_demo(n=int(size), seed=int(seed))
    return Ingested(images, index, provenance={"generator": "data_tools.demo", "n": int(size), "seed": int(seed)})


# name -> adapter(root, on_error, **options) -> Ingested
ADAPTERS: dict[str, Callable[..., Ingested]] = {
    "demo": _demo,
    "midog25": crops.midog25,
    "amibr": crops.amibr,
    "folder": crops.folder,
    "gc_stack": gc_stack.gc_stack,
    "sliderunner": wsi.sliderunner,
    "midogpp": wsi.midogpp,
}
_INTERNAL = {"seed", "scratch"}  # passed by ingest itself, not options a user sets


def adapter_options(source: str) -> dict[str, object]:
    """The options an adapter takes, with their defaults (for help texts and checks)."""
    params = inspect.signature(ADAPTERS[source]).parameters.values()
    return {p.name: (None if p.default is p.empty else p.default) for p in params
            if p.kind == p.KEYWORD_ONLY and p.name not in _INTERNAL}


def _check_options(source: str, options: dict) -> None:
    params = inspect.signature(ADAPTERS[source]).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return
    unknown = sorted(set(options) - set(adapter_options(source)))
    if unknown:
        raise AdapterError(f"source {source!r} has no option {unknown}; its options: {adapter_options(source)}")


def _skip_summary(skipped: pd.DataFrame) -> str:
    reasons = skipped["reason"].astype(str).value_counts().head(3)
    return "; ".join(f"{n} x {r}" for r, n in reasons.items())


def _nothing_left(source: str, root: str | None, skipped: pd.DataFrame) -> str:
    """Why an ingest ends with no crop: an empty source, or every row skipped (with the commonest reasons)."""
    if not len(skipped):
        return f"source {source!r} at {root}: no crops found; an empty store is not written"
    return (f"source {source!r} at {root}: all {len(skipped)} rows were skipped, an empty store is not written "
            f"(see skipped.csv); reasons: {_skip_summary(skipped)}")


def prepare_out(out: str | Path, overwrite: bool) -> None:
    """Before any work: tidy what killed writers of `out` left, and refuse to replace an existing
    store (or anything else at `out`) unless asked to, so no store is replaced without a word."""
    out = Path(out)
    for done in clean_leftovers(out):
        print(f"{out.name}: {done}", file=sys.stderr)
    if not out.exists() or overwrite:
        return
    if (out / MANIFEST).is_file():
        m = open_store(out).manifest
        what = f"a store ({m['n']} crops, digest {m['digest'][:12]})"
    else:
        what = "a folder" if out.is_dir() else "a file"
    raise StoreError(f"{out} already exists, {what}; give overwrite=true (--overwrite true) to replace it, "
                     "or another out")


def ingest(source: str, root: str | None, out: str | Path, *, folds: int = 5, seed: int = 0,
           on_error: str = "raise", name: str | None = None, split: str = "group", split_by: str = "domain",
           min_domain_size: int = 0, overwrite: bool = False,
           on_skipped: Callable[[pd.DataFrame], None] | None = None, **options) -> tuple[Store, pd.DataFrame]:
    """Build the store at `out` from `source`; returns it with the table of skipped items.

    An existing `out` is replaced (in one atomic step) only with `overwrite`. Adapters that
    stream large pools (slides) write their crops under a scratch folder beside `out` (same
    disk), which is removed once the store is written. `split`: group (`folds` folds grouped
    by slide) or lodo (one fold per value of `split_by`; folds=0 still means no CV pool).
    `on_skipped` gets the skipped items as soon as the source is read, so they are kept (e.g.
    logged) even when the ingest then fails.
    """
    if source not in ADAPTERS:
        raise AdapterError(f"unknown source {source!r}; choose one of {sorted(ADAPTERS)}")
    if on_error not in ("raise", "skip"):
        raise AdapterError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if source != "demo" and not root:
        raise AdapterError(f"source {source!r} needs a root (the folder or file to read)")
    _check_options(source, options)
    adapter = ADAPTERS[source]
    out = Path(out)
    prepare_out(out, overwrite)
    with staging_dir(out, "scratch") as scratch:
        if "scratch" in inspect.signature(adapter).parameters:
            options["scratch"] = scratch
        got = adapter(root, on_error, seed=seed, **options)
        if on_skipped is not None and len(got.skipped):
            on_skipped(got.skipped)
        if len(got.index) == 0:
            raise AdapterError(_nothing_left(source, root, got.skipped))
        try:
            index, spec = assign_folds(got.index, int(folds), int(seed), split, split_by, int(min_domain_size))
        except FoldError as e:
            if not len(got.skipped):
                raise
            raise FoldError(f"{e}; note: {len(got.skipped)} rows were skipped ({_skip_summary(got.skipped)}; "
                            "see skipped.csv)") from None
        provenance = {"source": source, "root": str(Path(root).resolve()) if root else None, **got.provenance,
                      "n_skipped": int(len(got.skipped))}
        store = write_store(out, got.images, index, name=name or out.name, adapter=source,
                            provenance=provenance, split=spec)
        skipped = got.skipped
        del got  # drop the scratch memmap before its folder goes
    return store, skipped
