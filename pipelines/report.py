"""report: Tables 1 and 2, the regime comparison and the figures from the experiment's runs;
registers the chosen row's fold ensemble as the `submission` model.

Every section is built from what the runs hold; a section (or row) that cannot be built
is listed, with the reason, under "Skipped" in report.md and on the console.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from analysis import keys
from analysis.ensemble_report import (RowsEnsemble, build_ensemble, choice, picks_table, test_metrics, test_scores,
                                      tta_of, versus_best, versus_table)
from analysis.ensemble_selection import CRITERION as ENSEMBLE_CRITERION
from analysis.plots import plot_calibration, plot_domain_gap, plot_fold_aurocs, plot_rocs
from analysis.quality import CAPTION as QUALITY_CAPTION, quality_table
from analysis.queries import EvalRun, ReportDataError, TrainRow, eval_runs, oof_or_reason, train_rows
from analysis.runs import experiment_ids, newest_in_experiment, read_csv_artifact
from analysis.stats import compare_regimes
from analysis.submission import (CRITERIA, EnsembleChoice, SelectionError, register_ensemble, register_submission,
                                 select_row)
from analysis.tables import (TABLE2_COLUMNS, comparison_table, domain_table, group_label, label, study_note, table1,
                             table2, table2_domains, to_markdown, write_table)
from data_tools.constants import ATYPICAL, NORMAL
from data_tools.params import param
from models.metrics import mean_and_population_sd
from pipelines.common import cli_step, log_params, step_run
from pipelines.config import StepConfig, as_params, from_cli

CAPTION1 = "{k}-fold cross-validation AUROC (%) per backbone and training regime."
CAPTION2 = "Test set results (%) per backbone and training regime"
ENSEMBLES = ("none", "greedy")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "test"


class Report:
    """The report's folder, its Markdown text and the list of what was skipped."""

    def __init__(self, out: Path):
        self.out, self.parts, self.skipped = out, [], []

    def section(self, title: str, text: str) -> None:
        self.parts.append(f"## {title}\n\n{text}\n")
        print(f"\n== {title} ==\n{text}")

    def table(self, df: pd.DataFrame, stem: str, caption: str) -> None:
        """The table as files (md, csv, tex) and as an MLflow table: the UI's artifact view shows
        it, and the same file in two report runs can be compared."""
        write_table(df, self.out, stem, caption)
        if mlflow.active_run():
            with warnings.catch_warnings():  # pandas 3 deprecates a dtype query inside MLflow's log_table: not ours
                warnings.filterwarnings("ignore", message=".*select_dtypes.*")
                mlflow.log_table(df.reset_index(), f"{keys.TABLES_DIR}/{stem}.json")

    def skip(self, section: str, reasons: list[str]) -> None:
        self.skipped += [f"{section}: {r}" for r in reasons]

    def write(self) -> Path:
        skipped = "\n".join(f"- {s}" for s in self.skipped) or "nothing"
        text = "# Report\n\n" + "\n".join(self.parts) + f"\n## Skipped\n\n{skipped}\n"
        path = self.out / keys.REPORT_MD
        path.write_text(text)
        if self.skipped:
            print("\n== Skipped ==\n" + skipped)
        return path


def _predictions(rows: list[TrainRow], evals: dict[str, EvalRun] | None, report: Report) -> tuple[dict, str | None]:
    """label -> (y, prob) per row: the test predictions when there are evaluate runs, else the
    out-of-fold predictions (calibration still says something there); and what they are."""
    curves = {}
    for row in rows:
        ev = (evals or {}).get(row.run_id)
        if ev is None:
            continue
        df = read_csv_artifact(ev.run_id, keys.PREDICTIONS)
        if df is None or not {"label", "prob"} <= set(df.columns):
            report.skip("Figures", [f"{row.name}: evaluate run {ev.run_id[:8]} has no usable {keys.PREDICTIONS}"])
            continue
        df = df[df["label"].isin([NORMAL, ATYPICAL])]  # an evaluate run on unlabelled crops has no curve
        if df["label"].nunique() < 2:
            report.skip("Figures", [f"{row.name}: evaluate run {ev.run_id[:8]} lacks a labelled crop of each class"])
            continue
        curves[label(row)] = (df["label"].to_numpy(int), df["prob"].to_numpy(float))
    if curves:
        return curves, "test"
    for row in rows:
        oof, _ = oof_or_reason(row)
        if oof is not None:
            curves[label(row)] = (oof["label"].to_numpy(int), oof["prob"].to_numpy(float))
    return curves, ("out-of-fold predictions" if curves else None)


