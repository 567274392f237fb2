"""The submission: pick a row by a criterion, log its fold ensemble as an MLflow pyfunc model,
register it and give it the `submission` alias (`analysis/serving.py` loads and runs it).

The pyfunc model is logged from code (`analysis/pyfunc_model.py`: loading it runs that file and
unpickles nothing) with an input example and a signature; it carries the fold checkpoints
(model.safetensors + config.json each) as artifacts and this project's library code, so
`mlflow models serve` and the container need nothing else, and it declares as requirements only
what loading and predicting import (`serving_requirements`), not the training stack. The
threshold rule is the one the selected row's evaluate run used: the threshold and, for
`fold_ba`, each fold model's own threshold (model_config `fold_thresholds`), and so is its TTA
(the `tta` param's default), so the model decides offline as evaluate did.

The registered version says what it is: a description and tags (the rule and value that chose
it, the row and its fold models, CV and test figures, store digests, threshold rule, TTA); and
`register_submission` registers a new version only when the selection (members, threshold rule,
TTA) differs from the version the alias points at.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import LoggedModelInput
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from analysis import keys, runs
from analysis.queries import EvalRun, TrainRow, missing_fold_runs
from analysis.serving import (CLASS_COLUMN, DEFAULT_THRESHOLD, IMAGE_COLUMN, PATH_COLUMN, PROB_COLUMN,
                              ensemble_from_artifacts)
from analysis.tables import label
from data_tools.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
CRITERIA = ("test_auroc", "cv_auroc", "test_ba")

# What loading and predicting the model imports: analysis/pyfunc_model.py and the project modules it
# reaches (tests/test_report.py walks their imports against this list), as distributions; pinned to
# the versions installed here, the ones that logged and checked the model. timm brings torchvision,
# tifffile its codecs (compressed TIFF crops); mlflow-skinny is MLflow without its server and UI.
SERVING_DISTRIBUTIONS = ("mlflow-skinny", "torch", "torchvision", "timm", "safetensors", "numpy", "pandas", "pillow",
                         "tifffile[codecs]", "tqdm")
ADAPTER_DISTRIBUTIONS = ("peft",)  # members that trained adapters (finetune lora/linear) rebuild them with peft


def signature(tta: str = "none") -> ModelSignature:
    """Crops in, scores and classes out; params `tta` (default: the selection's) and `batch_size`."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN, required=False),
                       ColSpec("string", PATH_COLUMN, required=False)]),
        outputs=Schema([ColSpec("double", PROB_COLUMN), ColSpec("string", CLASS_COLUMN)]),
        params=ParamSchema([ParamSpec("tta", "string", tta), ParamSpec("batch_size", "long", 64)]))


class SelectionError(UserError, LookupError):
    """No row has what the criterion needs."""


@dataclass
class Selection:
    row: TrainRow
    criterion: str
    value: float
    eval_run: EvalRun | None  # the evaluate run behind a test criterion (and the threshold)
    n_candidates: int = 1  # rows that had the criterion and every fold run

    @property
    def threshold(self) -> float:
        t = self.eval_run.threshold if self.eval_run is not None else None
        return DEFAULT_THRESHOLD if t is None else t

    @property
    def fold_thresholds(self) -> dict[int, float] | None:
        """fold_ba: {k: fold model k's threshold} of the evaluate run, else None."""
        return runs.run_fold_thresholds(self.eval_run.run) if self.eval_run is not None else None

    @property
    def tta(self) -> str:
        """The evaluate run's test-time augmentation (its threshold was chosen under it), else none."""
        return self.eval_run.run.data.params.get(keys.P_TTA, "none") if self.eval_run is not None else "none"

    @property
    def threshold_rule(self) -> str:
        """The evaluate run's threshold param (0.5, a number, cv_ba, fold_ba), or the default's word."""
        rule = self.eval_run.run.data.params.get(keys.P_THRESHOLD) if self.eval_run is not None else None
        return rule or f"{DEFAULT_THRESHOLD:g} (default: no evaluate run)"

    def rule_text(self) -> str:
        """The threshold rule in words, as the report and the registered version say it."""
        per_fold = self.fold_thresholds
        if per_fold:
            return (f"each fold model at its own out-of-fold threshold "
                    f"({', '.join(f'{t:.3f}' for _, t in sorted(per_fold.items()))}), their mean shifted logit at "
                    f"{self.threshold:g}")
        return f"threshold {self.threshold:g}"


