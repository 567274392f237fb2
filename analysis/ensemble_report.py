"""The report's ensemble of rows (`ensemble=greedy`): its members' out-of-fold predictions and
fold thresholds from the runs, the selection (analysis/ensemble_selection.py), its test scores
from the members' evaluate runs, and its tables (picks and weights, against the best single row).

A member's fold thresholds are those of its newest `fold_ba` evaluate run, else computed from its
out-of-fold predictions as evaluate computes them (models.metrics.fold_ba_thresholds). Its test
score: a fold_ba evaluate run's predictions are sigmoid(mean_k(logit_k - logit t_k)), so the
ensemble's test score is sigmoid of the weighted mean of their logits, exactly what the registered
ensemble computes; members evaluated under another rule or TTA leave the ensemble out of Table 2.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from analysis import keys, runs
from analysis.ensemble_selection import (EnsembleError, GreedyEnsemble, candidates, criterion, greedy_ensemble,
                                        shifted_logits)
from analysis.queries import EvalRun, TrainRow, oof_or_reason
from analysis.runs import read_csv_artifact
from analysis.stats import bootstrap_auroc_difference, delong_auroc_difference, paired_fold_test
from analysis.submission import EnsembleChoice
from analysis.tables import TABLE2_COLUMNS, label
from models.metrics import auroc, binary_metrics, fold_ba_thresholds

PROB_EPS = 1e-7


@dataclass
class RowsEnsemble:
    """The selection over the candidate rows (named by their table label), and where each member's
    fold thresholds came from."""
    greedy: GreedyEnsemble
    rows: dict[str, TrainRow]  # every candidate, by name
    oofs: dict[str, pd.DataFrame]
    thresholds: dict[str, dict[int, float]]
    threshold_source: dict[str, str]
    left_out: dict[str, str]

    @property
    def members(self) -> list[TrainRow]:
        """The picked rows, in the order of their first pick."""
        return [self.rows[n] for n in dict.fromkeys(s.row for s in self.greedy.steps)]

    @property
    def name(self) -> str:
        return f"Ensemble of {len(self.members)} row(s) [greedy, {len(self.greedy.steps)} picks]"

    @property
    def best_single(self) -> str:
        """The first pick: the row that alone is best on the criterion."""
        return self.greedy.steps[0].row

    def fold_auroc(self) -> dict[int, float]:
        return self.greedy.fold_metric("auroc")


def member_thresholds(row: TrainRow, oof: pd.DataFrame) -> tuple[dict[int, float], str]:
    """({k: t_k}, where from): the newest fold_ba evaluate run's, else computed from the OOF predictions."""
    ev = runs.latest_evaluate_run(row.run_id, threshold="fold_ba")
    found = runs.run_fold_thresholds(ev) if ev is not None else None
    if found and set(found) == set(oof["fold"].astype(int)):
        return found, f"evaluate run {ev.info.run_id[:8]} (fold_ba)"
    return fold_ba_thresholds(oof["label"], oof["prob"], oof["fold"]), "computed from its out-of-fold predictions"


def build_ensemble(rows: list[TrainRow], size: int) -> tuple[RowsEnsemble | None, list[str]]:
    """The greedy ensemble of the slide-grouped rows that share a store and folds, and a sentence for each
    row that could not take part (or for the whole ensemble, when none could be built)."""
    skipped, named = [], {}
    for row in rows:
        name = label(row)
        name = name if name not in named else f"{name} {row.run_id[:8]}"
        named[name] = row
    pooled: dict[str, tuple[str, pd.DataFrame]] = {}
    for name, row in named.items():
        if row.split == keys.LODO:
            skipped.append(f"{name}: leave-one-domain-out rows are not pooled")
            continue
        oof, why = oof_or_reason(row)
        if oof is None:
            skipped.append(f"{name}: {why}")
            continue
        pooled[name] = (row.run.data.params.get(keys.P_DATA_DIGEST, ""), oof)
    if not pooled:
        return None, skipped + ["no row with out-of-fold predictions"]
    kept, left = candidates(pooled)
    oofs, thresholds, sources = {}, {}, {}
    for name in kept:
        oof = pooled[name][1]
        try:
            thresholds[name], sources[name] = member_thresholds(named[name], oof)
        except ValueError as e:
            left[name] = f"no fold thresholds ({e})"
            continue
        oofs[name] = oof
    try:
        greedy = greedy_ensemble(oofs, thresholds, size)
    except EnsembleError as e:
        return None, skipped + [str(e)]
    return RowsEnsemble(greedy, {n: named[n] for n in oofs}, oofs, thresholds, sources, left), skipped