def with_row(df: pd.DataFrame, name: str, values: dict) -> pd.DataFrame:
    """The table with one more row (an ensemble's), its columns in the table's order."""
    extra = pd.DataFrame([values], index=pd.Index([name], name=df.index.name)).reindex(columns=df.columns)
    return pd.concat([df, extra]) if len(df) else extra


def _ensemble_ids(ens: RowsEnsemble) -> dict:
    return {"backbone": "ensemble", "regime": "+".join(dict.fromkeys(r.regime for r in ens.members)),
            "train_run_id": ",".join(r.run_id for r in ens.members)}


def table1_section(rows: list[TrainRow], report: Report, ens: RowsEnsemble | None = None) -> None:
    t1 = table1(rows)
    if ens is not None:  # the ensemble's out-of-fold AUROC per fold
        folds = ens.fold_auroc()
        mean, sd = mean_and_population_sd(v * 100 for v in folds.values())
        t1 = with_row(t1, ens.name, {**_ensemble_ids(ens), **{f"F{k}": v * 100 for k, v in folds.items()},
                                     "Mean": mean, "SD": sd})
    caption = CAPTION1.format(k=sum(c.startswith("F") for c in t1.columns))
    report.table(t1, keys.TABLE1, caption)
    note = study_note(rows)
    report.section("Table 1", f"{caption}\n\n{to_markdown(t1)}" + (f"\n\n{note}" if note else ""))
    plot_fold_aurocs(t1, report.out / keys.FIG_FOLD_AUROC)


def ensemble_test(ens: RowsEnsemble, evals: dict[str, EvalRun]) -> tuple[dict[str, float] | None, str | None]:
    """The ensemble's test metrics from its members' evaluate runs, or (None, why not)."""
    frame, why = test_scores(ens, evals)
    if frame is None:
        return None, why
    found = test_metrics(frame, ens.greedy.threshold)
    return (found, None) if found else (None, "the test set lacks a labelled crop of each class")


def table2_sections(rows: list[TrainRow], evals_by_set: dict[str, dict[str, EvalRun]], report: Report,
                    ens: RowsEnsemble | None = None) -> None:
    """One Table 2 per test set (one file `table2.*` when there is one set), plus BA per domain."""
    for name, evals in evals_by_set.items():
        stem = keys.TABLE2 if len(evals_by_set) == 1 else f"{keys.TABLE2}_{_slug(name)}"
        t2, skipped = table2(rows, evals)
        report.skip(f"Table 2 ({name})", skipped)
        if ens is not None:
            found, why = ensemble_test(ens, evals)
            if found is None:
                report.skip(f"Table 2 ({name})", [f"{ens.name}: {why}"])
            else:
                t2 = with_row(t2, ens.name, {**_ensemble_ids(ens), **{TABLE2_COLUMNS[m]: v * 100
                                                                      for m, v in found.items()}})
        if not len(t2):
            continue
        caption = f"{CAPTION2}, test set {name}."
        report.table(t2, stem, caption)
        text = f"{caption}\n\n{to_markdown(t2)}"
        per_domain = table2_domains(rows, evals, "ba")
        if len(per_domain) and len(per_domain.columns) > 3:
            report.table(per_domain, f"{stem}_domains_ba", f"Balanced accuracy (%) per domain, {name}")
            text += f"\nBalanced accuracy (%) per domain:\n\n{to_markdown(per_domain)}"
        report.section(f"Table 2 ({name})", text)


