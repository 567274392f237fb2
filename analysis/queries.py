"""The report's rows, built from the runs that `analysis.runs` finds (docs/DESIGN.md, "MLflow runs").

A *row* of the paper's tables is one (backbone, recipe, regime), the recipe being how the
backbone was trained beyond the paper's choice (weights, fine-tuning mode, loss, sampler,
augmentation): by default the latest finished `train_cv` parent run of each, with its fold
runs and, per test set, its latest finished `evaluate` run. Everything a row lacks is reported as a plain sentence (a
`problems` list) so that the report can build what it can and say what it skipped;
`strict=True` turns those sentences into one `ReportDataError` instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from analysis import keys, runs
from analysis.runs import FINISHED

BACKBONE_ORDER = ("convnext", "lunit")
# what a row's recipe is made of, with the value a run that predates the parameter had
RECIPE_DEFAULTS = {keys.P_BACKBONE_SET: "paper", keys.P_PRETRAINED: "hub", keys.P_FINETUNE: "full",
                   keys.P_LORA_RANK: "8", keys.P_LOSS: "bce", keys.P_SAMPLER: "shuffle", keys.P_AUGMENT: "paper",
                   keys.P_STAIN_NORM: "none"}
Recipe = tuple[tuple[str, str], ...]


def recipe(run: Run) -> Recipe:
    """How a train_cv run trained its backbone ((param, value) pairs; LoRA's rank only for LoRA)."""
    params = run.data.params
    found = {k: params.get(k) or d for k, d in RECIPE_DEFAULTS.items()}
    if found[keys.P_FINETUNE] != "lora":
        found[keys.P_LORA_RANK] = ""
    return tuple(found.items())


class ReportDataError(runs.RunLookupError):
    """The runs lack what the report asks for: no finished run for a row, a missing fold, ..."""


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
    def recipe(self) -> Recipe:
        return recipe(self.run)

    @property
    def group(self) -> tuple[str, Recipe]:
        """Rows of one group differ only in their regime (the comparison pairs them)."""
        return self.backbone, self.recipe

    @property
    def key(self) -> tuple[str, Recipe, str]:
        return self.backbone, self.recipe, self.regime

    @property
    def split(self) -> str:
        """group (slide-grouped CV) or lodo (leave one domain out), from the parent's params."""
        return self.run.data.params.get(keys.P_SPLIT) or "group"

    @property
    def fold_domains(self) -> dict[int, str]:
        """lodo: {k: the domain fold k holds out}; {} otherwise."""
        return keys.fold_values(self.run.data.params, keys.FOLD_DOMAIN)

    @property
    def name(self) -> str:
        lodo = " leave-one-domain-out" if self.split == keys.LODO else ""
        return f"{self.backbone}/{self.regime}{lodo} (train_cv run {self.run_id[:8]})"

    def fold_metric(self, name: str) -> dict[int, float]:
        """{k: value} of the parent's fold{k}_<name> metrics, e.g. fold_metric("auroc")."""
        return {k: float(v) for k, v in keys.fold_values(self.run.data.metrics, name).items()}


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
        """The decision threshold the run used, if numeric."""
        return runs.run_threshold(self.run)


def _row_key(run: Run) -> tuple[str, str]:
    p, t = run.data.params, run.data.tags
    return p.get(keys.P_BACKBONE) or t.get(keys.BACKBONE, "?"), p.get(keys.P_REGIME) or t.get(keys.REGIME, "?")


def row_order(key: tuple[str, Recipe, str]) -> tuple:
    """The paper's order: ConvNeXt then Lunit (others after, by name), the paper's recipe first
    within a backbone, real before synthetic."""
    backbone, rec, regime = key
    b = BACKBONE_ORDER.index(backbone) if backbone in BACKBONE_ORDER else len(BACKBONE_ORDER)
    r = keys.REGIMES.index(regime) if regime in keys.REGIMES else len(keys.REGIMES)
    paper = dict(rec).get(keys.P_FINETUNE) == "full" and dict(rec).get(keys.P_LOSS) == "bce"
    return b, backbone, not paper, rec, r, regime


def load_row(client: MlflowClient, run: Run) -> TrainRow:
    """A TrainRow for a train_cv parent run, with its fold runs (runs.fold_runs: the newest finished per fold)."""
    backbone, regime = _row_key(run)
    attempts = runs.fold_attempts(client, run.info.run_id)
    row = TrainRow(backbone, regime, run, fold_runs=runs.newest_finished(attempts))
    row.seen_folds = set(row.fold_metric("auroc")) | set(attempts)
    return row


def missing_folds(row: TrainRow, n_folds: int | None = None) -> list[str]:
    """Sentences naming each fold without its fold{k}_auroc metric (Table 1 needs them all)."""
    expected = runs.expected_folds(row.run, row.seen_folds, n_folds)
    if not expected:
        return [f"{row.name}: no fold results at all (no fold{{k}}_auroc metric, no fold run)"]
    aurocs = row.fold_metric("auroc")
    return [f"{row.name}: fold {k} is missing (no metric {keys.fold_metric(k, 'auroc')}"
            + ("" if k in row.fold_runs else ", no finished fold run") + ")"
            for k in expected if k not in aurocs]


def missing_fold_runs(row: TrainRow) -> list[int]:
    """Folds of the row without a finished fold run (the ensemble and the OOF statistics need them)."""
    return [k for k in runs.expected_folds(row.run, row.seen_folds) if k not in row.fold_runs]


def _named_parents(client: MlflowClient, run_ids: list[str], problems: list[str]) -> list[Run]:
    """The finished train_cv parent runs among `run_ids`; a sentence in `problems` for each other id."""
    chosen = []
    for rid in run_ids:
        try:
            run = runs.get_run(client, rid)
        except runs.RunLookupError as e:
            problems.append(f"train_cv {e}")
            continue
        if run.data.tags.get(keys.STEP) != keys.TRAIN_CV or runs.is_fold_run(run):
            problems.append(f"run {rid}: not a train_cv parent run (tag step={run.data.tags.get(keys.STEP)!r})")
        elif run.info.status != FINISHED:
            problems.append(f"train_cv run {rid}: status {run.info.status}, not FINISHED")
        else:
            chosen.append(run)
    return chosen


def _latest_parents(client: MlflowClient, exp_ids: list[str], problems: list[str]) -> list[Run]:
    """The latest finished train_cv parent run per (backbone, recipe, regime), tune's trials aside."""
    tune_ids = {r.info.run_id for r in runs.step_runs(client, exp_ids, keys.TUNE, finished_only=False)}
    all_runs = [r for r in runs.step_runs(client, exp_ids, keys.TRAIN_CV, finished_only=False)
                if not runs.is_fold_run(r) and r.data.tags.get(keys.PARENT_RUN) not in tune_ids]
    if not all_runs:
        problems.append(f"no train_cv runs in experiment(s) {exp_ids}")
    by_key: dict[tuple, list[Run]] = {}
    for run in all_runs:  # newest first; a row per backbone, regime, split and recipe
        by_key.setdefault((*_row_key(run), run.data.params.get(keys.P_SPLIT) or "group", recipe(run)), []).append(run)
    chosen = []
    for key, candidates in by_key.items():
        finished = [r for r in candidates if r.info.status == FINISHED]
        if finished:
            chosen.append(finished[0])
        else:
            states = ", ".join(sorted(r.info.status for r in candidates))
            lodo = " (leave-one-domain-out)" if key[2] == keys.LODO else ""
            problems.append(f"{key[0]}/{key[1]}{lodo}: no finished train_cv run (found {len(candidates)}: {states})")
    return chosen


def train_rows(client: MlflowClient, exp_ids: list[str], run_ids: list[str] | None = None,
               strict: bool = False) -> tuple[list[TrainRow], list[str]]:
    """Complete rows, in the paper's order, and the problems of the rows left out.

    Without `run_ids`: the latest finished train_cv parent run per (backbone, recipe, regime).
    """
    problems: list[str] = []
    chosen = _named_parents(client, run_ids, problems) if run_ids else _latest_parents(client, exp_ids, problems)
    loaded = [load_row(client, run) for run in chosen]
    n_folds = {split: max((max(r.seen_folds, default=0) for r in loaded if r.split == split), default=0)
               for split in {r.split for r in loaded}}  # rows of one split should have the same folds
    rows = []
    for row in loaded:
        row_problems = missing_folds(row, n_folds[row.split])
        problems.extend(row_problems)
        if not row_problems:
            rows.append(row)
    if strict and problems:
        raise ReportDataError("; ".join(problems))
    return sorted(rows, key=lambda r: (r.split == keys.LODO, row_order(r.key))), problems


def eval_runs(client: MlflowClient, exp_ids: list[str], rows: list[TrainRow]) -> dict[str, dict[str, EvalRun]]:
    """{test_set: {train_run_id: latest finished evaluate run}} for the given rows."""
    wanted = {r.run_id for r in rows}
    found: dict[str, dict[str, EvalRun]] = {}
    for run in runs.step_runs(client, exp_ids, keys.EVALUATE):  # newest first
        train_id = run.data.params.get(keys.P_TRAIN_RUN_ID)
        if train_id not in wanted:
            continue
        test_set = run.data.tags.get(keys.TEST_SET) or run.data.params.get(keys.P_TEST_DIGEST, "?")[:12] or "?"
        found.setdefault(test_set, {}).setdefault(train_id, EvalRun(run, test_set))
    return dict(sorted(found.items()))


def oof_or_reason(row: TrainRow) -> tuple[pd.DataFrame | None, str | None]:
    """runs.oof_predictions of the row's fold runs, or (None, why not), so that the report
    (curves, analysis.stats.compare_regimes) can skip a row and say why."""
    lacking = missing_fold_runs(row)
    if lacking:
        return None, f"no finished fold run for fold(s) {lacking}"
    try:
        return runs.oof_predictions(row.fold_runs), None
    except runs.RunLookupError as e:
        return None, str(e)
