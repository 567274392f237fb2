"""train_cv: learning, the MLflow contract, resume after SIGKILL, determinism, leakage
refusals, synthetic balancing, `mlflow run`, and a short run on real AMi-Br crops."""
import dataclasses
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from analysis import keys
from conftest import shared_data
from data_tools.demo import make_demo
from data_tools.folds import assign_folds, balance_count
from data_tools.provenance import LeakageError, fold_train_ids, synthetic_provenance
from data_tools.store import StoreError, open_store, write_store
from models.backbones import resolve_backbone
from models.training import fold_pools, train_fold
from pipelines.config import build
from pipelines.prepare_data import PrepareDataConfig
from pipelines.train_cv import TrainCVConfig, run_train_cv

ROOT = Path(__file__).resolve().parents[1]
FOLD_KEYS = (keys.TRAIN_LOSS, keys.VAL_LOSS, keys.VAL_AUROC, keys.VAL_BA, keys.LR)


def _cfg(store, **kw) -> TrainCVConfig:
    """The demo profile's train_cv config, with one short fold by default."""
    base = dict(data=str(store.path), backbone="convnext", folds="1", epochs=1, batch_size=32, seed=0,
                augment="flips", workroot=".work")
    return build(TrainCVConfig, "demo", **{**base, **kw})


def _children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def _assert_fold_run_contract(client, child, epochs):
    m, t = child.data.metrics, child.data.tags
    assert child.info.status == "FINISHED" and child.info.run_name == f"fold {t[keys.FOLD]}"
    assert t[keys.BACKBONE] and t[keys.REGIME] and t[keys.STEP] == keys.TRAIN_CV
    assert {keys.BEST_VAL_AUROC, keys.BEST_EPOCH, keys.BEST_VAL_BA, *FOLD_KEYS} <= set(m)
    assert [x.step for x in client.get_metric_history(child.info.run_id, keys.VAL_AUROC)] == list(range(1, epochs + 1))
    files = {f.path for f in client.list_artifacts(child.info.run_id)}
    assert keys.VAL_PREDICTIONS in files and keys.CHECKPOINT_DIR not in files
    # the best checkpoint is the run's LoggedModel at the best epoch: its files, its validation metrics
    [out] = child.outputs.model_outputs
    model = client.get_logged_model(out.model_id)
    assert out.step == m[keys.BEST_EPOCH] and model.name == f"fold{t[keys.FOLD]}" and model.status == "READY"
    assert {f.path for f in client.list_logged_model_artifacts(model.model_id)} == {"model.safetensors", "config.json"}
    linked = {x.key: x for x in model.metrics}
    assert linked[keys.BEST_VAL_AUROC].value == m[keys.BEST_VAL_AUROC] and linked[keys.BEST_VAL_BA].step == out.step
    assert linked[keys.BEST_VAL_AUROC].dataset_name.endswith(f"fold {t[keys.FOLD]} {keys.VALIDATION}")
    assert model.params[keys.P_BACKBONE] == t[keys.BACKBONE] and model.tags[keys.FOLD] == t[keys.FOLD]


@pytest.mark.slow
def test_training_learns_well_above_chance(demo_store, tmp_path):
    cfg = build(TrainCVConfig, "demo", epochs=5, batch_size=16, seed=0, augment="flips")
    result = train_fold(cfg, demo_store, 2, None, tmp_path)
    assert result.best_val_auroc > 0.7, [h.val_auroc for h in result.history]
    preds = result.val_predictions
    assert list(preds.columns[:3]) == ["sample_id", "label", "prob"] and len(preds) == result.n_val


@pytest.mark.slow
def test_mlflow_contract_parent_and_five_fold_runs(demo_store, tracking):
    parent_id = run_train_cv(_cfg(demo_store, folds="all"))
    client = MlflowClient()
    found = client.search_runs([client.get_experiment_by_name("test").experiment_id],
                               "tags.step = 'train_cv' and tags.backbone = 'convnext' and tags.regime = 'real_only'")
    parents = [r for r in found if keys.FOLD not in r.data.tags]
    assert [p.info.run_id for p in parents] == [parent_id]
    parent = parents[0]
    assert parent.info.run_name == "convnext / real_only" and parent.info.status == "FINISHED"
    p = parent.data.params
    assert p[keys.P_FOLDS] == "1,2,3,4,5" and p[keys.P_DATA_DIGEST] == demo_store.digest
    for key in (keys.P_BACKBONE, keys.P_REGIME, keys.P_EPOCHS, keys.P_BATCH_SIZE, keys.P_LR, keys.P_SEED,
                keys.P_SYNTH_RUN_ID, keys.P_PRETRAINED):
        assert key in p, key
    assert parent.data.tags[keys.DATASET_DIGEST] == demo_store.digest
    children = _children(client, parent_id)
    assert sorted(c.data.tags[keys.FOLD] for c in children) == ["1", "2", "3", "4", "5"]
    m = parent.data.metrics
    aurocs = [m[keys.fold_metric(k, "auroc")] for k in range(1, 6)]
    bas = [m[keys.fold_metric(k, "ba")] for k in range(1, 6)]
    assert m[keys.CV_AUROC_MEAN] == pytest.approx(np.mean(aurocs))
    assert m[keys.CV_AUROC_STD] == pytest.approx(np.std(aurocs))  # population SD
    assert m[keys.CV_BA_MEAN] == pytest.approx(np.mean(bas)) and m[keys.CV_BA_STD] == pytest.approx(np.std(bas))
    for child in children:
        _assert_fold_run_contract(client, child, epochs=1)
        assert m[keys.fold_metric(int(child.data.tags[keys.FOLD]), "auroc")] == child.data.metrics[keys.BEST_VAL_AUROC]
    # the same command again: every fold is finished, nothing trains, no new runs
    assert run_train_cv(_cfg(demo_store, folds="all")) == parent_id
    assert len(_children(client, parent_id)) == 5


