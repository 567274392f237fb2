"""What the generator steps (generator_pretrain, generator_finetune, synthesize) share, kept here so
that each step module holds only its config, its own step logic and `main`, and no step imports
another: their accelerate processes (`training_processes`; under `accelerate launch` only the main
process makes a run and logs, `main_process_run`, and every process learns its run id,
`main_process_value`), the epoch logging of a generator fit (`epoch_logger`), and how a generator is
logged to an MLflow run (`log_generator`: `vae/`, `dit/`, `train_ids.txt`), downloaded from one
(`download_generator`), and checked for fold isolation against the store it is fine-tuned on
(`check_pretraining`).
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from analysis import keys
from data_tools.provenance import LeakageError
from data_tools.store import Store
from models.checkpoint import resolve_device
from models.generator import Generator
from models.generator_training import data_parallel
from pipelines.common import step_run


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


def download_generator(run_id: str, dst: str | Path, parts: tuple[str, ...] = (keys.VAE_DIR, keys.DIT_DIR, keys.TRAIN_IDS)
                       ) -> Path:
    """A run's `vae/`, `dit/` and `train_ids.txt` artifacts (or the `parts` asked for) into dst."""
    for part in parts:
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=part, dst_path=str(dst))
    return Path(dst)


def check_pretraining(pretrain_ids: Path, store: Store) -> None:
    """Fold isolation starts at pretraining: no CV-pool crop may be among its crops."""
    seen = set(pretrain_ids.read_text().split())
    pool = store.index.loc[store.index["fold"] > 0, "sample_id"].astype(str)
    shared = pool[pool.isin(seen)]
    if len(shared):
        raise LeakageError(f"the pretraining run saw {len(shared)} crops of {store.path}'s CV pool (e.g. "
                           f"{shared.iloc[:3].tolist()}): every one is a validation crop of some fold. Pretrain on a "
                           f"pool without them (the paper: unlabelled WSI crops; demo: prepare_data --source demo "
                           f"--seed <other> --folds 0)")
