"""Data-parallel generator training under `accelerate launch`: two CPU processes (gloo) that
split one global batch train what one process trains, and only the main process logs.

The test runs this file as a script under `accelerate launch`: generator_pretrain, then
generator_finetune on its run (fold 1), each step's `main` as its command line runs it.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from analysis import keys
from pipelines import generator_finetune, generator_pretrain

pytestmark = pytest.mark.slow  # accelerate launch starts two training processes

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
# 2 epochs per stage (fine-tuning: the DiT only, as in the demo), 6 (pool) and 8 (fold 1) batches of 8
# per epoch: 4 crops per process
COMMON = ["--arch", "tiny", "--dit_epochs", "2", "--batch_size", "8", "--lr", "2e-3", "--seed", "0",
          "--vae_crop", "16", "--ema_decay", "0.99", "--preview_every", "0", "--device", "cpu"]
# Float rounding is all that may differ: a process sums 4 samples where one process sums 8, and DDP
# averages two float32 gradients; AdamW then carries the difference on. Measured on 2 CPU cores:
# weights 1.1e-4 apart at most, epoch losses 7e-8, latent shift/scale 1.2e-7. The bounds are ~10x
# that (for the weights: half of one AdamW step at lr 2e-3), and a fault is far above them: with
# each process drawing only its own rows' numbers (both then draw the same), weights differ by
# 7e-2, epoch losses by 9e-2, latent shift/scale by 1e-2.
WEIGHT_ATOL = 1e-3
LOSS_ATOL = 1e-5
LATENT_STATS_ATOL = 1e-4


def run_steps(pool: str, real: str, work: str) -> tuple[str, str]:
    """generator_pretrain on `pool`, then generator_finetune (fold 1 of `real`) from it: the two run ids."""
    pretrain = generator_pretrain.main(["--data", pool, "--vae_epochs", "2", "--work_dir", f"{work}/pre", *COMMON])
    finetune = generator_finetune.main(["--data", real, "--pretrain_run_id", pretrain, "--folds", "1",
                                        "--vae_epochs", "0", "--label_dropout", "0.3", "--work_dir", f"{work}/fine",
                                        *COMMON])
    return pretrain, finetune


def _curves(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run as (step, value) in the order logged: a metric logged twice shows twice."""
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)]
            for k in client.get_run(run_id).data.metrics if not k.startswith("system/")}


def _weights(client: MlflowClient, run_id: str, dst: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in (keys.VAE_DIR, keys.DIT_DIR):
        folder = Path(client.download_artifacts(run_id, part, str(dst)))
        out.update({f"{part}.{k}": v for k, v in load_file(folder / "diffusion_pytorch_model.safetensors").items()})
    return out


def _fold_run(client: MlflowClient, parent: str) -> str:
    (fold,) = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    return fold.info.run_id


def test_two_processes_train_what_one_does_and_only_the_main_one_logs(thumb_stores, tracking, tmp_path, step_env):
    real, pool = thumb_stores
    client = MlflowClient()
    one = run_steps(str(pool.path), str(real.path), str(tmp_path / "one"))
    experiment = client.get_run(one[0]).info.experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment])}

    env = step_env(MLFLOW_EXPERIMENT_NAME="test")
    start = time.time()
    done = subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                           __file__, str(pool.path), str(real.path), str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    print(f"accelerate launch, 2 processes: {time.time() - start:.1f} s")
    assert out.count("data-parallel over 2 processes (MULTI_CPU, cpu)") == 2, "one line per step, main process only"

    new = [r for r in client.search_runs([experiment]) if r.info.run_id not in before]
    assert len(new) == 3, "pretraining, fine-tuning and its fold: no run of the second process"
    top = {r.data.tags[keys.STEP]: r.info.run_id for r in new if "mlflow.parentRunId" not in r.data.tags}
    two = top[keys.GENERATOR_PRETRAIN], top[keys.GENERATOR_FINETUNE]

    worst = {"loss": 0.0, "latent stats": 0.0, "weight": 0.0}
    pairs = ((one[0], two[0], {keys.VAE_LOSS, keys.DIT_LOSS}, 2),  # runs, curves at least, previews
             (_fold_run(client, one[1]), _fold_run(client, two[1]), {keys.DIT_LOSS}, 1))
    for a, b, losses, n_previews in pairs:
        assert client.get_run(b).info.status == "FINISHED"
        ca, cb = _curves(client, a), _curves(client, b)
        assert set(ca) == set(cb) and losses <= set(ca)
        for key in ca:
            assert [s for s, _ in cb[key]] == [s for s, _ in ca[key]], f"{key}: logged once per epoch"
            gap = max(abs(va - vb) for (_, va), (_, vb) in zip(ca[key], cb[key]))
            kind, atol = ("latent stats", LATENT_STATS_ATOL) if key.startswith("latent_") else ("loss", LOSS_ATOL)
            assert gap <= atol, (key, ca[key], cb[key])
            worst[kind] = max(worst[kind], gap)
        previews = [f.path for f in client.list_artifacts(b, keys.PREVIEWS_DIR)]
        assert previews == [f.path for f in client.list_artifacts(a, keys.PREVIEWS_DIR)] and len(previews) == n_previews
        wa, wb = _weights(client, a, tmp_path / "w1" / a), _weights(client, b, tmp_path / "w2" / b)
        assert wa.keys() == wb.keys()
        gap = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
        assert gap <= WEIGHT_ATOL
        worst["weight"] = max(worst["weight"], gap)
    print("max |1 process - 2 processes|: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


if __name__ == "__main__":
    run_steps(*sys.argv[1:4])
