"""pipelines.joining: jobs that start separately (other processes, other machines) find and share
one parent run by its key; the oldest wins, once every earlier-started run could be visible."""
import os
import threading
import time

import mlflow
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from analysis import keys
from pipelines import joining

KEY_TAG = keys.TRAIN_CV_KEY


def _open(key: str, out: dict, name: str) -> None:
    out[name] = joining.open_parent(KEY_TAG, key, "job", {keys.STEP: keys.TRAIN_CV})


def test_a_second_job_joins_the_parent_of_the_first(tracking):
    first = joining.open_parent(KEY_TAG, "k1", "a / b", {keys.STEP: keys.TRAIN_CV})
    assert joining.open_parent(KEY_TAG, "k1", "a / b", {keys.STEP: keys.TRAIN_CV}) == first
    assert joining.open_parent(KEY_TAG, "other", "a / b", {keys.STEP: keys.TRAIN_CV}) != first
    run = MlflowClient().get_run(first)
    assert run.data.tags[KEY_TAG] == "k1" and run.info.run_name == "a / b"


def test_two_jobs_that_start_together_keep_one_parent(tracking):
    chosen: dict[str, str] = {}
    jobs = [threading.Thread(target=_open, args=("k2", chosen, n)) for n in ("a", "b")]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=60)
    assert chosen["a"] == chosen["b"]
    client = MlflowClient()
    exp = client.get_experiment_by_name("test").experiment_id
    alive = client.search_runs([exp], f"tags.`{KEY_TAG}` = 'k2'", run_view_type=ViewType.ACTIVE_ONLY)
    assert [r.info.run_id for r in alive] == [chosen["a"]]  # the other job deleted its own empty parent


def test_under_mlflow_run_the_step_run_is_the_parent(tracking, monkeypatch):
    own = MlflowClient().create_run(mlflow.get_experiment_by_name("test").experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", own)
    assert joining.open_parent(KEY_TAG, "k3", "x", {}) == own
    assert "MLFLOW_RUN_ID" not in os.environ  # consumed: nested fold runs must not resume it
    assert MlflowClient().get_run(own).data.tags[KEY_TAG] == "k3"


@pytest.mark.real_settle  # the real PARENT_SETTLE_S (conftest shortens it elsewhere)
def test_a_parent_that_becomes_visible_late_still_wins(tracking):
    """The race CI once hit: job B's parent starts first but is committed after job A looked.
    A must not settle on its own run before every earlier-started run could be visible."""
    client = MlflowClient()
    exp = client.create_experiment("race")
    key_tags = {KEY_TAG: "k", keys.STEP: keys.TRAIN_CV}
    started = int(time.time() * 1000)
    a = client.create_run(exp, start_time=started, tags=key_tags).info.run_id
    chosen = {}
    looker = threading.Thread(target=lambda: chosen.update(a=joining.settled_oldest_parent(client, exp, KEY_TAG, "k")))
    looker.start()
    time.sleep(1.0)  # B was started 0.5 s before A but only now reaches the store
    b = client.create_run(exp, start_time=started - 500, tags=key_tags).info.run_id
    looker.join(timeout=30)
    assert chosen["a"] == b == joining.settled_oldest_parent(client, exp, KEY_TAG, "k") != a
