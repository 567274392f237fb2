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
from analysis.plots import plot_calibration, plot_domain_gap, plot_fold_aurocs, plot_rocs
from analysis.queries import EvalRun, ReportDataError, TrainRow, eval_runs, oof_or_reason, train_rows
from analysis.runs import experiment_ids, newest_in_experiment, read_csv_artifact
from analysis.stats import compare_regimes
from analysis.submission import CRITERIA, SelectionError, log_ensemble_model, select_row
from analysis.tables import (comparison_table, domain_table, group_label, label, table1, table2, table2_domains, to_markdown,
                             write_table)
from data_tools.constants import ATYPICAL, NORMAL
from data_tools.params import param
from pipelines.common import cli_step, log_params, step_run
from pipelines.config import StepConfig, as_params, from_cli

CAPTION1 = "{k}-fold cross-validation AUROC (%) per backbone and training regime."
CAPTION2 = "Test set results (%) per backbone and training regime"


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


def table1_section(rows: list[TrainRow], report: Report) -> None:
    t1 = table1(rows)
    caption = CAPTION1.format(k=sum(c.startswith("F") for c in t1.columns))
    report.table(t1, keys.TABLE1, caption)
    report.section("Table 1", f"{caption}\n\n{to_markdown(t1)}")
    plot_fold_aurocs(t1, report.out / keys.FIG_FOLD_AUROC)


def table2_sections(rows: list[TrainRow], evals_by_set: dict[str, dict[str, EvalRun]], report: Report) -> None:
    """One Table 2 per test set (one file `table2.*` when there is one set), plus BA per domain."""
    for name, evals in evals_by_set.items():
        stem = keys.TABLE2 if len(evals_by_set) == 1 else f"{keys.TABLE2}_{_slug(name)}"
        t2, skipped = table2(rows, evals)
        report.skip(f"Table 2 ({name})", skipped)
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
                       register: bool, model_name: str, report: Report) -> dict | None:
    """Select a row, tag the report run with it, and register its ensemble with the alias."""
    try:
        if select_by.startswith(keys.TEST_PREFIX) and not evals:
            raise SelectionError("no evaluate runs" if evals is not None else "several test sets: give test_set")
        selection = select_row(rows, evals or {}, select_by)
    except SelectionError as e:
        report.skip("Submission", [f"no row selected by {select_by}: {e}"])
        return None
    chosen_label = label(selection.row)
    source = f"from evaluate run `{selection.eval_run.run_id}`" if selection.eval_run else "default: no evaluate run"
    per_fold = selection.fold_thresholds
    rule = (f"each fold model at its own out-of-fold threshold ({', '.join(f'{t:.3f}' for _, t in sorted(per_fold.items()))}), "
            f"their mean shifted logit at {selection.threshold:g}" if per_fold else f"threshold {selection.threshold:g}")
    text = (f"Selected by {select_by} = {selection.value * 100:.2f}%: {chosen_label}, train_cv run "
            f"`{selection.row.run_id}`, {rule} ({source})")
    chosen = {"train_run_id": selection.row.run_id, "criterion": select_by, "value": selection.value,
              "threshold": selection.threshold}
    mlflow.set_tags({keys.SELECTED_TRAIN_RUN: selection.row.run_id, keys.SELECTED_ROW: chosen_label})
    mlflow.log_metric(keys.SELECTED_VALUE, selection.value)
    if register:
        try:
            version = log_ensemble_model(selection.row, selection.threshold, fold_thresholds=selection.fold_thresholds,
                                         registered_name=model_name,
                                         extra_config={"selected_by": select_by, "evaluated_on": test_set or ""})
        except (SelectionError, OSError, RuntimeError, ValueError) as e:
            report.skip("Submission", [f"the ensemble of {selection.row.name} was not registered: {e}"])
        else:
            chosen["registered"] = {"name": version.name, "version": version.version}
            text += (f"\n\nRegistered as `models:/{version.name}/{version.version}`, alias "
                     f"`models:/{version.name}@{keys.SUBMISSION_ALIAS}`.")
    report.section("Submission", text)
    return chosen


def build_report(out: Path, experiment: str | None, test_set: str | None, select_by: str, run_ids: list[str] | None,
                 n_boot: int, register: bool, model_name: str = keys.MODEL_NAME) -> dict:
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
    if rows:
        if grouped:
            table1_section(grouped, report)
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
        table2_sections(rows, evals_by_set, report)
        for part, lodo in ((grouped, False), (held_out, True)):
            if part:
                comparison_section(part, n_boot, report, lodo)
        domain_gap_figure(grouped, held_out, report)
        # one test set for the figures and the selection: the one given, or the only one there is
        one_set = test_set or (next(iter(evals_by_set)) if len(evals_by_set) == 1 else None)
        evals = evals_by_set.get(one_set, {}) if len(evals_by_set) <= 1 or one_set else None
        figures(rows, evals, one_set, report)
        chosen = submission_section(rows, evals, one_set, select_by, register, model_name, report)
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
                               cfg.n_boot, cfg.register, cfg.model_name)
        mlflow.log_artifacts(tmp)
    return summary


if __name__ == "__main__":
    main()