def domain_sections(rows: list[TrainRow], report: Report) -> None:
    """Leave-one-domain-out rows: AUROC and BA on each held-out domain, mean, SD and the worst domain."""
    for metric, name in (("auroc", "AUROC"), ("ba", "Balanced accuracy")):
        table = domain_table(rows, metric)
        at = " at threshold 0.5 (the fold runs' best_val_ba; evaluate tunes the threshold)" if metric == "ba" else ""
        caption = f"{name} (%){at} on each held-out domain (leave one domain out), per backbone and regime."
        report.table(table, f"{keys.TABLE1_DOMAINS}_{metric}", caption)
        report.section(f"Table 1, leave one domain out ({name.lower() if metric == 'ba' else name})", f"{caption}\n\n{to_markdown(table)}")


def domain_gap_figure(grouped: list[TrainRow], held_out: list[TrainRow], report: Report) -> None:
    """Per (backbone, regime) with both protocols: slide-grouped CV vs leave-one-domain-out AUROC."""
    by_key = {r.key: r for r in grouped}
    gaps = {label(by_key[r.key]): (
        [v * 100 for v in by_key[r.key].fold_metric("auroc").values()], [v * 100 for v in r.fold_metric("auroc").values()])
        for r in held_out if r.key in by_key}
    if gaps:
        plot_domain_gap(gaps, report.out / keys.FIG_DOMAIN_GAP)
        lines = [f"- {name}: slide-grouped CV {sum(g) / len(g):.2f}, leave one domain out {sum(h) / len(h):.2f} "
                 f"(worst domain {min(h):.2f}); CV minus leave-one-domain-out {sum(g) / len(g) - sum(h) / len(h):+.2f} pp"
                 for name, (g, h) in gaps.items()]
        report.section("The domain gap", "Mean AUROC (%) over folds, same backbone and regime:\n\n" + "\n".join(lines))
    elif held_out and grouped:
        report.skip("The domain gap", ["no (backbone, regime) has both a slide-grouped and a leave-one-domain-out row"])


def comparison_section(rows: list[TrainRow], n_boot: int, report: Report, lodo: bool = False) -> None:
    records, skipped = compare_regimes(rows, oof_or_reason, n_boot=n_boot, name=group_label)
    title = "Does synthetic balancing help on an unseen domain?" if lodo else "Does synthetic balancing help?"
    report.skip(title if lodo else "Regime comparison", skipped)
    if not records:
        return
    comparison = comparison_table(records)
    stem = keys.COMPARISON + ("_lodo" if lodo else "")
    report.table(comparison, stem, "Synthetic balancing minus real only")
    (report.out / f"{stem}.json").write_text(json.dumps(records, indent=1))
    paired = "held-out domains (one fold each)" if lodo else "folds"
    report.section(title, (
        f"Synthetic-balanced minus real-only, per backbone. Over {paired}: paired t-test and Wilcoxon signed-rank "
        "test on the fold AUROCs. Over samples: AUROC difference on the pooled out-of-fold predictions with a "
        f"stratified paired bootstrap ({n_boot} resamples) interval, and DeLong's test.\n\n" + to_markdown(comparison)))


def ensemble_section(ens: RowsEnsemble, size: int, n_boot: int, report: Report) -> None:
    """How the ensemble was picked (order, weights), what was left out, and it against the best single row."""
    steps, weights = picks_table(ens)
    report.table(steps, keys.ENSEMBLE_PICKS, "Greedy ensemble: the row added at each pick")
    report.table(weights, keys.ENSEMBLE_WEIGHTS, "Greedy ensemble: weights (pick counts)")
    left = "\n".join(f"- {n}: {why}" for n, why in ens.left_out.items()) or "none"
    stop = ens.greedy.rejected
    stopped = (f"Stopped after pick {len(ens.greedy.steps)}: the best addition, {stop.row}, would give OOF BA "
               f"{stop.ba * 100:.2f}% (AUROC {stop.auroc * 100:.2f}%), no improvement.\n\n" if stop else "")
    text = (f"Forward selection with replacement (Caruana et al., ICML 2004) over {len(ens.rows)} row(s) sharing the "
            f"CV store and folds, at most {size} picks, stopping when no addition improves the criterion: "
            f"{ENSEMBLE_CRITERION}. Each row's out-of-fold scores are shifted by its own fold thresholds "
            f"(logit p - logit t_k) and averaged in logit space with its pick count as weight; the ensemble's "
            f"threshold, {ens.greedy.threshold:.4f}, is calibrated on its out-of-fold scores.\n\n"
            f"{to_markdown(steps)}\n{stopped}Weights:\n\n{to_markdown(weights)}\nRows left out: {left}\n")
    try:
        rec = versus_best(ens, n_boot)
    except ValueError as e:
        report.skip("Ensemble", [f"the comparison with the best single row: {e}"])
    else:
        (report.out / f"{keys.ENSEMBLE_COMPARISON}.json").write_text(json.dumps(rec, indent=1))
        table = versus_table(rec)
        report.table(table, keys.ENSEMBLE_COMPARISON, "Ensemble minus the best single row, out of fold")
        text += ("\nThe ensemble minus the best single row (its first pick), on the same out-of-fold crops: a paired "
                 "t-test and Wilcoxon test on the fold AUROCs; the pooled AUROC difference with a stratified "
                 f"bootstrap ({n_boot} resamples) interval and DeLong's test. The out-of-fold BA is in-sample for "
                 f"the selection (it chose the members), so it flatters the ensemble.\n\n{to_markdown(table)}")
    report.section("Ensemble of rows", text)


