"""Find the runs the report is built from, by their tags and params (DESIGN.md, "MLflow runs").

A *row* of the paper's tables is one (backbone, regime): by default the latest finished
`train_cv` parent run of that pair, with its fold runs and, per test set, its latest
finished `evaluate` run. Everything a row lacks is reported as a plain sentence (a
`problems` list) so that the report can build what it can and say what it skipped;
`strict=True` turns those sentences into one `ReportDataError` instead.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from analysis import keys

FINISHED = "FINISHED"
BACKBONE_ORDER = ("convnext", "lunit")


class ReportDataError(LookupError):
    """The runs lack what was asked for: no finished run for a row, a missing fold, ..."""


@dataclass
class TrainRow:
    """One row of Tables 1 and 2: a finished train_cv parent run and its fold runs."""
    backbone: str
    regime: str
    run: Run
    fold_runs: dict[int, Run] = field(default_factory=dict)
    seen_folds: set[int] = field(default_factory=set)  # folds with a metric or any fold run

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def key(self) -> tuple[str, str]:
        return self.backbone, self.regime

    @property
    def name(self) -> str:
        return f"{self.backbone}/{self.regime} (train_cv run {self.run_id[:8]})"

    def fold_metric(self, name: str) -> dict[int, float]:
        """{k: value} of the parent's fold{k}_<name> metrics, e.g. fold_metric("auroc")."""
        found = {}
        for metric, value in self.run.data.metrics.items():
            m = re.fullmatch(rf"fold(\d+)_{re.escape(name)}", metric)
            if m:
                found[int(m.group(1))] = float(value)
        return dict(sorted(found.items()))


@dataclass
class EvalRun:
    """A finished evaluate run of one train_cv run on one test set."""
    run: Run
    test_set: str

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def metric(self, name: str, domain: str | None = None) -> float | None:
        value = self.run.data.metrics.get(keys.test_metric(name, domain))
        return None if value is None else float(value)

    @property
    def threshold(self) -> float | None:
        """The decision threshold the run used (param, else a metric of that name), if numeric."""
        for value in (self.run.data.params.get(keys.P_THRESHOLD), self.run.data.metrics.get(keys.P_THRESHOLD)):
            try:
                return float(value)
            except (TypeError, ValueError):
                continue
        return None


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
        raise ReportDataError(f"no experiment {experiment!r} in {mlflow.get_tracking_uri()}; experiments: {names}")
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


def step_runs(client: MlflowClient, exp_ids: list[str], step: str, finished_only: bool = True) -> list[Run]:
    return search(client, exp_ids, f"tags.{keys.STEP} = '{step}'", finished_only)


def child_runs(client: MlflowClient, exp_ids: list[str], parent_id: str, finished_only: bool = False) -> list[Run]:
    return search(client, exp_ids, f"tags.`{keys.PARENT_RUN}` = '{parent_id}'", finished_only)


def _is_train_parent(run: Run) -> bool:
    return keys.FOLD not in run.data.tags


def _row_key(run: Run) -> tuple[str, str]:
    p, t = run.data.params, run.data.tags
    return p.get(keys.P_BACKBONE) or t.get(keys.BACKBONE, "?"), p.get(keys.P_REGIME) or t.get(keys.REGIME, "?")


def row_order(key: tuple[str, str]) -> tuple:
    """The paper's order: ConvNeXt then Lunit (others after, by name); real before synthetic."""
    backbone, regime = key
    b = BACKBONE_ORDER.index(backbone) if backbone in BACKBONE_ORDER else len(BACKBONE_ORDER)
    r = keys.REGIMES.index(regime) if regime in keys.REGIMES else len(keys.REGIMES)
    return b, backbone, r, regime


def _expected_folds(run: Run, seen: set[int]) -> list[int]:
    """Folds the run was asked for: an explicit `folds` param ("1,3"), else 1..max fold seen."""
    spec = run.data.params.get(keys.P_FOLDS, "") or ""
    if re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", spec):
        return sorted(int(s) for s in spec.split(","))
    return list(range(1, max(seen) + 1)) if seen else []


def load_row(client: MlflowClient, exp_ids: list[str], run: Run) -> TrainRow:
    """A TrainRow for a train_cv parent run, with the newest finished child run per fold."""
    backbone, regime = _row_key(run)
    row = TrainRow(backbone, regime, run)
    row.seen_folds = set(row.fold_metric("auroc"))
    for child in child_runs(client, exp_ids, run.info.run_id):  # newest first
        k = child.data.tags.get(keys.FOLD, "")
        if k.isdigit():
            row.seen_folds.add(int(k))
            if child.info.status == FINISHED and int(k) not in row.fold_runs:
                row.fold_runs[int(k)] = child
    return row


def expected_folds(row: TrainRow, n_folds: int | None = None) -> list[int]:
    """The folds a row should have: its `folds` param when it lists them, else 1..K, with K
    the largest fold seen in this row or (`n_folds`) in the other rows of the report."""
    expected = _expected_folds(row.run, row.seen_folds)
    if n_folds and not re.fullmatch(r"[\d,\s]+", row.run.data.params.get(keys.P_FOLDS, "") or "all"):
        expected = sorted(set(expected) | set(range(1, n_folds + 1)))
    return expected