@pytest.mark.slow
def test_same_seed_same_run(demo_store, tmp_path):
    cfg = build(TrainCVConfig, "demo", epochs=1, batch_size=32, seed=3, augment="paper")
    a = train_fold(cfg, demo_store, 4, None, tmp_path / "a")
    b = train_fold(cfg, demo_store, 4, None, tmp_path / "b")
    assert a.history == b.history
    assert (tmp_path / "a/best/model.safetensors").read_bytes() == (tmp_path / "b/best/model.safetensors").read_bytes()


def _fold_curve(client, run_id):
    return {m.step: m.value for m in client.get_metric_history(run_id, keys.VAL_AUROC)}


@pytest.mark.slow
def test_resume_after_sigkill_ends_like_an_uninterrupted_run(demo_store, tracking, tmp_path, step_env):
    args = ["--data", str(demo_store.path), "--folds", "3", "--epochs", "3", "--batch_size", "32", "--seed", "1",
            "--augment", "paper", "--workroot", str(tmp_path / "work")]
    env = step_env(MLFLOW_EXPERIMENT_NAME="killed")  # one thread, as in-process: the same numerics
    job = subprocess.Popen([sys.executable, "-m", "pipelines.train_cv", *args], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=open(tmp_path / "job.err", "w"))
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:
        states = list((tmp_path / "work").glob("*/fold3/state.pt"))
        if states and not states[0].with_suffix(".pt.tmp").exists():
            try:
                epoch = torch.load(states[0], weights_only=False)["epoch"]
            except (EOFError, RuntimeError, FileNotFoundError):
                continue
            if epoch >= 1:
                job.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    job.wait()
    assert job.returncode == -signal.SIGKILL, (tmp_path / "job.err").read_text()[-3000:]
    client = MlflowClient()
    [killed_fold] = client.search_runs([client.get_experiment_by_name("killed").experiment_id], "tags.fold = '3'")
    assert killed_fold.info.status == "RUNNING"
    # started again with the same parameters: it continues the same fold run from its epoch checkpoint
    again = subprocess.run([sys.executable, "-m", "pipelines.train_cv", *args], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after epoch" in again.stdout + again.stderr
    resumed = client.get_run(killed_fold.info.run_id)
    assert resumed.info.status == "FINISHED"
    # the reference: the same training uninterrupted, in another experiment and work folder
    mlflow.set_experiment("reference")
    ref_parent = run_train_cv(_cfg(demo_store, folds="3", epochs=3, seed=1, augment="paper",
                                   workroot=str(tmp_path / "ref")))
    [ref] = _children(client, ref_parent)
    assert _fold_curve(client, resumed.info.run_id) == _fold_curve(client, ref.info.run_id)
    for key in (keys.BEST_VAL_AUROC, keys.BEST_VAL_BA, keys.BEST_EPOCH):
        assert resumed.data.metrics[key] == ref.data.metrics[key]


def _synthesize_run(stores: dict[int, str]) -> str:
    with mlflow.start_run(run_name="synthesize (test)", tags={keys.STEP: keys.SYNTHESIZE}) as run:
        mlflow.log_params({keys.synth_store_param(k): path for k, path in stores.items()})
    return run.info.run_id


def _synthetic_store(path, real, k, train_ids, n=40, fold=None, real_store=None):
    images, index = make_demo(n, seed=7)
    index = index.assign(label=1, sample_id=[f"syn{k}_{i}" for i in range(n)], source="synthetic", fold=-1)
    prov = synthetic_provenance(real_store or real, fold or k, "gen-run", train_ids)
    return write_store(path, images, index, name=f"synthetic fold {k}", adapter="synthetic", provenance=prov)


def test_leaking_or_foreign_synthetic_stores_are_refused(demo_store, tracking, tmp_path):
    k = 1
    train_ids = fold_train_ids(demo_store, k)
    val_id = demo_store.index["sample_id"][demo_store.fold_rows(k)[1][0]]
    other_images, other_index = make_demo(60, seed=3)
    other_index, _ = assign_folds(other_index, 2, 0)
    other_real = write_store(tmp_path / "other_real", other_images, other_index, name="other", adapter="demo")
    bad = {
        "saw a validation id": _synthetic_store(tmp_path / "leak", demo_store, k, train_ids + [val_id]),
        "made for fold 2": _synthetic_store(tmp_path / "fold2", demo_store, k, train_ids, fold=2),
        "another real store": _synthetic_store(tmp_path / "foreign", demo_store, k, train_ids, real_store=other_real),
    }
    for why, store in bad.items():
        cfg = _cfg(demo_store, regime=keys.SYNTH_BALANCED, synth_run_id=_synthesize_run({k: str(store.path)}))
        with pytest.raises(LeakageError):
            run_train_cv(cfg)
        assert not Path(".work").exists(), f"{why}: training started before the refusal"
    with pytest.raises(ValueError, match="needs synth_run_id"):
        run_train_cv(_cfg(demo_store, regime=keys.SYNTH_BALANCED))


@pytest.mark.slow
def test_synth_balanced_adds_fold_k_synthetic_atypical_crops(demo_store, tracking, tmp_path):
    k = 2
    good = _synthetic_store(tmp_path / "good", demo_store, k, fold_train_ids(demo_store, k), n=30)
    parent = run_train_cv(_cfg(demo_store, folds=str(k), regime=keys.SYNTH_BALANCED,
                               synth_run_id=_synthesize_run({k: str(good.path)})))
    [child] = _children(MlflowClient(), parent)
    p = child.data.params
    assert p[keys.P_N_TRAIN_SYNTHETIC] == "30"  # balancing wants more than the store has: all 30, no more
    assert child.data.tags["synthetic_digest"] == good.digest
    val = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path=keys.VAL_PREDICTIONS))
    assert not val["sample_id"].str.startswith("syn").any() and len(val) == int(p[keys.P_N_VAL])