def figures(rows: list[TrainRow], evals: dict[str, EvalRun] | None, test_set: str | None, report: Report) -> None:
    curves, kind = _predictions(rows, evals, report)
    if kind == "test":
        plot_rocs(curves, report.out / keys.FIG_TEST_ROC, title=f"ROC, test set {test_set}")
    else:
        report.skip("Figures", ["test ROC curves: no test predictions" + ("" if evals is not None else
                                                                           " of one test set (give test_set)")])
    if curves:
        where = f"test set {test_set}" if kind == "test" else kind
        plot_calibration(curves, report.out / keys.FIG_CALIBRATION, title=f"Reliability, {where}")
    else:
        report.skip("Figures", ["calibration: no test or out-of-fold predictions"])


def submission_section(rows: list[TrainRow], evals: dict[str, EvalRun] | None, test_set: str | None, select_by: str,
                       register: bool, model_name: str, report: Report,
                       ens: EnsembleChoice | None = None) -> dict | None:
    """Select a row (or the ensemble of rows, when it is better by the criterion), tag the report run
    with it, and register its ensemble with the alias."""
    try:
        if select_by.startswith(keys.TEST_PREFIX) and not evals:
            raise SelectionError("no evaluate runs" if evals is not None else "several test sets: give test_set")
        selection = select_row(rows, evals or {}, select_by)
    except SelectionError as e:
        selection, why = None, e
    ens_value = ens.value(select_by) if ens is not None else None
    if ens_value is not None and (selection is None or ens_value > selection.value):
        return ensemble_submission(ens, ens_value, (selection.n_candidates if selection else 0) + 1, test_set,
                                   select_by, register, model_name, report)
    if selection is None:
        report.skip("Submission", [f"no row selected by {select_by}: {why}"])
        return None
    chosen_label = label(selection.row)
    source = f"from evaluate run `{selection.eval_run.run_id}`" if selection.eval_run else "default: no evaluate run"
    text = (f"Selected by {select_by} = {selection.value * 100:.2f}%: {chosen_label}, train_cv run "
            f"`{selection.row.run_id}`, {selection.rule_text()} ({source}), TTA {selection.tta}")
    chosen = {"train_run_id": selection.row.run_id, "criterion": select_by, "value": selection.value,
              "threshold": selection.threshold}
    mlflow.set_tags({keys.SELECTED_TRAIN_RUN: selection.row.run_id, keys.SELECTED_ROW: chosen_label})
    mlflow.log_metric(keys.SELECTED_VALUE, selection.value)
    if register:
        try:
            done = register_submission(selection, registered_name=model_name, evaluated_on=test_set or "")
        except (SelectionError, OSError, RuntimeError, ValueError) as e:
            report.skip("Submission", [f"the ensemble of {selection.row.name} was not registered: {e}"])
        else:
            text += said_registered(done, chosen)
    if ens is not None:
        text += (f"\n\n{ens.name}: {select_by} " + (f"{ens_value * 100:.2f}%, not higher" if ens_value is not None
                                                     else "not available") + "; not selected.")
    report.section("Submission", text)
    return chosen


