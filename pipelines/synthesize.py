"""synthesize: with each fold's fine-tuned generator, make atypical (and optionally normal)
crops and write them as one synthetic store per fold.

Default count: as many atypical crops as balance fold k's training split (its normal minus
atypical count). Each store's manifest carries the provenance train_cv checks (generator
run, fold, real store digest, digest of the ids the generator trained on). Logs, per fold:
the store path and digest (params `store_fold<k>`, `digest_fold<k>`), images/s, KID/FID per
class against the fold's real training crops, the memorisation check, and grids (real vs
synthetic per class, closest synthetic/training pairs).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from analysis import keys
from data_tools.constants import ATYPICAL, LABEL_NAMES, NORMAL
from data_tools.folds import balance_count
from data_tools.provenance import LeakageError, fold_train_ids, ids_digest, synthetic_provenance
from data_tools.store import Store, StoreError, open_store, write_store
from models.generator import Generator, reconstruct
from models.generator_quality import quality_report
from models.sampling import SAMPLERS, generate
from models.checkpoint import resolve_device
from pipelines.common import log_params, log_store, step_parser, step_run
from pipelines.generator_finetune import download_generator
from pipelines.profiles import resolve


def fold_runs(client: MlflowClient, finetune_run_id: str) -> dict[int, str]:
    """{fold: nested run id} of a generator_finetune run."""
    parent = client.get_run(finetune_run_id)
    if parent.data.tags.get(keys.STEP) != keys.GENERATOR_FINETUNE:
        raise ValueError(f"run {finetune_run_id} is not a {keys.GENERATOR_FINETUNE} run "
                         f"(step tag {parent.data.tags.get(keys.STEP)!r})")
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`{keys.PARENT_RUN}` = '{finetune_run_id}' and attributes.status = 'FINISHED'")
    runs = {int(r.data.tags[keys.FOLD]): r.info.run_id for r in children if keys.FOLD in r.data.tags}
    if not runs:
        raise ValueError(f"finetune run {finetune_run_id} has no finished fold runs")
    return dict(sorted(runs.items()))


def synthetic_index(labels: np.ndarray, run_id: str, k: int, seeds: np.ndarray, sampler: str) -> pd.DataFrame:
    return pd.DataFrame({
        "sample_id": [f"syn_{run_id[:8]}_f{k}_{i:05d}" for i in range(len(labels))],
        "label": labels, "domain": "synthetic", "group": f"synthetic_fold{k}", "source": "synthetic", "fold": -1,
        "seed": seeds, "sampler": sampler})


@dataclass
class SynthConfig:
    finetune_run_id: str
    n_atypical: str  # an int, or "balance"
    n_normal: int
    sampler: str
    steps: int
    guidance: float
    seed: int
    batch_size: int
    quality_max: int
    features: tuple[str, ...]
    out: str

    @classmethod
    def from_params(cls, cfg: dict) -> "SynthConfig":
        return cls(str(cfg["finetune_run_id"]), str(cfg["n_atypical"]), int(cfg["n_normal"]), str(cfg["sampler"]),
                   int(cfg["steps"]), float(cfg["guidance"]), int(cfg["seed"]), int(cfg["batch_size"]),
                   int(cfg["quality_max"]), tuple(f.strip() for f in str(cfg["features"]).split(",") if f.strip()),
                   str(cfg["out"]))


def synthesize_fold(cfg: SynthConfig, real: Store, k: int, gen: Generator, generator_run_id: str, run_id: str,
                    out: Path) -> tuple[Store, dict[str, float], dict[str, np.ndarray]]:
    """Fold k's synthetic store, with its quality figures and grids."""
    n_atyp = balance_count(real, k) if cfg.n_atypical in ("", "balance") else int(cfg.n_atypical)
    labels = np.array([ATYPICAL] * n_atyp + [NORMAL] * cfg.n_normal, dtype=np.int64)
    first_seed = cfg.seed + 1_000_000 * k  # crop i of fold k has seed first_seed + i
    start = time.perf_counter()
    images = generate(gen, labels, cfg.sampler, cfg.steps, cfg.guidance, seed=first_seed, batch_size=cfg.batch_size)
    seconds = time.perf_counter() - start
    index = synthetic_index(labels, run_id, k, first_seed + np.arange(len(labels)), cfg.sampler)
    store = write_store(out, images, index, name=f"synthetic_fold{k}", adapter="synthesize",
                        provenance=synthetic_provenance(real, k, generator_run_id, fold_train_ids(real, k)),
                        extra={"generator": {"finetune_run_id": cfg.finetune_run_id, "sampler": cfg.sampler,
                                             "steps": cfg.steps, "guidance": cfg.guidance, "seed": cfg.seed}})
    train_rows, val_rows = real.fold_rows(k)
    unseen = np.random.default_rng(cfg.seed).choice(val_rows, min(cfg.quality_max, len(val_rows)), replace=False)
    reference = reconstruct(gen.vae, np.asarray(real.images[np.sort(unseen)]))  # unseen crops, through the VAE
    device = str(next(gen.vae.parameters()).device)
    metrics, grids = quality_report(images, labels, real.images[train_rows], real.index["label"].to_numpy()[train_rows],
                                    reference, max_n=cfg.quality_max, seed=cfg.seed, features=cfg.features,
                                    device=device)
    metrics[keys.IMAGES_PER_SECOND] = len(images) / max(seconds, 1e-9)
    metrics.update({f"n_{LABEL_NAMES[c]}": int((labels == c).sum()) for c in (ATYPICAL, NORMAL)})
    return store, metrics, grids


