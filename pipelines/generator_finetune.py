"""generator_finetune: one class-conditional generator per CV fold, each started from the
pretraining run's weights and fine-tuned (VAE, then DiT with labels) on fold k's training
ids only (the store's `fold` column), as in the paper.

Parent run: the store, the pretraining run. One nested run per fold (tag `fold`) with the
epoch losses, previews, the generator (`vae/`, `dit/`), `train_ids.txt` and param
`train_ids_digest`: the digest of exactly the ids it trained on, which synthesize writes
into each synthetic store and train_cv checks. Refuses a pretraining run that saw any crop
of this store's CV pool (every such crop is some fold's validation crop).

Under `accelerate launch` each fold trains data-parallel over the launched processes, fold
after fold, and only the main process logs (as in generator_pretrain).
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from analysis import keys
from data_tools.errors import ConfigError
from data_tools.folds import select_folds
from data_tools.params import param
from data_tools.provenance import fold_train_ids, ids_digest
from data_tools.store import Store
from models.generator import Generator, encode_moments
from models.generator_training import FitConfig, fit_generator
from pipelines.common import cli_step, log_params, log_store
from pipelines.config import StepConfig, as_params, from_cli
from pipelines.demo_data import open_data
from pipelines.generator_runs import (check_pretraining, download_generator, epoch_logger, log_generator,
                                      main_process_run, main_process_value, training_processes)



@dataclass
class GeneratorFinetuneConfig(StepConfig, FitConfig):
    data: str = param("the labelled store with CV folds", identity=False)
    pretrain_run_id: str = param("generator_pretrain run to start from (`mlflow run . -e generator_pretrain` makes one)",
                                  required=True)
    folds: str = param("all, or a list such as 1,3", identity=False)
    device: str = param("auto | cpu | cuda", identity=False)
    work_dir: str = param("local folder for the resumable epoch checkpoints", identity=False)

    STEP = keys.GENERATOR_FINETUNE


CONFIG = GeneratorFinetuneConfig


def encoded_cv_pool(gen: Generator, store: Store, device) -> tuple[np.ndarray, tuple]:
    """Latent moments of the CV pool, once (every fold keeps the pretrained VAE when vae_epochs is 0),
    and each store row's position among them."""
    cv_rows = np.flatnonzero(store.index["fold"].to_numpy() > 0)
    position = np.full(len(store), -1)
    position[cv_rows] = np.arange(len(cv_rows))
    return position, encode_moments(gen.vae, store.images[cv_rows], device=device)


def finetune_fold(cfg: GeneratorFinetuneConfig, store: Store, k: int, pretrained: Generator, device,
                  encoded: tuple | None, accelerator: Accelerator | None = None) -> Path:
    """One nested fold run: fine-tune on fold k's training ids only, log the generator; returns its work folder."""
    rows = store.fold_rows(k)[0]
    moments = None
    if encoded is not None:
        position, (mean, std) = encoded
        moments = (mean[position[rows]], std[position[rows]])
    ids = fold_train_ids(store, k)
    digest = ids_digest(ids)
    workdir = Path(cfg.work_dir) / ("finetune-" + cfg.fingerprint(
        data=store.digest, fold=k, train_ids=digest, init=cfg.pretrain_run_id))
    with main_process_run(accelerator, keys.GENERATOR_FINETUNE, cfg.profile, run_name=f"fold {k}",
                          tags={keys.FOLD: str(k)}, nested=True, system_metrics=True) as run:
        if run is not None:
            log_params({**as_params(cfg, identity_only=True), keys.FOLD: k, keys.P_TRAIN_IDS_DIGEST: digest,
                        keys.P_N_TRAIN: len(ids)})
        gen = fit_generator(store.images[rows], store.index["label"].to_numpy()[rows], cfg, workdir, device=device,
                            init=pretrained, on_epoch=epoch_logger(), moments=moments, accelerator=accelerator)
        if run is not None:
            gen.meta.update(trained_on=store.name, data_digest=store.digest, fold=k,
                            pretrain_run_id=cfg.pretrain_run_id, train_ids_digest=digest)
            log_generator(gen, ids)
            print(f"fold {k}: fine-tuned on {len(ids)} crops")
    return workdir


@cli_step(keys.GENERATOR_FINETUNE)
def main(argv: list[str] | None = None) -> str:
    cfg = from_cli(GeneratorFinetuneConfig, argv, __doc__)
    store = open_data(cfg.data, cfg.profile, keys.GENERATOR_FINETUNE)
    folds = select_folds(cfg.folds, store.folds)
    accelerator, device = training_processes(cfg.device)
    workdirs = []
    with main_process_run(accelerator, keys.GENERATOR_FINETUNE, cfg.profile,
                          run_name=f"finetune {store.name}") as parent, tempfile.TemporaryDirectory() as tmp:
        if parent is not None:
            log_params({**as_params(cfg), keys.P_DATA_PATH: str(store.path.resolve()),
                        keys.P_FOLDS: ",".join(map(str, folds))})
            log_store(store, "training")
        pretrained_dir = download_generator(cfg.pretrain_run_id, tmp)  # every process its own copy
        check_pretraining(pretrained_dir / keys.TRAIN_IDS, store)
        pretrained = Generator.load(pretrained_dir, device)
        made = pretrained.meta.get("arch", "tiny")
        if made != cfg.arch:
            raise ConfigError(f"arch={cfg.arch!r}, but pretraining run {cfg.pretrain_run_id} made a {made!r} "
                             f"generator: pass arch={made}")
        encoded = encoded_cv_pool(pretrained, store, device) if cfg.vae_epochs == 0 else None
        workdirs = [finetune_fold(cfg, store, k, pretrained, device, encoded, accelerator) for k in folds]
    run_id = main_process_value(accelerator, parent.info.run_id if parent is not None else None)
    if parent is not None:
        for w in workdirs:
            shutil.rmtree(w, ignore_errors=True)
        print(f"fine-tuned generators: run {run_id} (folds {folds})")
    return run_id


if __name__ == "__main__":
    main()