def said_registered(done, chosen: dict) -> str:
    """One console line on what registration did (a new version, or the alias's kept); the report's sentence."""
    version = done.version
    chosen["registered"] = {"name": version.name, "version": version.version, "new": done.new}
    uri = f"models:/{version.name}/{version.version}"
    said = (f"registered {uri} (alias {keys.SUBMISSION_ALIAS}): {done.why}" if done.new else
            f"no new version: {uri} (alias {keys.SUBMISSION_ALIAS}) kept, {done.why}")
    print(f"submission: {said}", flush=True)
    return f"\n\n{said[0].upper()}{said[1:]}; `models:/{version.name}@{keys.SUBMISSION_ALIAS}` loads it."


def ensemble_submission(ens: EnsembleChoice, value: float, n_candidates: int, test_set: str | None, select_by: str,
                        register: bool, model_name: str, report: Report) -> dict:
    """The ensemble of rows as the submission: tags, and its registration (a new version only when it changed)."""
    ids = ",".join(r.run_id for r in ens.rows)
    text = (f"Selected by {select_by} = {value * 100:.2f}% (the highest of {n_candidates} candidates): {ens.name}, "
            f"train_cv runs {', '.join(f'`{r.run_id}`' for r in ens.rows)}, its calibrated out-of-fold threshold "
            f"{ens.threshold:.4f}, TTA {ens.tta}")
    chosen = {"train_run_id": ids, "criterion": select_by, "value": value, "threshold": ens.threshold,
              "ensemble": {r.run_id: ens.weights[r.run_id] for r in ens.rows}}
    mlflow.set_tags({keys.SELECTED_TRAIN_RUN: ids, keys.SELECTED_ROW: ens.name})
    mlflow.log_metric(keys.SELECTED_VALUE, value)
    if register:
        try:
            done = register_ensemble(ens, select_by, value, n_candidates, registered_name=model_name,
                                     evaluated_on=test_set or "")
        except (SelectionError, OSError, RuntimeError, ValueError) as e:
            report.skip("Submission", [f"the ensemble of rows was not registered: {e}"])
        else:
            text += said_registered(done, chosen)
    report.section("Submission", text)
    return chosen


def build_report(out: Path, experiment: str | None, test_set: str | None, select_by: str, run_ids: list[str] | None,
                 n_boot: int, register: bool, model_name: str = keys.MODEL_NAME, ensemble: str = "none",
                 ensemble_size: int = 5) -> dict:
    """Write tables, figures and report.md into `out`; select, log and register the ensemble.

    Returns a summary: the rows, the test sets, the selection (with the registered version)."""
    client = MlflowClient()
    exp_ids = experiment_ids(client, experiment)
    report = Report(out)
    rows, problems = train_rows(client, exp_ids, run_ids)
    report.skip("Table 1", problems)
    summary: dict = {"experiment_ids": exp_ids, "rows": {label(r): r.run_id for r in rows}, "selection": None}
    grouped = [r for r in rows if r.split != keys.LODO]
    held_out = [r for r in rows if r.split == keys.LODO]
    ens = None
    if rows and ensemble == "greedy":
        ens, skipped = build_ensemble(grouped, ensemble_size)
        report.skip("Ensemble", skipped)
    if rows:
        if grouped:
            table1_section(grouped, report, ens)
        if held_out:
            domain_sections(held_out, report)
        evals_by_set = eval_runs(client, exp_ids, rows)
        if test_set:
            if test_set not in evals_by_set:
                report.skip("Table 2", [f"no finished evaluate run on test set {test_set!r} "
                                        f"(found: {list(evals_by_set) or 'none'})"])
            evals_by_set = {k: v for k, v in evals_by_set.items() if k == test_set}
        elif not evals_by_set:
            report.skip("Table 2", ["no finished evaluate run of any row"])
        summary["test_sets"] = list(evals_by_set)
        table2_sections(rows, evals_by_set, report, ens)
        for part, lodo in ((grouped, False), (held_out, True)):
            if part:
                comparison_section(part, n_boot, report, lodo)
        domain_gap_figure(grouped, held_out, report)
        if ens is not None:
            ensemble_section(ens, ensemble_size, n_boot, report)
            summary["ensemble"] = {"weights": {n: c for n, c in ens.greedy.weights.items()},
                                   "picks": [s.row for s in ens.greedy.steps], "oof_ba": ens.greedy.ba,
                                   "oof_auroc": ens.greedy.auroc, "threshold": ens.greedy.threshold,
                                   "fold_auroc": ens.fold_auroc(), "left_out": ens.left_out}
        quality, unread = quality_table(client, rows)  # what the synthetic crops' KID/FID were computed on
        report.skip("Synthetic crops", unread)
        if len(quality):
            report.table(quality, keys.QUALITY_TABLE, QUALITY_CAPTION)
            report.section("Synthetic crops", f"{QUALITY_CAPTION}.\n\n{to_markdown(quality)}")
        # one test set for the figures and the selection: the one given, or the only one there is
        one_set = test_set or (next(iter(evals_by_set)) if len(evals_by_set) == 1 else None)
        evals = evals_by_set.get(one_set, {}) if len(evals_by_set) <= 1 or one_set else None
        figures(rows, evals, one_set, report)
        candidate = None
        if ens is not None:
            found = ensemble_test(ens, evals)[0] if evals else None
            candidate = choice(ens, found, tta_of(ens, evals or {}))
            summary["ensemble"]["test"] = found
        chosen = submission_section(rows, evals, one_set, select_by, register, model_name, report, candidate)
        summary["selection"] = chosen
        summary["registered"] = (chosen or {}).get("registered")
    else:
        report.section("Table 1", "No complete train_cv row: nothing to report.")
    report.write()
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