def main(argv: list[str] | None = None) -> str:
    p = step_parser(keys.SYNTHESIZE, __doc__)
    p.add_argument("--finetune_run_id", default="", help="generator_finetune run (its fold runs are used)")
    p.add_argument("--n_atypical", default="", help="per fold; 'balance' = the training split's normal - atypical")
    p.add_argument("--n_normal", default="", help="per fold (the paper kept none)")
    p.add_argument("--sampler", default="", help=" | ".join(SAMPLERS))
    for name in ("steps", "guidance", "seed", "batch_size", "quality_max", "device"):
        p.add_argument(f"--{name}", default="")
    p.add_argument("--features", default="", help="KID/FID features: descriptor, or descriptor,inception (download)")
    p.add_argument("--out", default="", help="root folder; stores go to <out>/<run id>/fold<k>")
    args = p.parse_args(argv)
    given = resolve(keys.SYNTHESIZE, args.profile, vars(args))
    if not given.get("finetune_run_id"):
        raise SystemExit("synthesize needs --finetune_run_id (a finished generator_finetune run)")
    cfg = SynthConfig.from_params(given)
    device = resolve_device(given["device"])
    client = MlflowClient()
    finetune = client.get_run(cfg.finetune_run_id)
    folds = fold_runs(client, cfg.finetune_run_id)
    real = open_store(finetune.data.params[keys.P_DATA_PATH])
    if real.digest != finetune.data.tags.get(keys.DATASET_DIGEST):
        raise StoreError(f"{real.path} changed since run {cfg.finetune_run_id} fine-tuned on it (digest "
                         f"{real.digest[:12]} vs {str(finetune.data.tags.get(keys.DATASET_DIGEST))[:12]})")
    with step_run(keys.SYNTHESIZE, args.profile, run_name=f"synthesize {cfg.sampler} x{cfg.steps}") as run, \
            tempfile.TemporaryDirectory() as tmp:
        run_id = run.info.run_id
        out_root = Path(cfg.out).resolve() / run_id
        log_params({keys.P_FINETUNE_RUN_ID: cfg.finetune_run_id,
                    keys.P_PRETRAIN_RUN_ID: finetune.data.params.get(keys.P_PRETRAIN_RUN_ID, ""),
                    keys.P_N_ATYPICAL: cfg.n_atypical, keys.P_N_NORMAL: cfg.n_normal, keys.P_SAMPLER: cfg.sampler,
                    keys.P_STEPS: cfg.steps, keys.P_GUIDANCE: cfg.guidance, keys.P_SEED: cfg.seed, keys.P_OUT: cfg.out,
                    keys.P_FOLDS: ",".join(map(str, folds))})
        log_store(real, "training")
        per_fold: list[dict[str, float]] = []
        for k, fold_run_id in folds.items():
            trained_on = client.get_run(fold_run_id).data.params.get(keys.P_TRAIN_IDS_DIGEST)
            if trained_on != ids_digest(fold_train_ids(real, k)):
                raise LeakageError(f"fold {k}'s generator (run {fold_run_id}) did not train on exactly fold {k}'s "
                                   f"training ids of {real.path}")
            gen = Generator.load(download_generator(fold_run_id, Path(tmp) / f"fold{k}", (keys.VAE_DIR, keys.DIT_DIR)),
                                 device)
            store, metrics, grids = synthesize_fold(cfg, real, k, gen, fold_run_id, run_id, out_root / f"fold{k}")
            log_params({keys.synth_store_param(k): str(store.path), keys.synth_digest_param(k): store.digest})
            mlflow.log_metrics({keys.fold_metric(k, name): v for name, v in metrics.items() if np.isfinite(v)})
            for name, grid in grids.items():
                mlflow.log_image(grid, f"{keys.GRIDS_DIR}/fold{k}_{name}.png")
            per_fold.append(metrics)
            print(f"fold {k}: {len(store)} crops -> {store.path} ({metrics[keys.IMAGES_PER_SECOND]:.1f} images/s)")
        names = set.intersection(*(set(m) for m in per_fold))
        mlflow.log_metrics({n: float(np.nanmean([m[n] for m in per_fold])) for n in sorted(names)})
    print(f"synthetic stores of run {run_id} under {out_root}")
    return run_id


if __name__ == "__main__":
    main()
