"""generator_pretrain -> generator_finetune (in this process) -> synthesize (started by `mlflow run`,
from the finetune run's id), on 32 px demo stores: fold isolation, the synthetic store contract, what
lands in MLflow."""
from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from analysis import keys
from data_tools.constants import ATYPICAL, NORMAL
from data_tools.provenance import LeakageError, check_synthetic_for_fold, fold_train_ids
from data_tools.store import REQUIRED_COLUMNS, open_store
from pipelines import generator_finetune, generator_pretrain
from pipelines.generator_runs import check_pretraining
from data_tools.folds import balance_count

ROOT = Path(__file__).resolve().parents[1]


def argv(**params) -> list[str]:
    return [a for k, v in params.items() for a in (f"--{k}", str(v))]


def mlflow_run(entry: str, env: dict[str, str], **params) -> str:
    """Run one entry point as a user would (`env`: conftest's step_env); returns the id of the run it made."""
    tracking = env["MLFLOW_TRACKING_URI"]
    cmd = ["mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local", "--experiment-name", "test"]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{entry} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("test")
    runs = client.search_runs([exp.experiment_id], f"tags.step = '{entry}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return top[0].info.run_id


@pytest.mark.slow
def test_pretrain_finetune_synthesize_from_mlflow_run(tracking, thumb_stores, tmp_path, step_env):
    env = step_env(MLFLOW_EXPERIMENT_NAME=None)
    real, pool = thumb_stores
    client = MlflowClient(tracking)
    fast = dict(batch_size=16, lr=2e-3, vae_crop=0, work_dir=tmp_path / "work")

    pretrain = generator_pretrain.main(argv(data=pool.path, vae_epochs=2, dit_epochs=2, **fast))
    run = client.get_run(pretrain)
    assert run.data.tags[keys.STEP] == keys.GENERATOR_PRETRAIN and run.data.tags[keys.PROFILE] == "demo"
    assert run.data.tags[keys.DATASET_DIGEST] == pool.digest
    assert len(client.get_metric_history(pretrain, keys.VAE_LOSS)) == 2
    assert {keys.VAE_DIR, keys.DIT_DIR, keys.TRAIN_IDS} <= {a.path for a in client.list_artifacts(pretrain)}

    finetune = generator_finetune.main(argv(data=real.path, pretrain_run_id=pretrain, folds="1,2", vae_epochs=1,
                                            dit_epochs=2, **fast))
    exp = client.get_run(finetune).info.experiment_id
    children = {int(r.data.tags[keys.FOLD]): r for r in
                client.search_runs([exp], f"tags.mlflow.parentRunId = '{finetune}'")}
    assert sorted(children) == [1, 2]
    for k, child in children.items():  # fold isolation: exactly fold k's training ids, none of its validation ids
        seen = Path(mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path=keys.TRAIN_IDS,
                                                        dst_path=str(tmp_path / f"ids{k}"))).read_text().split()
        assert sorted(seen) == sorted(fold_train_ids(real, k))
        val_ids = set(real.index["sample_id"].iloc[real.fold_rows(k)[1]])
        assert val_ids and not val_ids & set(seen)
        assert len(client.get_metric_history(child.info.run_id, keys.DIT_LOSS)) == 2

    synth = mlflow_run(keys.SYNTHESIZE, env, finetune_run_id=finetune, n_atypical="balance", n_normal=3,
                       sampler="ddim", steps=4, out=tmp_path / "synthetic", batch_size=16, quality_max=64)
    run = client.get_run(synth)
    params, metrics = run.data.params, run.data.metrics
    assert params[keys.P_FINETUNE_RUN_ID] == finetune and params[keys.P_SAMPLER] == "ddim"
    assert run.data.tags[keys.QUALITY_FEATURES].startswith("descriptor features")  # what the KID/FID are on
    stores = {}
    for k in (1, 2):
        store = open_store(params[keys.synth_store_param(k)])
        assert Path(params[keys.synth_store_param(k)]) == tmp_path / "synthetic" / synth / f"fold{k}"
        assert store.digest == params[keys.synth_digest_param(k)]
        idx = store.index
        assert set(REQUIRED_COLUMNS) <= set(idx.columns)
        assert (idx["label"] == ATYPICAL).sum() == balance_count(real, k) > 0
        assert (idx["label"] == NORMAL).sum() == 3
        assert (idx["source"] == "synthetic").all() and (idx["domain"] == "synthetic").all()
        assert (idx["group"] == f"synthetic_fold{k}").all() and (idx["fold"] == -1).all()
        assert store.images.shape[1:] == (32, 32, 3) and store.images.dtype == np.uint8
        check_synthetic_for_fold(store, real, k)
        assert store.manifest["provenance"]["generator_run_id"] == children[k].info.run_id
        stores[k] = store
        for name in ("kid_atypical", "fid_atypical", "kid_normal", "near_copy_share", "images_per_second"):
            assert np.isfinite(metrics[keys.fold_metric(k, name)])
    with pytest.raises(LeakageError):
        check_synthetic_for_fold(stores[1], real, 2)
    assert not set(stores[1].index["sample_id"]) & set(stores[2].index["sample_id"])
    grids = {a.path for a in client.list_artifacts(synth, keys.GRIDS_DIR)}
    assert {f"{keys.GRIDS_DIR}/fold1_real_vs_synthetic_atypical.png",
            f"{keys.GRIDS_DIR}/fold2_nearest_training_pairs.png"} <= grids


def test_finetune_refuses_a_pretraining_that_saw_the_cv_pool(thumb_stores, tmp_path):
    real, pool = thumb_stores
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(pool.index["sample_id"]))
    check_pretraining(ids, real)  # a separate pool is fine
    ids.write_text("\n".join([*pool.index["sample_id"], real.index["sample_id"].iloc[5]]))
    with pytest.raises(LeakageError, match="1 crops"):
        check_pretraining(ids, real)
