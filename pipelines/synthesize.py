"""synthesize: with each fold's fine-tuned generator, make atypical (and optionally normal)
crops and write them as one synthetic store per fold.

Default count: as many atypical crops as balance fold k's training split (its normal minus
atypical count). Each store's manifest carries the provenance train_cv checks (generator
run, fold, real store digest, digest of the ids the generator trained on). Logs, per fold:
the store path and digest (params `store_fold<k>`, `digest_fold<k>`), images/s, KID/FID per
class against the fold's real training crops, the memorisation check, and grids (real vs
synthetic per class, closest synthetic/training pairs). What the KID/FID were computed on is
in their names and, in words, in the run's `quality_features` tag: the descriptor features by
default; with `features=descriptor,inception`, torchvision's ImageNet Inception-v3 features, or,
given the standard FID Inception weights (`fid_weights=<file>`), the FID of published values
(models/generator_quality.py).
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

from analysis import keys, runs
from data_tools.errors import ConfigError
from data_tools.params import param
from data_tools.constants import ATYPICAL, LABEL_NAMES, NORMAL
from data_tools.folds import balance_count
from data_tools.provenance import LeakageError, fold_train_ids, ids_digest, synthetic_provenance
from data_tools.store import Store, StoreError, open_store, write_store
from models.generator import Generator, reconstruct
from models.classifier import file_sha256
from models.generator_quality import FEATURE_SETS, feature_set, fid_inception, quality_report
from models.sampling import SAMPLERS, generate
from models.checkpoint import resolve_device
from pipelines.common import cli_step, log_params, log_store, step_run
from pipelines.config import StepConfig, as_params, from_cli
from pipelines.generator_runs import download_generator


def generator_fold_runs(client: MlflowClient, finetune_run_id: str) -> dict[int, str]:
    """{fold: run id} of a generator_finetune run's complete fold set (runs.fold_runs: the newest finished)."""
    runs.get_run(client, finetune_run_id, keys.GENERATOR_FINETUNE)
    return {k: r.info.run_id for k, r in runs.complete_fold_runs(client, finetune_run_id).items()}


def synthetic_index(labels: np.ndarray, run_id: str, k: int, seeds: np.ndarray, sampler: str) -> pd.DataFrame:
    return pd.DataFrame({
        "sample_id": [f"syn_{run_id[:8]}_f{k}_{i:05d}" for i in range(len(labels))],
        "label": labels, "domain": "synthetic", "group": f"synthetic_fold{k}", "source": "synthetic", "fold": -1,
        "seed": seeds, "sampler": sampler})


@dataclass
class SynthConfig(StepConfig):
    finetune_run_id: str = param("generator_finetune run (its fold runs are used; `mlflow run . -e "
                                  "generator_finetune -P pretrain_run_id=<id>` makes one)", required=True)
    n_atypical: str = param("atypical crops per fold: a number, or balance (the training split's normal - atypical)")
    n_normal: int = param("normal crops per fold (the paper kept none)")
    sampler: str = param(" | ".join(SAMPLERS), choices=SAMPLERS)
    steps: int = param("sampler steps")
    guidance: float = param("classifier-free guidance scale")
    seed: int = param("crop i of fold k has seed seed + 1,000,000 k + i")
    batch_size: int = param("sampling batch size", identity=False)
    quality_max: int = param("crops per class the KID/FID and memorisation checks use")
    features: str = param("KID/FID features: descriptor, or descriptor,inception (Inception-v3: the FID network "
                          "with fid_weights, else torchvision's ImageNet one, a download)")
    fid_weights: str = param("the standard FID Inception-v3 weights file (torch-fidelity's weights-inception-2015-12-05"
                             "-6726825d.pth): with features=...,inception the FID of published values; empty: none")
    out: str = param("root folder; stores go to <out>/<run id>/fold<k>", identity=False)
    device: str = param("auto | cpu | cuda", identity=False)

    STEP = keys.SYNTHESIZE

    @property
    def feature_list(self) -> tuple[str, ...]:
        return tuple(f.strip() for f in self.features.split(",") if f.strip())

    def feature_sets(self) -> list[str]:
        """What the KID/FID are computed on (models.generator_quality.FEATURE_SETS); a bad word, or
        fid_weights without the inception features, is an error before anything is generated."""
        sets = [feature_set(f, self.fid_weights or None) for f in self.feature_list]
        if self.fid_weights and "inception" not in self.feature_list:
            raise ConfigError(f"fid_weights={self.fid_weights} is given but features={self.features} has no "
                              f"inception: give features=descriptor,inception (or no fid_weights)")
        return sets


CONFIG = SynthConfig


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
                                    reference, max_n=cfg.quality_max, seed=cfg.seed, features=cfg.feature_list,
                                    device=device, fid_weights=cfg.fid_weights or None)
    metrics[keys.IMAGES_PER_SECOND] = len(images) / max(seconds, 1e-9)
    metrics.update({f"n_{LABEL_NAMES[c]}": int((labels == c).sum()) for c in (ATYPICAL, NORMAL)})
    return store, metrics, grids


@cli_step(keys.SYNTHESIZE)
def main(argv: list[str] | None = None) -> str:
    cfg = from_cli(SynthConfig, argv, __doc__)
    device = resolve_device(cfg.device)
    sets = cfg.feature_sets()
    if cfg.fid_weights:
        fid_inception(cfg.fid_weights, str(device))  # a missing or wrong file fails now, not after sampling
    client = MlflowClient()
    finetune = runs.get_run(client, cfg.finetune_run_id, keys.GENERATOR_FINETUNE)
    folds = generator_fold_runs(client, cfg.finetune_run_id)
    real = open_store(finetune.data.params[keys.P_DATA_PATH])
    if real.digest != finetune.data.tags.get(keys.DATASET_DIGEST):
        raise StoreError(f"{real.path} changed since run {cfg.finetune_run_id} fine-tuned on it (digest "
                         f"{real.digest[:12]} vs {str(finetune.data.tags.get(keys.DATASET_DIGEST))[:12]})")
    with step_run(keys.SYNTHESIZE, cfg.profile, run_name=f"synthesize {cfg.sampler} x{cfg.steps}") as run, \
            tempfile.TemporaryDirectory() as tmp:
        run_id = run.info.run_id
        out_root = Path(cfg.out).resolve() / run_id
        log_params({**as_params(cfg), keys.P_PRETRAIN_RUN_ID: finetune.data.params.get(keys.P_PRETRAIN_RUN_ID, ""),
                    keys.P_FOLDS: ",".join(map(str, folds)),
                    **({keys.P_FID_WEIGHTS_SHA256: file_sha256(Path(cfg.fid_weights))} if cfg.fid_weights else {})})
        mlflow.set_tag(keys.QUALITY_FEATURES, "; ".join(FEATURE_SETS[s] for s in sets))
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
