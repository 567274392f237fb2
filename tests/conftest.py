"""Shared fixtures: a private MLflow tracking store per test, demo stores, the real data path."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Path into the real data beside the clone (CI has it), skipping the test cleanly where it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not present at {path}")
    return path


# git is the one process a fast test may start: code_version() and MLflow's run context read the commit
ALLOWED_IN_FAST_TIER = {"git"}


@pytest.fixture(autouse=True)
def fast_tier_starts_no_process(request, monkeypatch):
    """The fast tier (`-m "not slow"`) is for the edit-test loop: a test in it that starts a
    process (a step, a server, a browser, a worker) fails, naming the command; mark it `slow`."""
    if "slow" in request.keywords:
        return
    test = request.node.nodeid

    def refuse(what: str):
        pytest.fail(f"{test} is in the fast tier but starts a process ({what}): mark it @pytest.mark.slow",
                    pytrace=False)

    real_init = subprocess.Popen.__init__

    def popen(self, args, *a, **kw):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        if Path(str(argv[0]).split()[0]).name not in ALLOWED_IN_FAST_TIER:
            refuse(" ".join(map(str, argv))[:200])
        real_init(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, lambda *a, _name=name, **kw: refuse(f"os.{_name}"))


@pytest.fixture(scope="session")
def step_env():
    """The environment of a step (or server) that a test starts as a process, built in one place:
    the test's tracking store (as the `tracking` fixture set it; read at the call), no run or experiment id of the
    test's own, one torch thread (tiny models), unbuffered output, this project importable, and the
    venv's bin first on PATH (`mlflow run` and the scoring server exec `python`/`uvicorn` from it).
    Call it with the variables a test adds (a value None removes the variable)."""
    def build(**extra: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        for key, value in extra.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env
    return build


@pytest.fixture(autouse=True)
def quick_parent_settle(request, monkeypatch):
    """A parent created in this process waits PARENT_SETTLE_S for runs other jobs may commit late;
    in-process tests have no such job: 0.5 s (saves ~3 s a parent). Jobs started as processes keep
    the real wait, and so do tests marked `real_settle` (the race test)."""
    if "real_settle" not in request.keywords:
        from pipelines import joining
        monkeypatch.setattr(joining, "PARENT_SETTLE_S", 0.5)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Every model in the tests is tiny: one thread is fastest, and far faster than two when
    another process holds one of the two cores (OpenMP threads then wait on each other)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def empty_tracking_db(tmp_path_factory) -> Path:
    """An sqlite tracking store with MLflow's tables made once (1.5 s of migrations); each test copies it."""
    path = tmp_path_factory.mktemp("tracking_template") / "mlflow.db"
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    SqlAlchemyStore(f"sqlite:///{path}", str(path.parent / "mlruns")).engine.dispose()
    return path


@pytest.fixture
def tracking(tmp_path, monkeypatch, empty_tracking_db):
    """A fresh sqlite tracking store + artifact root for one test; yields the URI."""
    shutil.copyfile(empty_tracking_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("test")
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory):
    """A small demo store (600 crops, 5 folds) shared by the tests of a session; read-only."""
    from data_tools.ingest import ingest
    out = tmp_path_factory.mktemp("stores") / "demo600"
    store, _ = ingest("demo", None, out, folds=5, seed=0, size=600)
    return store


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Two fold checkpoints of the demo ConvNeXt (random init, different seeds): enough for
    the ensemble, the registered pyfunc model and the container's inference, without training."""
    import torch

    from models.backbones import resolve_backbone
    from models.checkpoint import save_checkpoint
    from models.classifier import build_classifier
    spec = resolve_backbone("convnext", "demo")
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    dirs = []
    for k in (1, 2):
        torch.manual_seed(k)
        dirs.append(save_checkpoint(build_classifier(spec, "none"), spec, root / f"fold{k}"))
    return dirs


@pytest.fixture
def tiny_train_run(tracking, tiny_checkpoints):
    """A finished train_cv run (convnext, real_only, folds 1,2) whose fold runs carry the tiny
    checkpoints as their LoggedModels, as train_cv logs them; yields its run id."""
    from analysis import keys
    from pipelines.fold_model import log_fold_model
    with mlflow.start_run(run_name="tiny", tags={keys.STEP: keys.TRAIN_CV, keys.PROFILE: "demo",
                                                 keys.BACKBONE: "convnext", keys.REGIME: keys.REAL_ONLY}) as parent:
        mlflow.log_params({keys.P_BACKBONE: "convnext", keys.P_REGIME: keys.REAL_ONLY, keys.P_FOLDS: "1,2"})
        for k, folder in enumerate(tiny_checkpoints, 1):
            mlflow.log_metrics({keys.fold_metric(k, "auroc"): 0.8 + k / 100, keys.fold_metric(k, "ba"): 0.7})
            with mlflow.start_run(nested=True, tags={keys.STEP: keys.TRAIN_CV, keys.FOLD: str(k)}):
                log_fold_model(k, folder, 1, {keys.BEST_VAL_AUROC: 0.8 + k / 100, keys.BEST_VAL_BA: 0.7})
    yield parent.info.run_id


@pytest.fixture(scope="session")
def thumb_stores(tmp_path_factory):
    """(real, pool): demo crops shrunk to 32 px for fast generator tests. `real` has 96 crops
    in 3 CV folds; `pool` 48 crops from another seed, outside any CV pool (folds 0)."""
    from data_tools.demo import make_demo
    from data_tools.folds import assign_folds
    from data_tools.store import write_store
    root = tmp_path_factory.mktemp("thumb_stores")
    stores = []
    for name, n, seed, k in (("real", 96, 0, 3), ("pool", 48, 5, 0)):
        images, index = make_demo(n=n, seed=seed)
        images = images.reshape(n, 32, 4, 32, 4, 3).mean((2, 4)).round().astype("uint8")
        index, split = assign_folds(index, k, seed)
        stores.append(write_store(root / name, images, index, name=f"thumb_{name}", adapter="demo", split=split))
    return tuple(stores)