def test_scores(ens: RowsEnsemble, evals: dict[str, EvalRun]) -> tuple[pd.DataFrame | None, str | None]:
    """(sample_id, label, domain, prob) of the ensemble on the evaluate runs' test set, or (None, why not)."""
    parts, ttas = [], set()
    weights = ens.greedy.weights
    for name, count in weights.items():
        row = ens.rows[name]
        ev = evals.get(row.run_id)
        if ev is None:
            return None, f"{name} has no evaluate run on this test set"
        if ev.run.data.params.get(keys.P_THRESHOLD) != "fold_ba":
            return None, f"{name}'s evaluate run {ev.run_id[:8]} did not use threshold=fold_ba (evaluate it with it)"
        t = runs.run_fold_thresholds(ev.run) or {}
        if set(t) != set(ens.thresholds[name]) or not np.allclose([t[k] for k in sorted(t)], [
                ens.thresholds[name][k] for k in sorted(t)], atol=1e-6):
            return None, f"{name}'s evaluate run {ev.run_id[:8]} used other fold thresholds than the ensemble"
        ttas.add(ev.run.data.params.get(keys.P_TTA, "none"))
        df = read_csv_artifact(ev.run_id, keys.PREDICTIONS)
        if df is None or not {"sample_id", "label", "prob"} <= set(df.columns):
            return None, f"{name}'s evaluate run {ev.run_id[:8]} has no usable {keys.PREDICTIONS}"
        p = np.clip(df["prob"].to_numpy(float), PROB_EPS, 1 - PROB_EPS)
        parts.append(df[["sample_id", "label"] + (["domain"] if "domain" in df else [])].assign(
            z=count * np.log(p / (1 - p))))
    if len(ttas) > 1:
        return None, f"the members were evaluated under different TTA ({sorted(ttas)})"
    base = parts[0].drop(columns="z").set_index("sample_id")
    total = np.zeros(len(base))
    for part in parts:
        part = part.set_index("sample_id")
        if set(part.index) != set(base.index):
            return None, "the members' evaluate runs scored different crops"
        total += part.loc[base.index, "z"].to_numpy()
    z = total / sum(weights.values())
    return base.reset_index().assign(prob=1 / (1 + np.exp(-z))), None


def test_metrics(frame: pd.DataFrame, threshold: float) -> dict[str, float] | None:
    """{metric: value} (TABLE2_COLUMNS' metrics) of labelled test scores at the threshold; None without both
    classes."""
    labelled = frame[frame["label"].isin([0, 1])]
    y, p = labelled["label"].to_numpy(int), labelled["prob"].to_numpy(float)
    if len(np.unique(y)) < 2:
        return None
    return {"auroc": auroc(y, p), **{m: v for m, v in binary_metrics(y, p, threshold).items() if m in TABLE2_COLUMNS}}


def tta_of(ens: RowsEnsemble, evals: dict[str, EvalRun]) -> str:
    """The TTA the members were evaluated under when they agree (the registered ensemble's default), else none."""
    found = {evals[r.run_id].run.data.params.get(keys.P_TTA, "none") for r in ens.members if r.run_id in evals}
    return found.pop() if len(found) == 1 else "none"


