"""Every MLflow lookup of the project, one rule per question, so that the steps cannot disagree.

- the runs of a step: active runs, newest first (`search`, `step_runs`, `latest_run`);
- the fold runs of a parent (train_cv or generator_finetune): **the newest FINISHED run per
  fold** (`fold_runs`); every attempt per fold, for resuming (`fold_attempts`);
- the folds a parent should have: its `folds` param when it lists them (`expected_folds`), and
  a complete set or an error naming the missing folds (`complete_fold_runs`);
- what the fold runs hold: out-of-fold predictions, checkpoints (a LoggedModel each, or the
  `checkpoint/` artifact of older runs; each with its config.json), the fold ensemble;
- the threshold rule (threshold, per-fold thresholds) of an evaluate run, and a train_cv run's latest one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import LoggedModel, LoggedModelStatus, Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from analysis import keys
from data_tools.errors import UserError
from data_tools.folds import parse_fold_list

FINISHED = "FINISHED"


class RunLookupError(UserError, LookupError):
    """The runs lack what was asked for: no such run, a missing fold, a missing artifact."""


def experiment_ids(client: MlflowClient, experiment: str | None = None) -> list[str]:
    """The experiment named (by name or id), else that of the active run, else the one the
    environment names (`mlflow run` sets it), else Default."""
    if not experiment and mlflow.active_run() is not None:
        return [mlflow.active_run().info.experiment_id]
    experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_ID") or os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if not experiment:
        return ["0"]
    exp = client.get_experiment_by_name(experiment)
    if exp is None and experiment.isdigit():
        try:
            exp = client.get_experiment(experiment)
        except MlflowException:
            exp = None
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise RunLookupError(f"no experiment {experiment!r} in {mlflow.get_tracking_uri()}; experiments: {names}")
    return [exp.experiment_id]


def search(client: MlflowClient, exp_ids: list[str], filter_string: str = "", finished_only: bool = True) -> list[Run]:
    """All matching active runs, newest first (pages through the results)."""
    if finished_only:
        filter_string = " and ".join(f for f in (filter_string, f"attributes.status = '{FINISHED}'") if f)
    runs, token = [], None
    while True:
        page = client.search_runs(exp_ids, filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                  order_by=["attributes.start_time DESC"], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def running_runs(client: MlflowClient, exp_ids: list[str]) -> list[Run]:
    """The experiment's runs whose status is RUNNING (some may belong to a process that is gone)."""
    return search(client, exp_ids, "attributes.status = 'RUNNING'", finished_only=False)


def step_runs(client: MlflowClient, exp_ids: list[str], step: str, finished_only: bool = True,
              filter_string: str = "") -> list[Run]:
    query = " and ".join(f for f in (f"tags.`{keys.STEP}` = '{step}'", filter_string) if f)
    return search(client, exp_ids, query, finished_only)


def latest_run(client: MlflowClient, exp_ids: list[str], step: str, filter_string: str = "") -> Run | None:
    """The newest finished run of a step (matching the filter), or None."""
    found = step_runs(client, exp_ids, step, filter_string=filter_string)
    return found[0] if found else None


def newest_in_experiment(client: MlflowClient, step: str, experiment: str | None = None) -> Run | None:
    """The newest finished run of `step` in the experiment (as `experiment_ids` finds it), or None,
    also when the default experiment does not exist yet (nothing has logged to it)."""
    try:
        exp_ids = experiment_ids(client, experiment)
    except RunLookupError:
        if experiment:
            raise
        return None
    return latest_run(client, exp_ids, step)


def study_run(client: MlflowClient, ref: str) -> Run:
    """The finished tune run of a study, by run id or by study name (the newest, in the current experiment)."""
    if len(ref) == 32 and all(c in "0123456789abcdef" for c in ref):
        run = get_run(client, ref, keys.TUNE)
    else:
        found = step_runs(client, experiment_ids(client), keys.TUNE,
                          filter_string=f"tags.`{keys.STUDY_TAG}` LIKE '{ref}@%'")
        if not found:
            raise RunLookupError(f"no finished tune run of study {ref!r} in this experiment: run "
                                 f"mlflow run . -e tune -P study_name={ref} first, or give the tune run's id")
        run = found[0]
    if run.info.status != FINISHED or keys.BEST_PARAMS not in run.data.tags:
        raise RunLookupError(f"tune run {run.info.run_id} has no best trial yet (status {run.info.status}): "
                             f"let the study finish, or run it again to complete it")
    return run


