"""More than one machine, with the existing engines: a tracking server on PostgreSQL that many
processes log to, Optuna's database storage shared by workers, and folds of one train_cv run
started as separate jobs that join one parent run."""
import base64
import json
import secrets
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from analysis import keys
from data_tools.ingest import ingest
from services import mlflow_server, postgres_server

pytestmark = pytest.mark.slow  # fold jobs and tune workers as processes, PostgreSQL and an MLflow server


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    store, _ = ingest("demo", None, tmp_path_factory.mktemp("mm") / "demo160", folds=2, seed=0, size=160)
    return store


def _train_fold_job(store, fold, env):
    return subprocess.Popen([sys.executable, "-m", "pipelines.train_cv", "--data", str(store.path), "--backbone",
                             "convnext", "--folds", str(fold), "--epochs", "1", "--seed", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _check_joined_parent(client, experiment_id):
    parents = [r for r in client.search_runs([experiment_id], f"tags.step = '{keys.TRAIN_CV}'")
               if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, "both fold jobs must join one parent run"
    parent = parents[0]
    folds = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags[keys.FOLD] for r in folds) == ["1", "2"]
    m = client.get_run(parent.info.run_id).data.metrics
    per_fold = [m[keys.fold_metric(k, "auroc")] for k in (1, 2)]
    assert m[keys.CV_AUROC_MEAN] == pytest.approx(np.mean(per_fold))
    assert m[keys.CV_AUROC_STD] == pytest.approx(np.std(per_fold))  # population SD


def test_two_fold_jobs_join_one_parent(tracking, tiny_store, step_env):
    env = step_env(MLFLOW_EXPERIMENT_NAME="folds")
    MlflowClient().create_experiment("folds")  # once, before the jobs (concurrent creation races in MLflow)
    jobs = [_train_fold_job(tiny_store, k, env) for k in (1, 2)]
    for job in jobs:
        out, _ = job.communicate(timeout=600)
        assert job.returncode == 0, out[-3000:]
    client = MlflowClient()
    _check_joined_parent(client, client.get_experiment_by_name("folds").experiment_id)


def _status(url, headers=None, body=None):
    """HTTP status of a GET (a JSON POST with body), sending the given headers only."""
    data = None if body is None else json.dumps(body).encode()
    headers = {**(headers or {}), **({"Content-Type": "application/json"} if body is not None else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


ADMIN_PASSWORD, USER_PASSWORD = "admin-" + secrets.token_hex(8), "cluster-" + secrets.token_hex(8)


def test_postgres_backs_a_shared_study_and_the_tracking_server(tmp_path, tiny_store, monkeypatch, step_env):
    """The recipe of docs/scaling.md: basic-auth server on PostgreSQL, reached by a host name that
    --allowed-hosts lists, jobs logging as a user the admin created."""
    with postgres_server() as pg, mlflow_server(
            f"{pg}/mlflow", tmp_path / "artifacts", host_name="localhost",
            auth={"default_permission": "READ", "database_uri": f"{pg}/mlflow", "admin_username": "admin",
                  "admin_password": ADMIN_PASSWORD, "auth_cache_ttl_seconds": "60"}) as url:
        search = url + "/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(search) == 401  # no credentials
        basic = "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
        assert _status(search, {"Authorization": basic}) == 200
        assert _status(search, {"Authorization": basic, "Host": "evil.example"}) == 403  # not in --allowed-hosts
        # docs/scaling.md's curl: the admin creates the user the jobs log as
        assert _status(url + "/api/2.0/mlflow/users/create", {"Authorization": basic},
                       {"username": "cluster", "password": USER_PASSWORD}) == 200
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "cluster")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER_PASSWORD)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.chdir(tmp_path)
        env = step_env(MLFLOW_TRACKING_URI=url, MLFLOW_EXPERIMENT_NAME="cluster")
        MlflowClient(url).create_experiment("cluster")  # once, before the jobs (concurrent creation races)
        # folds 1 and 2 as two concurrent jobs (two machines in real life) logging to the server
        jobs = [_train_fold_job(tiny_store, k, env) for k in (1, 2)]
        # meanwhile an Optuna study on PostgreSQL with two workers
        tune = subprocess.run([sys.executable, "-m", "pipelines.tune", "--data", str(tiny_store.path), "--backbone",
                               "convnext", "--n_trials", "3", "--n_workers", "2", "--storage", f"{pg}/optuna",
                               "--study_name", "pg-study", "--folds", "1", "--epochs", "1"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert tune.returncode == 0, tune.stdout[-2000:] + tune.stderr[-3000:]
        for job in jobs:
            out, _ = job.communicate(timeout=600)
            assert job.returncode == 0, out[-3000:]
        study = optuna.load_study(study_name="pg-study", storage=f"{pg}/optuna")
        done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
        assert sorted(t.number for t in done) == [0, 1, 2]
        client = MlflowClient(url)
        exp = client.get_experiment_by_name("cluster").experiment_id
        _check_joined_parent(client, exp)
        trial_runs = client.search_runs([exp], "tags.step = 'tune' and tags.trial != ''")
        assert len(trial_runs) == 3
        # artifacts went through the server to its artifact store
        assert any((tmp_path / "artifacts").rglob("val_predictions.csv"))