def choice(ens: RowsEnsemble, test: dict[str, float] | None, tta: str) -> EnsembleChoice:
    """The ensemble as a submission candidate (analysis.submission.register_ensemble)."""
    folds = ens.fold_auroc()
    g = ens.greedy
    return EnsembleChoice(ens.members, {ens.rows[n].run_id: c for n, c in g.weights.items()},
                          {ens.rows[n].run_id: g.fold_thresholds[n] for n in g.weights}, g.threshold, ens.name,
                          float(np.mean(list(folds.values()))), g.ba, g.auroc, test, tta)


def picks_table(ens: RowsEnsemble) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pick order: the row added at each step and the criterion after it; weights: pick counts and shares)."""
    steps = pd.DataFrame([{"Row added": s.row, "OOF BA (%)": s.ba * 100, "OOF AUROC (%)": s.auroc * 100}
                          for s in ens.greedy.steps], index=pd.RangeIndex(1, len(ens.greedy.steps) + 1, name="Pick"))
    total = sum(ens.greedy.weights.values())
    weights = pd.DataFrame([{"train_run_id": ens.rows[n].run_id, "Picks": str(c), "Weight (%)": c / total * 100,
                             "Fold thresholds from": ens.threshold_source[n]}
                            for n, c in ens.greedy.weights.items()],
                           index=pd.Index(list(ens.greedy.weights), name="Row"))
    return steps, weights


def versus_best(ens: RowsEnsemble, n_boot: int, seed: int = 0) -> dict:
    """The ensemble minus the best single row on the same out-of-fold crops: a paired test over the folds'
    AUROCs, and the pooled AUROC difference (bootstrap, DeLong), each row's score under its fold thresholds."""
    best = ens.best_single
    oof = ens.oofs[best].set_index("sample_id").loc[ens.greedy.oof["sample_id"]].reset_index()
    s_best = 1 / (1 + np.exp(-shifted_logits(oof, ens.thresholds[best])))
    y, s_ens = ens.greedy.oof["label"].to_numpy(int), ens.greedy.oof["score"].to_numpy(float)
    best_folds = {int(k): auroc(g["label"], g["prob"]) for k, g in oof.groupby("fold")}
    best_ba = criterion(y, s_best)[0]
    rec = {"best_row": best, "best_run_id": ens.rows[best].run_id, "best_oof_ba": best_ba,
           "ensemble_oof_ba": ens.greedy.ba}
    try:
        rec["folds"] = asdict(paired_fold_test(best_folds, ens.fold_auroc()))
    except ValueError as e:
        rec["folds_skipped"] = str(e)
    rec["bootstrap"] = asdict(bootstrap_auroc_difference(y, s_best, s_ens, n_boot=n_boot, seed=seed))
    rec["delong"] = asdict(delong_auroc_difference(y, s_best, s_ens))
    return rec


def versus_table(rec: dict) -> pd.DataFrame:
    """versus_best as one formatted row (percentage points, 95% intervals)."""
    f, b, d = rec.get("folds"), rec["bootstrap"], rec["delong"]
    pp = lambda x, key="delta": f"{x[key] * 100:+.2f} [{x['ci_low'] * 100:+.2f}, {x['ci_high'] * 100:+.2f}]"
    p = lambda v: "—" if not np.isfinite(v) else "<0.001" if v < 0.001 else f"{v:.3f}"
    return pd.DataFrame([{
        "OOF BA best / ensemble (%)": f"{rec['best_oof_ba'] * 100:.2f} / {rec['ensemble_oof_ba'] * 100:.2f}",
        "Δ CV AUROC, folds (pp) [t 95% CI]": pp(f, "mean_diff") if f else "—",
        "paired t p": p(f["t_pvalue"]) if f else "—", "Wilcoxon p": p(f["wilcoxon_pvalue"]) if f else "—",
        "OOF AUROC best / ensemble (%)": f"{b['auroc_a'] * 100:.2f} / {b['auroc_b'] * 100:.2f}",
        "Δ OOF AUROC (pp) [bootstrap 95% CI]": pp(b), "bootstrap p": p(b["p_value"]), "DeLong p": p(d["p_value"]),
    }], index=pd.Index([rec["best_row"]], name="Best single row"))

