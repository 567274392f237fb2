"""generator_pretrain: the VAE, then the DiT (null class only), on every crop of a store,
labels ignored. The paper pretrains on ~56,000 unlabelled mitotic figures cut from the
MITOS_WSI_CMC / CCMCT slides; the pool must not contain the CV pool's crops (generator_finetune
refuses a pretraining that saw them). Logs epoch losses, preview grids, the generator
(`vae/`, `dit/`) and the ids it trained on (`train_ids.txt`).

A killed run continues from its last epoch when started again with the same data and
parameters (epoch checkpoints under `work_dir`).
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np

from analysis import keys
from data_tools.params import param
from data_tools.store import open_store
from models.generator import Generator
from models.generator_training import FitConfig, fit_generator
from models.checkpoint import resolve_device
from pipelines.common import cli_step, log_params, log_store, step_run
from pipelines.config import StepConfig, as_params, from_cli



@dataclass
class GeneratorPretrainConfig(StepConfig, FitConfig):
    data: str = param("store whose crops (all of them, labels ignored) to pretrain on", identity=False)
    device: str = param("auto | cpu | cuda", identity=False)
    work_dir: str = param("local folder for the resumable epoch checkpoints", identity=False)

    STEP = keys.GENERATOR_PRETRAIN


CONFIG = GeneratorPretrainConfig


def epoch_logger():
    """on_epoch callback: losses as MLflow metrics (step = epoch), preview grids as images."""
    def on_epoch(stage: str, epoch: int, metrics: dict[str, float], preview: np.ndarray | None) -> None:
        if metrics:
            mlflow.log_metrics(metrics, step=epoch if stage != "latents" else None)
        if preview is not None:
            mlflow.log_image(preview, f"{keys.PREVIEWS_DIR}/{stage}_epoch{epoch:04d}.png")
    return on_epoch


def log_generator(gen: Generator, train_ids: list[str]) -> None:
    """The generator as artifacts (`vae/`, `dit/`) plus the ids it trained on."""
    with tempfile.TemporaryDirectory() as tmp:
        gen.save(tmp)
        mlflow.log_artifacts(str(Path(tmp) / "vae"), keys.VAE_DIR)
        mlflow.log_artifacts(str(Path(tmp) / "dit"), keys.DIT_DIR)
    mlflow.log_text("\n".join(map(str, train_ids)) + "\n", keys.TRAIN_IDS)


@cli_step(keys.GENERATOR_PRETRAIN)
def main(argv: list[str] | None = None) -> str:
    cfg = from_cli(GeneratorPretrainConfig, argv, __doc__)
    store = open_store(cfg.data)
    device = resolve_device(cfg.device)
    workdir = Path(cfg.work_dir) / f"pretrain-{cfg.fingerprint(data=store.digest)}"
    ids = store.index["sample_id"].astype(str).tolist()
    with step_run(keys.GENERATOR_PRETRAIN, cfg.profile, run_name=f"pretrain {store.name}",
                  system_metrics=True) as run:
        log_params({**as_params(cfg), keys.P_DATA_PATH: str(store.path.resolve()), keys.P_N_TRAIN: len(store)})
        log_store(store, "training")
        gen = fit_generator(store.images, None, cfg, workdir, device=device, on_epoch=epoch_logger())
        gen.meta.update(trained_on=store.name, data_digest=store.digest, run_id=run.info.run_id)
        log_generator(gen, ids)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"pretrained generator: run {run.info.run_id} ({len(store)} crops of {store.name})")
    return run.info.run_id


if __name__ == "__main__":
    main()