def criterion_value(row: TrainRow, criterion: str, evals: dict[str, EvalRun]) -> float | None:
    if criterion == "cv_auroc":
        folds = row.fold_metric("auroc")
        return float(np.mean(list(folds.values()))) if folds else None
    ev = evals.get(row.run_id)
    return None if ev is None else ev.metric(criterion.removeprefix(keys.TEST_PREFIX))


def select_row(rows: list[TrainRow], evals: dict[str, EvalRun], criterion: str = "test_auroc") -> Selection:
    """The row with the highest value of the criterion (ties: the first in table order).

    `evals` maps train_run_id -> evaluate run on the test set the criterion refers to.
    Rows without a finished fold run per fold cannot be ensembled and are not candidates.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"select_by must be one of {CRITERIA}, got {criterion!r}")
    scored = []
    for row in rows:
        value = criterion_value(row, criterion, evals)
        if value is not None and not missing_fold_runs(row):
            scored.append((value, row))
    if not scored:
        raise SelectionError(f"no row has {criterion} and a finished run for every fold")
    value, row = max(scored, key=lambda vr: vr[0])  # max keeps the first of equal values
    return Selection(row, criterion, value, evals.get(row.run_id), n_candidates=len(scored))


def serving_requirements(adapters: bool) -> list[str]:
    """The model's pip requirements: what serving imports (SERVING_DISTRIBUTIONS, and peft for adapter
    members), each at the version installed here; MLflow need not infer them by loading the model."""
    names = SERVING_DISTRIBUTIONS + (ADAPTER_DISTRIBUTIONS if adapters else ())
    return [f"{name}=={metadata.version(name.split('[')[0])}" for name in names]


def has_adapters(dirs: dict) -> bool:
    """Whether any member checkpoint trained adapters rather than every weight (its config.json's finetune mode)."""
    modes = [json.loads((Path(d) / "config.json").read_text()).get("finetune", {}).get("mode", "full")
             for d in dirs.values()]
    return any(mode != "full" for mode in modes)


def selection_tag(members: dict[int, str], threshold: float, fold_thresholds: dict[int, float] | None,
                  tta: str) -> str:
    """What makes two registered versions the same model (JSON): its fold models, threshold rule and TTA."""
    per_fold = None if fold_thresholds is None else {keys.fold_model(k): float(t)
                                                      for k, t in sorted(fold_thresholds.items())}
    return json.dumps({"members": {keys.fold_model(k): m for k, m in sorted(members.items())},
                       "threshold": float(threshold), "fold_thresholds": per_fold, "tta": tta}, sort_keys=True)


def input_example() -> pd.DataFrame:
    """One mid-grey 128x128 crop as the REST input shows it (a base64 PNG in column `image`)."""
    from data_tools.images import CROP_SIZE, encode_png_base64
    return pd.DataFrame({IMAGE_COLUMN: [encode_png_base64(np.full((CROP_SIZE, CROP_SIZE, 3), 128, np.uint8))]})


def log_ensemble_model(row: TrainRow, threshold: float, *, fold_thresholds: dict[int, float] | None = None,
                       tta: str = "none", registered_name: str = keys.MODEL_NAME,
                       alias: str | None = keys.SUBMISSION_ALIAS, extra_config: dict | None = None,
                       description: str = "", tags: dict[str, str] | None = None,
                       check_load: bool = True) -> ModelVersion:
    """Log the row's fold ensemble as a pyfunc model in the active run, register it, set the alias.

    `fold_thresholds` ({k: t_k}, evaluate's fold_ba) travel in the model_config and must name
    the row's folds; `tta` is the default of the model's `tta` param. `check_load` builds the
    ensemble once before logging, so a checkpoint that does not load fails here, in the report,
    rather than on the platform. The version gets `description`, `tags`, the model_config's keys,
    its members and the selection tag; the run takes the members' LoggedModels as its inputs.
    """
    # "device" is listed so that loaders may override it (MLflow only overrides logged keys)
    config = {"threshold": float(threshold), "device": "auto", "train_run_id": row.run_id, "backbone": row.backbone,
              "regime": row.regime, "tta": tta, **(extra_config or {})}
    if fold_thresholds is not None:
        if set(fold_thresholds) != set(row.fold_runs):
            raise SelectionError(f"{row.name}: fold thresholds for folds {sorted(fold_thresholds)}, but its fold runs "
                                 f"are {sorted(row.fold_runs)}; evaluate it again")
        config["fold_thresholds"] = {keys.fold_model(k): float(t) for k, t in sorted(fold_thresholds.items())}
    lacking = missing_fold_runs(row)
    if lacking:
        raise SelectionError(f"{row.name}: no finished fold run for fold(s) {lacking}")
    model_ids, members = _members(row)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow's own handling of the input example trips a pandas deprecation inside mlflow.models.utils:
        # harmless for this DataFrame, and nothing a user of the report can act on
        warnings.filterwarnings("ignore", message="Operation with range is deprecated")
        try:  # each fold's checkpoint folder, checked for its config.json
            dirs = runs.download_checkpoints(row.fold_runs, tmp)
        except runs.RunLookupError as e:
            raise SelectionError(f"{row.name}: {e}") from None
        fold_runs = {keys.fold_model(k): r.info.run_id for k, r in sorted(row.fold_runs.items())}
        return _log_pyfunc({keys.fold_model(k): path for k, path in dirs.items()},
                           {keys.fold_model(k): m for k, m in model_ids.items()}, fold_runs,
                           {keys.fold_model(k): m for k, m in members.items()}, config,
                           selection_tag(members, threshold, fold_thresholds, tta), tta=tta,
                           registered_name=registered_name, alias=alias, description=description, tags=tags,
                           check_load=check_load, metadata={"train_run_id": row.run_id, "threshold": float(threshold)})


def _log_pyfunc(artifacts: dict[str, str], model_ids: dict[str, str | None], member_runs: dict[str, str],
                members: dict[str, str], config: dict, selection: str, *, tta: str, registered_name: str,
                alias: str | None, description: str, tags: dict[str, str] | None, check_load: bool,
                metadata: dict) -> ModelVersion:
    """Log checkpoint folders ({artifact name: folder}) as the pyfunc model with `config`, register it,
    tag the LoggedModel and the version (`members`, `member_runs`, the selection tag), set the alias."""
    if check_load:
        ensemble_from_artifacts(artifacts, config.get("fold_thresholds"), "cpu", config.get("member_weights"))
    info = mlflow.pyfunc.log_model(
        name=keys.SUBMISSION_ARTIFACT, python_model=str(ROOT / "analysis" / "pyfunc_model.py"),
        artifacts=artifacts, model_config=config, input_example=input_example(),
        code_paths=[str(ROOT / pkg) for pkg in ("analysis", "models", "data_tools")],
        signature=signature(tta), pip_requirements=serving_requirements(has_adapters(artifacts)),
        registered_model_name=registered_name, metadata=metadata)
    linked = {keys.V_MEMBERS: json.dumps(members), keys.V_MEMBER_RUNS: json.dumps(member_runs),
              keys.V_SELECTION: selection}
    mlflow.set_logged_model_tags(info.model_id, linked)
    client = MlflowClient()
    if any(model_ids.values()):  # the report run used the fold models: the UI lists them beside the submission
        client.log_inputs(info.run_id, models=[LoggedModelInput(m) for m in model_ids.values() if m])
    version = client.get_model_version(registered_name, str(info.registered_model_version))
    version_tags = {**{key: json.dumps(value) if isinstance(value, dict) else str(value)
                       for key, value in config.items()}, **linked, **(tags or {})}
    for key, value in version_tags.items():
        client.set_model_version_tag(registered_name, version.version, key, value)
    if description:
        client.update_model_version(registered_name, version.version, description=description)
    if alias:
        client.set_registered_model_alias(registered_name, alias, version.version)
    return client.get_model_version(registered_name, version.version)


def _members(row: TrainRow) -> tuple[dict[int, str | None], dict[int, str]]:
    """({k: fold k's LoggedModel id or None}, {k: that id, or the fold run id for runs of older code})."""
    model_ids = runs.fold_model_ids(row.fold_runs)
    return model_ids, {k: model_ids[k] or run.info.run_id for k, run in sorted(row.fold_runs.items())}


def _fmt(value: float | None, pct: bool = False) -> str:
    return "—" if value is None else f"{value * 100:.2f}%" if pct else f"{value:.4f}"


def version_record(selection: Selection, members: dict[int, str], evaluated_on: str = "") -> tuple[str, dict[str, str]]:
    """The registered version's description (Markdown) and tags: how it was chosen (rule, value, among
    how many rows), what it is (row, members), its CV and test figures, store digests, threshold rule, TTA."""
    row, ev = selection.row, selection.eval_run
    metrics, params = row.run.data.metrics, row.run.data.params
    cv = {name: metrics.get(name) for name in keys.CV_SUMMARY}
    test = {keys.test_metric(m): ev.metric(m) for m in keys.TEST_METRICS} if ev is not None else {}
    train_digest = params.get(keys.P_DATA_DIGEST) or row.run.data.tags.get(keys.DATASET_DIGEST, "")
    synthetic = {keys.fold_model(k): d for k, r in sorted(row.fold_runs.items())
                 if (d := r.data.tags.get(keys.SYNTHETIC_DIGEST))}
    test_digest = ev.run.data.params.get(keys.P_TEST_DIGEST, "") if ev is not None else ""
    tags = {keys.V_ROW: label(row), keys.V_ROWS_COMPARED: str(selection.n_candidates),
            keys.V_SELECTED_VALUE: str(selection.value), keys.V_THRESHOLD_RULE: selection.threshold_rule,
            keys.P_DATA_DIGEST: train_digest,
            **{name: str(v) for name, v in {**cv, **test}.items() if v is not None}}
    if synthetic:
        tags[keys.V_SYNTHETIC_DIGESTS] = json.dumps(synthetic)
    if ev is not None:
        tags.update({keys.V_EVALUATE_RUN: ev.run_id, keys.TEST_SET: ev.test_set, keys.P_TEST_DIGEST: test_digest})
    fold_runs = {k: r.info.run_id for k, r in row.fold_runs.items()}
    lines = [
        f"**{label(row)}**: the fold ensemble of train_cv run `{row.run_id}`, selected by {selection.criterion} = "
        f"{_fmt(selection.value, pct=True)}, the highest of {selection.n_candidates} row(s)"
        + (f" on test set {evaluated_on}." if evaluated_on else "."),
        "",
        "- Members: " + ", ".join(f"{keys.fold_model(k)} `{m}` (fold run `{fold_runs[k]}`)"
                                  for k, m in members.items()),
        f"- Cross-validation: AUROC {_fmt(cv[keys.CV_AUROC_MEAN])} ± {_fmt(cv[keys.CV_AUROC_STD])}, "
        f"BA {_fmt(cv[keys.CV_BA_MEAN])} ± {_fmt(cv[keys.CV_BA_STD])} (mean ± population SD over folds)",
        (f"- Test set {ev.test_set} (evaluate run `{ev.run_id}`): "
         + ", ".join(f"{m} {_fmt(test[keys.test_metric(m)])}" for m in keys.TEST_METRICS)) if ev is not None
        else "- Test: no evaluate run",
        f"- Data: training store `{train_digest}`"
        + (f", synthetic stores {', '.join(f'{k} `{d}`' for k, d in synthetic.items())}" if synthetic else "")
        + (f", test store `{test_digest}`" if test_digest else ""),
        f"- Threshold rule: {selection.threshold_rule}: {selection.rule_text()}",
        f"- TTA: {selection.tta} (the default of the `tta` param)",
    ]
    return "\n".join(lines), tags


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _differences(before: dict, after: dict) -> list[str]:
    parts = {"members": ("members", "weights"), "threshold rule": ("threshold", "fold_thresholds"), "TTA": ("tta",)}
    return [word for word, names in parts.items() if any(before.get(n) != after.get(n) for n in names)]


@dataclass
class Registration:
    version: ModelVersion
    new: bool  # False: the alias's version already is this selection
    why: str


def _unchanged(wanted: dict, registered_name: str, alias: str) -> tuple[Registration | None, str]:
    """(the alias's version, when its selection tag equals `wanted`, else None; why a new version is needed)."""
    current = alias_version(MlflowClient(), registered_name, alias)
    if current is None:
        return None, f"no version had alias {alias}"
    if keys.V_SELECTION not in current.tags:
        return None, f"version {current.version} does not record its selection"
    changed = _differences(json.loads(current.tags[keys.V_SELECTION]), wanted)
    if not changed:
        same = f"version {current.version} has the same members, threshold rule and TTA"
        return Registration(current, False, same), ""
    return None, f"{' and '.join(changed)} changed from version {current.version}"


def register_submission(selection: Selection, *, registered_name: str = keys.MODEL_NAME,
                        alias: str = keys.SUBMISSION_ALIAS, evaluated_on: str = "") -> Registration:
    """The selection as the alias's version: the version it points at when that has the same
    members, threshold rule and TTA (nothing is logged), else a new version, described and tagged."""
    row = selection.row
    lacking = missing_fold_runs(row)
    if lacking:
        raise SelectionError(f"{row.name}: no finished fold run for fold(s) {lacking}")
    _, members = _members(row)
    wanted = json.loads(selection_tag(members, selection.threshold, selection.fold_thresholds, selection.tta))
    kept, why = _unchanged(wanted, registered_name, alias)
    if kept is not None:
        return kept
    description, tags = version_record(selection, members, evaluated_on)
    version = log_ensemble_model(row, selection.threshold, fold_thresholds=selection.fold_thresholds, tta=selection.tta,
                                 registered_name=registered_name, alias=alias, description=description, tags=tags,
                                 extra_config={"selected_by": selection.criterion, "evaluated_on": evaluated_on})
    return Registration(version, True, why)


# --- an ensemble of rows (report ensemble=greedy, analysis/ensemble_selection.py) as the submission ---

@dataclass
class EnsembleChoice:
    """The report's ensemble of rows: members in pick order, their pick counts and fold thresholds
    (by train_run_id), the threshold on its score, and its figures for the selection criteria."""
    rows: list[TrainRow]
    weights: dict[str, int]
    fold_thresholds: dict[str, dict[int, float]]
    threshold: float
    name: str  # its row label in the tables
    cv_auroc: float  # mean over folds of its OOF AUROC (Table 1)
    oof_ba: float
    oof_auroc: float
    test: dict[str, float] | None = None  # {metric: value} on the selection's test set, when every member has it
    tta: str = "none"

    def value(self, criterion: str) -> float | None:
        if criterion == "cv_auroc":
            return self.cv_auroc
        return (self.test or {}).get(criterion.removeprefix(keys.TEST_PREFIX))

    def artifacts(self) -> list[tuple[str, TrainRow, int, float]]:
        """(artifact name, row, fold k, the model's weight: its row's pick count over the row's folds) per model."""
        return [(keys.member_model(r, k), row, k, self.weights[row.run_id] / len(row.fold_runs))
                for r, row in enumerate(self.rows, 1) for k in sorted(row.fold_runs)]


def _ensemble_members(choice: EnsembleChoice) -> tuple[dict[str, str | None], dict[str, str], dict[str, str]]:
    """({artifact: LoggedModel id or None}, {artifact: that id or the fold run id}, {artifact: fold run id})."""
    model_ids, members, fold_runs = {}, {}, {}
    for r, row in enumerate(choice.rows, 1):
        ids, named = _members(row)
        for k, run in sorted(row.fold_runs.items()):
            name = keys.member_model(r, k)
            model_ids[name], members[name], fold_runs[name] = ids[k], named[k], run.info.run_id
    return model_ids, members, fold_runs


def ensemble_selection_tag(choice: EnsembleChoice, members: dict[str, str]) -> str:
    """selection_tag's JSON for an ensemble of rows: its models, their weights and thresholds, threshold, TTA."""
    items = choice.artifacts()
    return json.dumps({"members": members, "weights": {n: float(w) for n, _, _, w in items},
                       "threshold": float(choice.threshold), "tta": choice.tta,
                       "fold_thresholds": {n: float(choice.fold_thresholds[row.run_id][k]) for n, row, k, _ in items}},
                      sort_keys=True)


def ensemble_record(choice: EnsembleChoice, criterion: str, value: float, n_candidates: int,
                    evaluated_on: str = "") -> tuple[str, dict[str, str]]:
    """The registered ensemble's description (Markdown) and tags, as version_record says a row's."""
    digest = choice.rows[0].run.data.params.get(keys.P_DATA_DIGEST, "")
    rows = [{"row": label(r), "train_run_id": r.run_id, "weight": choice.weights[r.run_id]} for r in choice.rows]
    tags = {keys.V_ROW: choice.name, keys.V_ROWS_COMPARED: str(n_candidates), keys.V_SELECTED_VALUE: str(value),
            keys.V_THRESHOLD_RULE: "ensemble", keys.P_DATA_DIGEST: digest, keys.V_ENSEMBLE_ROWS: json.dumps(rows),
            **{keys.test_metric(m): str(v) for m, v in (choice.test or {}).items()}}
    lines = [
        f"**{choice.name}**, selected by {criterion} = {_fmt(value, pct=True)}, the highest of {n_candidates} "
        "candidate(s) (the rows and the ensemble)" + (f" on test set {evaluated_on}." if evaluated_on else "."),
        "",
        "- Members (weight = pick count; each row's fold models share its weight): " + ", ".join(
            f"{r['row']} ×{r['weight']} (train_cv run `{r['train_run_id']}`)" for r in rows),
        f"- Out of fold: AUROC {_fmt(choice.oof_auroc)}, BA {_fmt(choice.oof_ba)} at threshold "
        f"{choice.threshold:.4f}; mean fold AUROC {_fmt(choice.cv_auroc)}",
        ("- Test: " + ", ".join(f"{m} {_fmt(v)}" for m, v in choice.test.items())) if choice.test
        else "- Test: not every member has a fold_ba evaluate run on the test set",
        f"- Data: training store `{digest}`",
        "- Threshold rule: each member's fold models at their own out-of-fold thresholds, the weighted mean "
        f"shifted logit, at the ensemble's calibrated out-of-fold threshold {choice.threshold:.4f}",
        f"- TTA: {choice.tta} (the default of the `tta` param)",
    ]
    return "\n".join(lines), tags


def register_ensemble(choice: EnsembleChoice, criterion: str, value: float, n_candidates: int, *,
                      registered_name: str = keys.MODEL_NAME, alias: str = keys.SUBMISSION_ALIAS,
                      evaluated_on: str = "") -> Registration:
    """The ensemble of rows as the alias's version, as register_submission does for a row: a new version
    only when its models, weights, threshold rule or TTA differ from the alias's version."""
    for row in choice.rows:
        lacking = missing_fold_runs(row)
        if lacking:
            raise SelectionError(f"{row.name}: no finished fold run for fold(s) {lacking}")
    model_ids, members, fold_runs = _ensemble_members(choice)
    selection = ensemble_selection_tag(choice, members)
    kept, why = _unchanged(json.loads(selection), registered_name, alias)
    if kept is not None:
        return kept
    description, tags = ensemble_record(choice, criterion, value, n_candidates, evaluated_on)
    items = choice.artifacts()
    config = {"threshold": float(choice.threshold), "device": "auto", "tta": choice.tta,
              "train_run_id": ",".join(r.run_id for r in choice.rows),
              "backbone": ",".join(r.backbone for r in choice.rows), "regime": ",".join(r.regime for r in choice.rows),
              "fold_thresholds": {n: float(choice.fold_thresholds[row.run_id][k]) for n, row, k, _ in items},
              "member_weights": {n: float(w) for n, _, _, w in items},
              "selected_by": criterion, "evaluated_on": evaluated_on}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Operation with range is deprecated")  # as in log_ensemble_model
        dirs = {}
        for r, row in enumerate(choice.rows, 1):
            try:
                got = runs.download_checkpoints(row.fold_runs, Path(tmp) / f"row{r}")
            except runs.RunLookupError as e:
                raise SelectionError(f"{row.name}: {e}") from None
            dirs.update({keys.member_model(r, k): path for k, path in got.items()})
        version = _log_pyfunc(dirs, model_ids, fold_runs, members, config, selection, tta=choice.tta,
                              registered_name=registered_name, alias=alias, description=description, tags=tags,
                              check_load=True, metadata={"train_run_id": config["train_run_id"],
                                                         "threshold": float(choice.threshold)})
    return Registration(version, True, why)
