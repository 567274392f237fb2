"""generator_pretrain: the VAE, then the DiT (null class only), on every crop of a store,
labels ignored. The paper pretrains on ~56,000 unlabelled mitotic figures cut from the
MITOS_WSI_CMC / CCMCT slides; the pool must not contain the CV pool's crops (generator_finetune
refuses a pretraining that saw them). Logs epoch losses, preview grids, the generator
(`vae/`, `dit/`) and the ids it trained on (`train_ids.txt`).

A killed run continues from its last epoch when started again with the same data and
parameters (epoch checkpoints under `work_dir`).

`accelerate launch --multi_gpu --num_processes N -m pipelines.generator_pretrain ...` trains
data-parallel over N processes (models.generator_training.data_parallel); the main process
makes (or, under MLFLOW_RUN_ID, resumes) the run and logs into it, the others log nothing.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from analysis import keys
from data_tools.params import param
from data_tools.store import open_store
from models.generator import Generator
from models.generator_training import FitConfig, data_parallel, fit_generator
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


def training_processes(device_name: str) -> tuple[Accelerator | None, torch.device]:
    """The accelerator of a multi-process launch (None: one plain process) and this process's device."""
    device = resolve_device(device_name)
    accelerator = data_parallel(device)
    if accelerator is None:
        return None, device
    if accelerator.is_main_process:
        print(f"data-parallel over {accelerator.num_processes} processes "
              f"({accelerator.distributed_type.value}, {accelerator.device.type})")
    return accelerator, accelerator.device


@contextlib.contextmanager
def main_process_run(accelerator: Accelerator | None, *args, **kwargs) -> Iterator[mlflow.ActiveRun | None]:
    """`step_run` in the main process (the only one of a plain run); None in the others, which
    neither create runs nor log into the main process's one."""
    if accelerator is None or accelerator.is_main_process:
        with step_run(*args, **kwargs) as run:
            yield run
    else:
        yield None


def main_process_value(accelerator: Accelerator | None, value: str | None) -> str:
    """The main process's `value` (a run id) in every process."""
    return value if accelerator is None else broadcast_object_list([value])[0]


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
    accelerator, device = training_processes(cfg.device)
    workdir = Path(cfg.work_dir) / f"pretrain-{cfg.fingerprint(data=store.digest)}"
    ids = store.index["sample_id"].astype(str).tolist()
    with main_process_run(accelerator, keys.GENERATOR_PRETRAIN, cfg.profile, run_name=f"pretrain {store.name}",
                          system_metrics=True) as run:
        if run is not None:
            log_params({**as_params(cfg), keys.P_DATA_PATH: str(store.path.resolve()), keys.P_N_TRAIN: len(store)})
            log_store(store, "training")
        gen = fit_generator(store.images, None, cfg, workdir, device=device, on_epoch=epoch_logger(),
                            accelerator=accelerator)
        if run is not None:
            gen.meta.update(trained_on=store.name, data_digest=store.digest, run_id=run.info.run_id)
            log_generator(gen, ids)
    run_id = main_process_value(accelerator, run.info.run_id if run is not None else None)
    if run is not None:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"pretrained generator: run {run_id} ({len(store)} crops of {store.name})")
    return run_id


if __name__ == "__main__":
    main()
