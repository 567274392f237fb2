"""prepare_data: a raw source -> a dataset store, logged as an MLflow run.

Source-specific options are passed as extra `--name value` arguments (with `mlflow run`:
`-P name=value`), e.g. `--slides /data/slides --mitosis_class "Mitotic figure"` for
sliderunner; `data_tools.ingest.adapter_options(source)` lists them. `source=stores` builds one
store from several stores (`stores=a,b`; `data_tools.merge`), duplicates listed in duplicates.csv.
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from analysis import keys
from data_tools.grids import save_grids
from data_tools.folds import SPLITS
from data_tools.ingest import ADAPTERS, adapter_options, ingest, prepare_out
from data_tools.merge import ON_CONFLICT, SOURCE as STORES, merge_stores
from data_tools.params import param
from data_tools.store import Store, open_store
from pipelines.common import cli_step, log_params, log_store, step_run
from pipelines.config import StepConfig, as_params, build, parser

SOURCES = tuple(sorted([*ADAPTERS, STORES]))


@dataclass
class PrepareDataConfig(StepConfig):
    source: str = param(f"one of {', '.join(SOURCES)} (stores: one store from those listed in stores)",
                        choices=SOURCES)
    root: str = param("where the raw source lies (file or folder)")
    out: str = param("store folder to write (default stores/<source>; source=stores: stores/merged)")
    folds: int = param("CV folds with split=group (0: no CV pool, e.g. a test set, whatever the split)")
    split: str = param("group (folds grouped by slide, stratified by label) | lodo (one fold per value of split_by)",
                       choices=SPLITS)
    split_by: str = param("lodo: the column whose values are the held-out domains (domain, or e.g. Scanner)")
    min_domain_size: int = param("lodo: domains with fewer labelled crops are merged into one fold (recorded)")
    seed: int = param("seed of the fold assignment (and of the demo crops)")
    on_error: str = param("raise | skip (skipped items are listed in the run's skipped.csv)", choices=("raise", "skip"))
    size: int | None = param("demo only: number of crops")
    stores: str = param("source=stores: the stores to merge, comma-separated; of a figure found in several, the "
                        "earliest listed store's copy is kept (duplicates.csv lists every pair)")
    on_conflict: str = param("source=stores: copies of one figure with different labels: raise (a one-line error "
                             "naming them) | drop (every copy dropped, listed)", choices=ON_CONFLICT)
    overwrite: bool = param("replace an existing store at out (in one atomic step); without it, an existing out "
                            "is an error", identity=False)

    STEP = keys.PREPARE_DATA


CONFIG = PrepareDataConfig


@cli_step(keys.PREPARE_DATA)
def main(argv: list[str] | None = None) -> Store:
    p = parser(PrepareDataConfig, __doc__)
    args, extra = p.parse_known_args(argv)
    args = vars(args)
    try:
        cfg = build(PrepareDataConfig, args.pop("profile"), **args)
    except ValueError as e:
        p.error(str(e))
    if cfg.source == STORES:
        return _merge(p, cfg, extra)
    if cfg.stores:
        p.error(f"stores={cfg.stores!r} is read only with source=stores (this run's source: {cfg.source})")
    out = Path(cfg.out or f"stores/{cfg.source}")
    options = {"size": cfg.size} if cfg.source == "demo" and cfg.size else {}
    options.update(_extra_options(p, extra))
    unknown = sorted(set(options) - set(adapter_options(cfg.source)))
    if unknown:  # a misspelt option would silently change nothing
        p.error(f"source {cfg.source!r} has no option(s) {unknown}; its options: "
                f"{', '.join(adapter_options(cfg.source)) or 'none'}")
    prepare_out(out, cfg.overwrite)  # before any work: an existing store is not replaced unasked
    if out.exists():
        print(f"replacing {out} (overwrite=true)", file=sys.stderr)
    # the run is open while the store is written: a failed or killed ingest leaves a FAILED run,
    # with skipped.csv logged as soon as the source is read
    with step_run(keys.PREPARE_DATA, cfg.profile, run_name=f"prepare {out.name}"):
        log_params({**as_params(cfg), "out": str(out), **options})
        store, skipped = ingest(cfg.source, cfg.root or None, out, folds=cfg.folds, seed=cfg.seed,
                                on_error=cfg.on_error, split=cfg.split, split_by=cfg.split_by,
                                min_domain_size=cfg.min_domain_size, overwrite=cfg.overwrite,
                                on_skipped=_log_skipped, **options)
        _log_result(store, cfg.seed, {keys.N_SKIPPED: len(skipped)})
    if len(skipped):
        print(f"skipped {len(skipped)} items (listed in the run's {keys.SKIPPED_CSV})")
    return store


def _merge(p, cfg: PrepareDataConfig, extra: list[str]) -> Store:
    """source=stores: one store from the stores listed (data_tools.merge); the parents are the run's inputs."""
    if extra or cfg.root:
        p.error("source=stores reads no root and takes no source options; list the stores: stores=<store>,<store>")
    out = Path(cfg.out or "stores/merged")
    prepare_out(out, cfg.overwrite)
    if out.exists():
        print(f"replacing {out} (overwrite=true)", file=sys.stderr)
    with step_run(keys.PREPARE_DATA, cfg.profile, run_name=f"prepare {out.name}"):
        log_params({**as_params(cfg), "out": str(out)})
        store, duplicates = merge_stores(cfg.stores, out, folds=cfg.folds, seed=cfg.seed, split=cfg.split,
                                         split_by=cfg.split_by, min_domain_size=cfg.min_domain_size,
                                         on_conflict=cfg.on_conflict, overwrite=cfg.overwrite,
                                         on_duplicates=_log_duplicates)
        for i, parent in enumerate(store.manifest["provenance"]["parents"], start=1):
            log_store(open_store(parent["path"]), keys.parent_context(i))
        dropped = store.manifest["provenance"]["dropped"]
        _log_result(store, cfg.seed, {keys.N_DUPLICATES: len(dropped["duplicate"]),
                                      keys.N_LABEL_CONFLICTS: len(dropped["label_conflict"])})
    print(f"{len(duplicates)} duplicate pairs across the stores: {len(dropped['duplicate'])} copies dropped, "
          f"{len(dropped['label_conflict'])} dropped for conflicting labels (the run's {keys.DUPLICATES_CSV})")
    return store