def get_run(client: MlflowClient, run_id: str, step: str | None = None) -> Run:
    """A run by id, checked to be of `step`; RunLookupError names what is wrong."""
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise RunLookupError(f"run {run_id}: not found in {mlflow.get_tracking_uri()} "
                             f"({e.message.splitlines()[0]})") from None
    if step and run.data.tags.get(keys.STEP) != step:
        raise RunLookupError(f"run {run_id} is not a {step} run (tag step={run.data.tags.get(keys.STEP)!r})")
    return run


def fold_attempts(client: MlflowClient, parent_id: str) -> dict[int, list[Run]]:
    """{k: every fold run of the parent for fold k, newest first}, finished or not."""
    exp = client.get_run(parent_id).info.experiment_id
    out: dict[int, list[Run]] = {}
    for run in search(client, [exp], f"tags.`{keys.PARENT_RUN}` = '{parent_id}'", finished_only=False):
        k = run.data.tags.get(keys.FOLD, "")
        if k.isdigit():
            out.setdefault(int(k), []).append(run)
    return dict(sorted(out.items()))


def newest_finished(attempts: dict[int, list[Run]]) -> dict[int, Run]:
    """{k: the newest FINISHED run among fold k's attempts (newest first)}: the one rule."""
    return {k: done[0] for k, runs in attempts.items() if (done := [r for r in runs if r.info.status == FINISHED])}


def fold_runs(client: MlflowClient, parent_id: str) -> dict[int, Run]:
    """{k: the newest FINISHED fold run for fold k}: what every consumer uses."""
    return newest_finished(fold_attempts(client, parent_id))


def expected_folds(parent: Run, seen: set[int] | None = None, n_folds: int | None = None) -> list[int]:
    """Folds the parent was asked for: its `folds` param when it lists them ("1,3"), else 1..K with
    K the largest fold seen or, if larger, `n_folds` (the report: the most folds of a row of this split)."""
    listed = parse_fold_list(parent.data.params.get(keys.P_FOLDS, ""))
    if listed is not None:
        return listed
    return list(range(1, max(max(seen or (), default=0), n_folds or 0) + 1))


def complete_fold_runs(client: MlflowClient, parent_id: str) -> dict[int, Run]:
    """The parent's fold runs, one finished run for each expected fold, or an error naming the missing."""
    parent = client.get_run(parent_id)
    attempts = fold_attempts(client, parent_id)
    found = newest_finished(attempts)
    expected = expected_folds(parent, set(attempts))
    missing = [k for k in expected if k not in found]
    if missing or not found:
        raise RunLookupError(f"run {parent_id} ({parent.data.tags.get(keys.STEP, '?')}) has no finished fold run for "
                             f"fold(s) {missing or expected or 'any'}; it has {sorted(found) or 'none'}")
    return {k: found[k] for k in (expected or sorted(found))}


def read_csv_artifact(run_id: str, path: str) -> pd.DataFrame | None:
    """A CSV artifact of a run as a DataFrame (ids as text), or None when the run has no such artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
        except (MlflowException, OSError):
            return None
        if not Path(local).is_file():
            return None
        return pd.read_csv(local, dtype={"sample_id": str})


def oof_predictions(folds: dict[int, Run]) -> pd.DataFrame:
    """The fold runs' validation predictions pooled (sample_id, label, prob, fold)."""
    parts = []
    for k, run in sorted(folds.items()):
        df = read_csv_artifact(run.info.run_id, keys.VAL_PREDICTIONS)
        if df is None:
            raise RunLookupError(f"fold {k} run {run.info.run_id[:8]} has no {keys.VAL_PREDICTIONS}")
        missing = {"sample_id", "label", "prob"} - set(df.columns)
        if missing:
            raise RunLookupError(f"fold {k} run {run.info.run_id[:8]}: {keys.VAL_PREDICTIONS} lacks {sorted(missing)}")
        parts.append(df.assign(fold=k))
    if not parts:
        raise RunLookupError("no fold runs")
    return pd.concat(parts, ignore_index=True)