def test_synthetic_count_balances_the_fold_or_follows_n_synthetic(demo_store, tmp_path):
    k = 2
    deficit = balance_count(demo_store, k)
    labels = demo_store.index["label"].to_numpy()[demo_store.fold_rows(k)[0]]
    assert deficit == (labels == 0).sum() - (labels == 1).sum() > 12
    big = _synthetic_store(tmp_path / "big", demo_store, k, fold_train_ids(demo_store, k), n=deficit + 5)
    for n_synthetic, expected in ((None, deficit), (12, 12)):
        cfg = dataclasses.replace(build(TrainCVConfig, "demo"), n_synthetic=n_synthetic)
        train, val, n_syn = fold_pools(cfg, demo_store, k, big)
        assert n_syn == expected and len(train) == len(labels) + expected
        assert len(val) == len(demo_store.fold_rows(k)[1])


def _empty_clone(dst: Path) -> Path:
    """The project's files as a fresh clone has them (tracked and new, not ignored): no stores, no runs."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    return dst


@pytest.mark.slow
def test_the_known_command_works_in_an_empty_clone(tracking, tmp_path, step_env):
    """`mlflow run . -e train_cv -P backbone=lunit` on a fresh clone: no data given, so the demo store is
    built first (said in one line, the same crops as make demo's), then the folds train on it."""
    clone = _empty_clone(tmp_path / "clone")
    assert not (clone / "stores").exists()
    out = subprocess.run(["mlflow", "run", ".", "-e", "train_cv", "-P", "backbone=lunit", "--env-manager", "local",
                          "--experiment-name", "cli", "-P", "folds=1", "-P", "epochs=1"],
                         cwd=clone, env=step_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    said = [line for line in (out.stdout + out.stderr).splitlines() if "building the embedded demo store" in line]
    assert len(said) == 1 and "stores/demo" in said[0], said
    built, prep = open_store(clone / "stores" / "demo"), build(PrepareDataConfig, "demo")
    m = built.manifest  # make demo's prepare_data parameters (the demo is deterministic: test_store.py)
    assert (m["n"], m["provenance"]["seed"], m["split"]["k"]) == (prep.size, prep.seed, prep.folds)
    client = MlflowClient()
    [parent] = [r for r in client.search_runs([client.get_experiment_by_name("cli").experiment_id], "")
                if keys.FOLD not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.params[keys.P_FOLDS] == "1"
    assert parent.data.params[keys.P_DATA_DIGEST] == built.digest
    demo_vit = resolve_backbone("lunit", "demo")
    assert parent.data.params[keys.P_TIMM_NAME] == demo_vit.timm_name
    assert parent.data.params[keys.P_INPUT_SIZE] == str(demo_vit.input_size)
    assert [c.data.tags[keys.FOLD] for c in _children(client, parent.info.run_id)] == ["1"]
    assert keys.CV_AUROC_MEAN in parent.data.metrics


def test_a_missing_store_that_is_not_the_demos_names_the_command_that_makes_it(tracking, tmp_path):
    with pytest.raises(StoreError, match="mlflow run . -e prepare_data .* -P out=.*elsewhere"):
        run_train_cv(build(TrainCVConfig, "demo", data=str(tmp_path / "elsewhere"), workroot=".work"))
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.slow
def test_real_amibr_subset_trains_and_logs_every_key(tracking, tmp_path):
    root = shared_data("amibr")
    table = pd.read_csv(root / "amibr_train_split.csv")
    rng = np.random.default_rng(0)
    picks = pd.concat([table[table["final_label"] == "Atypical"].sample(40, random_state=0),
                       table[table["final_label"] == "Normal"].sample(80, random_state=0)])
    images = np.stack([np.asarray(Image.open(root / row.final_label / row.dataset_uid).convert("RGB"))
                       for row in picks.itertuples()])
    index = pd.DataFrame({"sample_id": picks["dataset_uid"].str.removesuffix(".png"),
                          "label": (picks["final_label"] == "Atypical").astype(int), "domain": picks["dataset"],
                          "group": picks["slide"], "source": "amibr", "fold": -1})
    index, split = assign_folds(index, 3, int(rng.integers(100)))
    store = write_store(tmp_path / "amibr_subset", images, index, name="amibr_subset", adapter="amibr", split=split)
    parent_id = run_train_cv(_cfg(store, folds="1", epochs=1, batch_size=16))
    client = MlflowClient()
    m = client.get_run(parent_id).data.metrics
    assert {keys.fold_metric(1, "auroc"), keys.fold_metric(1, "ba"), keys.CV_AUROC_MEAN, keys.CV_AUROC_STD,
            keys.CV_BA_MEAN, keys.CV_BA_STD} <= set(m)
    [child] = _children(client, parent_id)
    _assert_fold_run_contract(client, child, epochs=1)
    assert 0.0 <= m[keys.CV_AUROC_MEAN] <= 1.0


@pytest.mark.slow
def test_fold_jobs_train_side_by_side_under_one_parent_with_the_same_results(tracking, tmp_path):
    """fold_jobs=2: two processes (one core each here) train folds 1 and 2 as fold runs of the one parent;
    every fold ends exactly as it does trained in this process, one after the other."""
    from data_tools.ingest import ingest
    store, _ = ingest("demo", None, tmp_path / "demo", folds=2, size=160)
    client = MlflowClient()
    one = run_train_cv(_cfg(store, folds="1,2", workroot=str(tmp_path / "one")))
    mlflow.set_experiment("side by side")
    two = run_train_cv(_cfg(store, folds="1,2", workroot=str(tmp_path / "two"), fold_jobs=2))
    parents = [r for r in client.search_runs([client.get_experiment_by_name("side by side").experiment_id],
                                             f"tags.step = '{keys.TRAIN_CV}'") if keys.FOLD not in r.data.tags]
    assert [p.info.run_id for p in parents] == [two] and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags[keys.FOLD] for c in _children(client, two)) == ["1", "2"]
    a, b = client.get_run(one).data.metrics, client.get_run(two).data.metrics
    for k in (1, 2):
        assert b[keys.fold_metric(k, "auroc")] == pytest.approx(a[keys.fold_metric(k, "auroc")], abs=1e-6), k
    assert b[keys.CV_AUROC_MEAN] == pytest.approx(a[keys.CV_AUROC_MEAN], abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "two").rglob("fold-job-*.log")) == ["fold-job-1.log", "fold-job-2.log"]


def test_a_training_split_one_crop_past_a_whole_batch_trains(tmp_path):
    """The last batch of an epoch would hold one crop (split size = 1 mod batch size): BatchNorm
    refuses to train on one value per channel, so that batch is dropped instead of failing the fold
    (seen: a 3-fold workflow's ConvNeXt fold with 24 synthetic crops)."""
    from data_tools.ingest import ingest
    store, _ = ingest("demo", None, tmp_path / "demo", folds=2, size=80)
    n_train = len(store.fold_rows(1)[0])
    cfg = _cfg(store, batch_size=n_train - 1, workroot=str(tmp_path / "w"))  # a batch, then one crop
    result = train_fold(cfg, store, 1, None, tmp_path / "w")
    assert len(result.history) == 1 and np.isfinite(result.history[0].train_loss)