def _log_result(store: Store, seed: int, metrics: dict[str, int]) -> None:
    """What every prepare_data run logs and prints of the store it wrote: counts, manifest, grids."""
    log_store(store, "training")
    m = store.manifest
    mlflow.log_metrics({keys.N_IMAGES: m["n"], **metrics, **{f"n_{k}": v for k, v in m["per_class"].items()}})
    mlflow.log_dict(m, keys.MANIFEST_JSON)
    if save_grids(store, store.path / keys.GRIDS_DIR, seed=seed):
        mlflow.log_artifacts(str(store.path / keys.GRIDS_DIR), keys.GRIDS_DIR)
    print(f"store {store.path} ({m['n']} crops, {m['image_size'][0]}x{m['image_size'][1]}), digest {store.digest[:12]}")
    print(json.dumps({k: m[k] for k in ("per_class", "per_domain", "per_fold", "n_groups")}, indent=1))


def _log_duplicates(duplicates: pd.DataFrame) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        duplicates.to_csv(Path(tmp) / keys.DUPLICATES_CSV, index=False)
        mlflow.log_artifact(str(Path(tmp) / keys.DUPLICATES_CSV))


def _log_skipped(skipped: pd.DataFrame) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        skipped.to_csv(Path(tmp) / keys.SKIPPED_CSV, index=False)
        mlflow.log_artifact(str(Path(tmp) / keys.SKIPPED_CSV))


def _extra_options(parser, extra: list[str]) -> dict[str, str]:
    """`--name value` / `--name=value` pairs left over by argparse -> adapter options."""
    options, i = {}, 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or len(token) < 3:
            parser.error(f"unexpected argument {token!r}; source options are given as --name value")
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra):
                parser.error(f"option --{name} needs a value")
            value, i = extra[i + 1], i + 1
        options[name] = value
        i += 1
    return options


if __name__ == "__main__":
    main()
