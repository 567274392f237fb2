"""The embedded demo's stores, made on first use: the CV store, its held-out test store and the
generator's pretraining pool, all drawn by `data_tools.demo` from seeds.

`make demo` builds them through prepare_data runs. A step run on its own with a demo profile
(on a fresh clone, `mlflow run . -e train_cv -P backbone=lunit`) finds its default store
missing and builds it here with the same parameters (so the same crops and digest), saying so
in one line. Any other missing store is an error that names the command that makes it.
"""
from __future__ import annotations

from pathlib import Path

from analysis import keys
from data_tools.ingest import ingest
from data_tools.store import Store, StoreError, open_store
from pipelines.profiles import defaults

DEMO = "demo"


def demo_stores(stores: str | Path, seed: int, split: str, test_size: int, pool_size: int) -> dict[str, tuple[Path, dict]]:
    """{role: (store folder, its prepare_data parameters beyond the profile's)} of the demo's three
    stores under `stores`: "cv" (the CV store), "test" (held out) and "pool" (the generator's)."""
    root = Path(stores)
    held_out = {"source": DEMO, "folds": "0", "split": "group"}  # outside any CV pool
    return {"cv": (root / (DEMO + ("_lodo" if split == keys.LODO else "")), {"source": DEMO}),
            "test": (root / "demo_test", {**held_out, "seed": str(seed + 1), "size": str(test_size)}),
            "pool": (root / "demo_pool", {**held_out, "seed": str(seed + 2), "size": str(pool_size)})}


def open_data(path: str | Path, profile: str, step: str) -> Store:
    """The store at `path`; one of the demo's stores that is not there yet is built first."""
    path = Path(path)
    if path.exists():
        return open_store(path)  # or an error naming what is wrong with it
    prep, main = defaults(profile, (keys.PREPARE_DATA,)), defaults(profile, (keys.MAIN,))
    demo = demo_stores(main["stores"], prep["seed"], prep["split"], main["test_size"], main["pool_size"]) \
        if prep["source"] == DEMO else {}
    wanted = {folder.resolve(): params for folder, params in demo.values()}.get(path.resolve())
    if wanted is None:
        raise StoreError(f"no dataset store at {path}: make one with `mlflow run . -e prepare_data -P source=<source> "
                        f"-P root=<raw data> -P out={path}` (docs/steps.md)")
    size = int(wanted.get("size", prep["size"]))
    seed, folds = int(wanted.get("seed", prep["seed"])), int(wanted.get("folds", prep["folds"]))
    print(f"{step}: no store at {path}; building the embedded demo store there first ({size} crops, seed {seed}, "
          f"{folds} folds: deterministic, the same crops `make demo` uses)", flush=True)
    split = wanted.get("split", prep["split"])
    store, _ = ingest(DEMO, None, path, folds=folds, seed=seed, split=split, split_by=prep["split_by"],
                      min_domain_size=prep["min_domain_size"], size=size)
    return store