def fold_model(client: MlflowClient, run: Run) -> LoggedModel | None:
    """The fold run's checkpoint as a LoggedModel (pipelines/fold_model.py): the newest READY one among
    the run's model outputs, or None for a fold run of older code (its `checkpoint/` artifact)."""
    outputs = run.outputs.model_outputs if run.outputs else []
    models = [client.get_logged_model(o.model_id) for o in outputs]
    ready = [m for m in models if m.status == LoggedModelStatus.READY and m.model_type == keys.FOLD_MODEL_TYPE]
    return max(ready, key=lambda m: m.creation_timestamp, default=None)


def fold_model_ids(folds: dict[int, Run]) -> dict[int, str | None]:
    """{k: the LoggedModel id of fold k's checkpoint}, None for a fold run of older code."""
    client = MlflowClient()
    return {k: (m.model_id if (m := fold_model(client, run)) else None) for k, run in sorted(folds.items())}


def download_checkpoints(folds: dict[int, Run], dst: str | Path) -> dict[int, str]:
    """{k: local checkpoint folder} of the fold runs (the LoggedModel's files, else the `checkpoint/`
    artifact of older runs), each checked for its config.json."""
    client, out = MlflowClient(), {}
    for k, run in sorted(folds.items()):
        model = fold_model(client, run)
        where = f"model {model.model_id}" if model else f"{keys.CHECKPOINT_DIR}/ artifact"
        folder = Path(dst) / f"fold{k}"
        try:
            if model is not None:
                local = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=str(folder))
            else:
                local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=keys.CHECKPOINT_DIR,
                                                            dst_path=str(folder))
        except (MlflowException, OSError):
            local = ""
        if not local or not (Path(local) / "config.json").is_file():
            raise RunLookupError(f"fold {k} run {run.info.run_id[:8]} has no checkpoint: no config.json in its {where}")
        out[k] = local
    return out


def load_ensemble(train_run_id: str, device: str = "cpu", dst: str | Path | None = None,
                  fold_thresholds: dict[int, float] | None = None):
    """The fold ensemble (models.ensemble.FoldEnsemble) of a train_cv run's complete fold set;
    `fold_thresholds` (fold k -> t_k, evaluate's fold_ba) must name exactly those folds."""
    from models.ensemble import FoldEnsemble

    client = MlflowClient()
    get_run(client, train_run_id, keys.TRAIN_CV)
    dirs = download_checkpoints(complete_fold_runs(client, train_run_id), dst or tempfile.mkdtemp(prefix="ensemble-"))
    if fold_thresholds is not None and set(fold_thresholds) != set(dirs):
        raise RunLookupError(f"run {train_run_id}: fold thresholds for folds {sorted(fold_thresholds)} but its "
                             f"ensemble has folds {sorted(dirs)}; evaluate it again")
    return FoldEnsemble.from_dirs([dirs[k] for k in sorted(dirs)], device,
                                  None if fold_thresholds is None else [fold_thresholds[k] for k in sorted(dirs)])


def numeric(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def run_threshold(run: Run) -> float | None:
    """The decision threshold an evaluate run used (param, else the metric of that name), if numeric."""
    for value in (run.data.params.get(keys.P_THRESHOLD), run.data.metrics.get(keys.P_THRESHOLD)):
        if numeric(value) is not None:
            return numeric(value)
    return None


def run_fold_thresholds(run: Run) -> dict[int, float] | None:
    """fold_ba: {k: fold model k's threshold} an evaluate run used (metrics fold<k>_threshold), else None."""
    return keys.fold_values(run.data.metrics, keys.FOLD_THRESHOLD) or None


def latest_evaluate_run(train_run_id: str, threshold: str | None = None) -> Run | None:
    """The newest finished evaluate run of a train_cv run (its threshold rule is the model's), if any;
    `threshold`: only runs with that rule (e.g. fold_ba, whose fold thresholds an ensemble needs)."""
    client = MlflowClient()
    exp = client.get_run(train_run_id).info.experiment_id
    query = f"params.{keys.P_TRAIN_RUN_ID} = '{train_run_id}'"
    if threshold:
        query += f" and params.{keys.P_THRESHOLD} = '{threshold}'"
    return latest_run(client, [exp], keys.EVALUATE, query)


def is_fold_run(run: Run) -> bool:
    """A nested fold run (tag `fold`), not a parent."""
    return keys.FOLD in run.data.tags