def missing_folds(row: TrainRow, n_folds: int | None = None) -> list[str]:
    """Sentences naming each fold without its fold{k}_auroc metric (Table 1 needs them all)."""
    expected = expected_folds(row, n_folds)
    if not expected:
        return [f"{row.name}: no fold results at all (no fold{{k}}_auroc metric, no fold run)"]
    aurocs = row.fold_metric("auroc")
    return [f"{row.name}: fold {k} is missing (no metric {keys.fold_metric(k, 'auroc')}"
            + ("" if k in row.fold_runs else ", no finished fold run") + ")"
            for k in expected if k not in aurocs]


def missing_fold_runs(row: TrainRow) -> list[int]:
    """Folds of the row without a finished fold run (the ensemble and the OOF statistics need them)."""
    return [k for k in expected_folds(row) if k not in row.fold_runs]


def train_rows(client: MlflowClient, exp_ids: list[str], run_ids: list[str] | None = None,
               strict: bool = False) -> tuple[list[TrainRow], list[str]]:
    """Complete rows, in the paper's order, and the problems of the rows left out.

    Without `run_ids`: the latest finished train_cv parent run per (backbone, regime).
    """
    problems: list[str] = []
    if run_ids:
        chosen = []
        for rid in run_ids:
            try:
                run = client.get_run(rid)
            except MlflowException as e:
                problems.append(f"train_cv run {rid}: not found ({e.message.splitlines()[0]})")
                continue
            if run.data.tags.get(keys.STEP) != keys.TRAIN_CV or not _is_train_parent(run):
                problems.append(f"run {rid}: not a train_cv parent run (tag step={run.data.tags.get(keys.STEP)!r})")
            elif run.info.status != FINISHED:
                problems.append(f"train_cv run {rid}: status {run.info.status}, not FINISHED")
            else:
                chosen.append(run)
    else:
        tune_ids = {r.info.run_id for r in step_runs(client, exp_ids, keys.TUNE, finished_only=False)}
        all_runs = [r for r in step_runs(client, exp_ids, keys.TRAIN_CV, finished_only=False)
                    if _is_train_parent(r) and r.data.tags.get(keys.PARENT_RUN) not in tune_ids]
        by_key: dict[tuple[str, str], list[Run]] = {}
        for run in all_runs:
            by_key.setdefault(_row_key(run), []).append(run)
        chosen = []
        for key, runs in by_key.items():
            finished = [r for r in runs if r.info.status == FINISHED]
            if finished:
                chosen.append(finished[0])
            else:
                states = ", ".join(sorted(r.info.status for r in runs))
                problems.append(f"{key[0]}/{key[1]}: no finished train_cv run (found {len(runs)}: {states})")
        if not all_runs:
            problems.append(f"no train_cv runs in experiment(s) {exp_ids}")
    loaded = [load_row(client, exp_ids, run) for run in chosen]
    n_folds = max((max(r.seen_folds, default=0) for r in loaded), default=0)
    rows = []
    for row in loaded:
        row_problems = missing_folds(row, n_folds)
        problems.extend(row_problems)
        if not row_problems:
            rows.append(row)
    if strict and problems:
        raise ReportDataError("; ".join(problems))
    return sorted(rows, key=lambda r: row_order(r.key)), problems


def eval_runs(client: MlflowClient, exp_ids: list[str], rows: list[TrainRow]) -> dict[str, dict[str, EvalRun]]:
    """{test_set: {train_run_id: latest finished evaluate run}} for the given rows."""
    wanted = {r.run_id for r in rows}
    found: dict[str, dict[str, EvalRun]] = {}
    for run in step_runs(client, exp_ids, keys.EVALUATE):  # newest first
        train_id = run.data.params.get(keys.P_TRAIN_RUN_ID)
        if train_id not in wanted:
            continue
        test_set = run.data.tags.get(keys.TEST_SET) or run.data.params.get(keys.P_TEST_DIGEST, "?")[:12] or "?"
        found.setdefault(test_set, {}).setdefault(train_id, EvalRun(run, test_set))
    return dict(sorted(found.items()))


def read_csv_artifact(run_id: str, path: str) -> pd.DataFrame | None:
    """A CSV artifact of a run as a DataFrame, or None when the run has no such artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
        except (MlflowException, OSError):
            return None
        if not Path(local).is_file():
            return None
        return pd.read_csv(local)


def out_of_fold_predictions(row: TrainRow) -> tuple[pd.DataFrame | None, str | None]:
    """The row's validation predictions of all folds (sample_id, label, prob, fold), or why not."""
    lacking = missing_fold_runs(row)
    if lacking:
        return None, f"no finished fold run for fold(s) {lacking}"
    parts = []
    for k, child in sorted(row.fold_runs.items()):
        df = read_csv_artifact(child.info.run_id, keys.VAL_PREDICTIONS)
        if df is None:
            return None, f"fold {k} run {child.info.run_id[:8]} has no {keys.VAL_PREDICTIONS}"
        missing = {"sample_id", "label", "prob"} - set(df.columns)
        if missing:
            return None, f"fold {k} run {child.info.run_id[:8]}: {keys.VAL_PREDICTIONS} lacks columns {sorted(missing)}"
        parts.append(df.assign(fold=k))
    if not parts:
        return None, "no fold runs"
    return pd.concat(parts, ignore_index=True), None