@dataclass
class ReportConfig(StepConfig):
    experiment: str = param("experiment name or id (default: the active one)")
    test_set: str = param("test set name (tag test_set of evaluate runs) when several exist")
    select_by: str = param(f"submission criterion: one of {', '.join(CRITERIA)}", choices=CRITERIA)
    runs: str = param("comma-separated train_cv run ids (default: the latest finished per row)")
    n_boot: int = param("bootstrap resamples of the AUROC difference")
    register: bool = param("register the selected ensemble as the submission model")
    model_name: str = param("registered model name")
    ensemble: str = param("none (the paper) | greedy: an ensemble of rows by forward selection with replacement on "
                          "their out-of-fold predictions, a row of the tables and a submission candidate",
                          choices=ENSEMBLES)
    ensemble_size: int = param("ensemble=greedy: the most picks (rows, with replacement)")

    STEP = keys.REPORT


CONFIG = ReportConfig


def nothing_to_report_yet(experiment: str | None, run_ids: list[str] | None) -> None:
    """Before a report run is made: an experiment without any train_cv run (or none at all) is a
    one-line error naming the command that makes one."""
    if not run_ids and newest_in_experiment(MlflowClient(), keys.TRAIN_CV, experiment) is None:
        where = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID", "")
        raise ReportDataError(f"no finished train_cv run in experiment {where!r} yet: train a row with "
                              f"`mlflow run . -e train_cv -P backbone=convnext` (and evaluate it), or run the whole "
                              f"workflow with `make demo`")


@cli_step(keys.REPORT)
def main(argv: list[str] | None = None) -> dict:
    cfg = from_cli(ReportConfig, argv, __doc__)
    run_ids = [r.strip() for r in cfg.runs.split(",") if r.strip()] or None
    if cfg.experiment:
        experiment_id = experiment_ids(MlflowClient(), cfg.experiment)[0]
        if not os.environ.get("MLFLOW_RUN_ID"):  # the report run lives with the runs it reports
            mlflow.set_experiment(experiment_id=experiment_id)
    nothing_to_report_yet(cfg.experiment or None, run_ids)
    with step_run(keys.REPORT, cfg.profile, run_name="report"), tempfile.TemporaryDirectory() as tmp:
        log_params(as_params(cfg))
        summary = build_report(Path(tmp), cfg.experiment or None, cfg.test_set or None, cfg.select_by, run_ids,
                               cfg.n_boot, cfg.register, cfg.model_name, cfg.ensemble, cfg.ensemble_size)
        mlflow.log_artifacts(tmp)
    return summary


if __name__ == "__main__":
    main()
