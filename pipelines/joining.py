"""Jobs that join one parent run: fold jobs of one train_cv experiment, started separately
(`--folds 1`, `--folds 2`, on other machines logging to one tracking server), share a parent.

Which parent: under `mlflow run`, the run MLflow made (MLFLOW_RUN_ID, consumed here so that
nested runs do not resume it). Otherwise the parent is found by a key tag, a hash of
everything that defines the experiment; the same command run again continues it. Two jobs
that start at the same moment may both create a parent; each then keeps the oldest and deletes
its own empty one. A run becomes visible only when the tracking store commits it, which can lag
its start time (SQLite writers wait on a lock), so the oldest is trusted only once it is
`PARENT_SETTLE_S` seconds old: every job then sees the same candidates and keeps the same one.
The clocks of the machines must agree to within that.

Writes to a joined parent go through `common.shared_write` (another job may write the same
tag or dataset at the same moment).
"""
from __future__ import annotations

import os
import time

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from analysis import keys
from analysis.runs import is_fold_run

PARENT_SETTLE_S = 3.0


def _experiment_id() -> str:
    from mlflow.tracking.fluent import _get_experiment_id  # what mlflow.start_run would use
    return _get_experiment_id()


def parents_with_key(client: MlflowClient, experiment_id: str, key_tag: str, key: str) -> list[Run]:
    """Runs tagged with this key that are not fold runs, oldest first."""
    found = client.search_runs([experiment_id], f"tags.`{key_tag}` = '{key}'", max_results=1000)
    return sorted((r for r in found if not is_fold_run(r)), key=lambda r: (r.info.start_time, r.info.run_id))


def settled_oldest_parent(client: MlflowClient, experiment_id: str, key_tag: str, key: str,
                          settle_s: float | None = None) -> str | None:
    """The oldest parent with this key, once every run that started before it must be visible."""
    settle = PARENT_SETTLE_S if settle_s is None else settle_s
    while True:
        found = parents_with_key(client, experiment_id, key_tag, key)
        if not found:
            return None
        wait = found[0].info.start_time / 1000 + settle - time.time()
        if wait <= 0:
            return found[0].info.run_id
        time.sleep(wait)


def open_parent(key_tag: str, key: str, run_name: str, tags: dict[str, str]) -> str:
    """The parent run id: MLflow's run under `mlflow run`, else the oldest run with this key, else a new one."""
    client = MlflowClient()
    own = os.environ.pop("MLFLOW_RUN_ID", None)  # consumed here: nested fold runs must not resume it
    if own:
        client.set_tag(own, key_tag, key)
        return own
    experiment_id = _experiment_id()
    found = settled_oldest_parent(client, experiment_id, key_tag, key)
    if found:
        return found
    tags = {key_tag: key, **tags}
    active = mlflow.active_run()
    if active:  # called in-process inside another run (e.g. a workflow): nest under it
        tags[keys.PARENT_RUN] = active.info.run_id
    created = client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id
    oldest = settled_oldest_parent(client, experiment_id, key_tag, key)
    if oldest != created:  # another job created one at the same moment: join the older one
        client.delete_run(created)
    return oldest
