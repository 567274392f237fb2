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

import shutil
from dataclasses import dataclass
from pathlib import Path

from analysis import keys
from data_tools.params import param
from models.generator_training import FitConfig, fit_generator
from pipelines.common import cli_step, log_params, log_store
from pipelines.config import StepConfig, as_params, from_cli
from pipelines.demo_data import open_data
from pipelines.generator_runs import (epoch_logger, log_generator, main_process_run, main_process_value,
                                      training_processes)



@dataclass
class GeneratorPretrainConfig(StepConfig, FitConfig):
    data: str = param("store whose crops (all of them, labels ignored) to pretrain on", identity=False)
    device: str = param("auto | cpu | cuda", identity=False)
    work_dir: str = param("local folder for the resumable epoch checkpoints", identity=False)

    STEP = keys.GENERATOR_PRETRAIN


CONFIG = GeneratorPretrainConfig


@cli_step(keys.GENERATOR_PRETRAIN)
def main(argv: list[str] | None = None) -> str:
    cfg = from_cli(GeneratorPretrainConfig, argv, __doc__)
    store = open_data(cfg.data, cfg.profile, keys.GENERATOR_PRETRAIN)
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
