"""The report from runs logged with known values through the real MLflow client: Tables 1 and 2
cell by cell (the paper's own numbers), the regime statistics against scipy/scikit-learn,
the chosen row, and plain sentences for everything a run lacks."""
from __future__ import annotations

import ast
import builtins
import importlib.metadata
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from packaging.requirements import Requirement
from scipy import stats
from sklearn.metrics import roc_auc_score

from analysis import keys, runs, submission
from analysis.queries import ReportDataError, train_rows
from analysis.runs import experiment_ids
from analysis.serving import EnsemblePyfunc
from analysis.stats import bootstrap_auroc_difference, delong_auroc_difference, paired_fold_test
from data_tools.demo import make_demo
from data_tools.images import encode_png_base64
from pipelines import report

ROOT = Path(__file__).resolve().parents[1]

# The paper's Table 1 (fold AUROCs) and Table 2, as fractions.
PAPER_T1 = {
    ("convnext", "real_only"): [0.9384, 0.9474, 0.9363, 0.9568, 0.9521],
    ("convnext", "synth_balanced"): [0.9355, 0.9440, 0.9374, 0.9522, 0.9496],
    ("lunit", "real_only"): [0.9422, 0.9497, 0.9413, 0.9525, 0.9531],
    ("lunit", "synth_balanced"): [0.9383, 0.9449, 0.9396, 0.9508, 0.9478],
}
PAPER_T1_MEAN_SD = {("convnext", "real_only"): "94.62 ± 0.78", ("convnext", "synth_balanced"): "94.37 ± 0.65",
                    ("lunit", "real_only"): "94.78 ± 0.50", ("lunit", "synth_balanced"): "94.43 ± 0.48"}
PAPER_T2 = {  # auroc, accuracy, sensitivity, specificity, ba
    ("convnext", "real_only"): [0.9542, 0.8861, 0.8873, 0.8858, 0.8866],
    ("convnext", "synth_balanced"): [0.9499, 0.8889, 0.8732, 0.8927, 0.8830],
    ("lunit", "real_only"): [0.9381, 0.8639, 0.8592, 0.8651, 0.8621],
    ("lunit", "synth_balanced"): [0.9401, 0.8833, 0.8873, 0.8823, 0.8848],
}
LABELS = {("convnext", "real_only"): "ConvNeXt-Small (real)", ("convnext", "synth_balanced"): "ConvNeXt-Small (real+synth)",
          ("lunit", "real_only"): "Lunit SSL (real)", ("lunit", "synth_balanced"): "Lunit SSL (real+synth)"}


def oof_frame(seed: int, shift: float, n: int = 400) -> list[pd.DataFrame]:
    """Out-of-fold predictions of one row, one frame per fold; the same samples in every row."""
    rng = np.random.default_rng(0)
    y = (rng.random(n) < 0.25).astype(int)
    noise = np.random.default_rng(seed).normal(0, 1, n)
    prob = 1 / (1 + np.exp(-(noise + (1.6 + shift) * (2 * y - 1))))
    df = pd.DataFrame({"sample_id": [f"s{i:04d}" for i in range(n)], "label": y, "prob": prob})
    return [df.iloc[i::5] for i in range(5)]


def log_train(key, fold_aurocs, oof: list[pd.DataFrame] | None = None, status: str = "FINISHED",
              skip_fold: int | None = None) -> str:
    backbone, regime = key
    with mlflow.start_run(run_name=f"{backbone}-{regime}",
                          tags={keys.STEP: keys.TRAIN_CV, keys.PROFILE: "demo", keys.BACKBONE: backbone,
                                keys.REGIME: regime}) as parent:
        mlflow.log_params({keys.P_BACKBONE: backbone, keys.P_REGIME: regime, keys.P_FOLDS: "all",
                           keys.P_EPOCHS: 1, keys.P_SYNTH_RUN_ID: ""})
        for k, v in enumerate(fold_aurocs, 1):
            if k == skip_fold:
                continue
            mlflow.log_metrics({keys.fold_metric(k, "auroc"): v, keys.fold_metric(k, "ba"): v - 0.05})
            with mlflow.start_run(nested=True, tags={keys.STEP: keys.TRAIN_CV, keys.FOLD: str(k)}):
                mlflow.log_metric(keys.BEST_VAL_AUROC, v)
                if oof is not None:
                    mlflow.log_text(oof[k - 1].to_csv(index=False), keys.VAL_PREDICTIONS)
        mlflow.log_metrics({keys.CV_AUROC_MEAN: float(np.mean(fold_aurocs)), keys.CV_AUROC_STD: float(np.std(fold_aurocs))})
    if status != "FINISHED":
        mlflow.tracking.MlflowClient().set_terminated(parent.info.run_id, status)
    return parent.info.run_id


def log_eval(train_run_id: str, values, test_set: str = "prelim", predictions: pd.DataFrame | None = None) -> str:
    with mlflow.start_run(tags={keys.STEP: keys.EVALUATE, keys.PROFILE: "demo", keys.TEST_SET: test_set}) as run:
        mlflow.log_params({keys.P_TRAIN_RUN_ID: train_run_id, keys.P_THRESHOLD: "0.4", keys.P_TEST_DIGEST: "abc"})
        mlflow.log_metrics({keys.test_metric(m): v for m, v in zip(keys.TEST_METRICS, values)})
        mlflow.log_metrics({keys.test_metric("ba", "breast"): values[4] - 0.01, keys.test_metric("ba", "dog lymphoma"): 0.5})
        if predictions is not None:
            mlflow.log_text(predictions.to_csv(index=False), keys.PREDICTIONS)
    return run.info.run_id


def artifacts_of(run_id: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(dst)))


@pytest.fixture
def paper_runs(tracking):
    """The paper's four rows (plus an older finished run and a newer failed one, to be ignored)."""
    old = log_train(("convnext", "real_only"), [0.5] * 5)
    ids = {}
    for i, key in enumerate(PAPER_T1):
        ids[key] = log_train(key, PAPER_T1[key], oof=oof_frame(seed=i, shift=0.1 * i))
        preds = pd.DataFrame({"sample_id": ["t0", "t1", "t2", "t3", "t4"], "label": [0, 1, 0, 1, -1],  # t4 unlabelled
                              "prob": [0.1, 0.8, 0.3, 0.6 - 0.1 * i, 0.5]})
        log_eval(ids[key], PAPER_T2[key], predictions=preds)
    log_train(("lunit", "real_only"), [0.99] * 5, status="FAILED")
    return {"ids": ids, "old": old}


@pytest.mark.slow
def test_tables_cell_by_cell_and_the_chosen_rows(paper_runs, tmp_path, capsys):
    summary = report.main(["--register", "false", "--n_boot", "200"])
    printed = capsys.readouterr().out
    ids = paper_runs["ids"]
    assert summary["rows"] == {LABELS[k]: ids[k] for k in PAPER_T1}  # the newest finished run of each row
    assert summary["selection"]["train_run_id"] == ids[("convnext", "real_only")]  # paper: highest test AUROC
    assert summary["selection"]["threshold"] == 0.4  # the evaluate run's own threshold

    report_run = mlflow.search_runs(filter_string=f"tags.{keys.STEP} = '{keys.REPORT}'", output_format="list")[0]
    assert report_run.data.tags[keys.SELECTED_TRAIN_RUN] == ids[("convnext", "real_only")]
    out = artifacts_of(report_run.info.run_id, tmp_path / "a")
    expected = {"table1.md", "table1.csv", "table1.tex", "table2.md", "table2.csv", "table2.tex", "comparison.md",
                "comparison.csv", "comparison.tex", "comparison.json", "fold_auroc.png", "test_roc.png",
                "calibration.png", "report.md", "table2_domains_ba.csv"}
    assert expected <= {p.name for p in out.iterdir()}

    # Table 1, cell by cell, in Markdown (the paper's printed numbers) and CSV (full precision)
    md = (out / "table1.md").read_text().splitlines()
    header = [c.strip() for c in md[2].strip("|").split("|")]
    assert header == ["Model", "F1", "F2", "F3", "F4", "F5", "Mean ± SD"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in md[4:]]
    assert [r[0] for r in body] == [LABELS[k] for k in PAPER_T1]  # the paper's row order
    for cells, key in zip(body, PAPER_T1):
        assert cells[1:6] == [f"{v * 100:.2f}" for v in PAPER_T1[key]]
        assert cells[6] == PAPER_T1_MEAN_SD[key]
    csv = pd.read_csv(out / "table1.csv", index_col="Model")
    for key, values in PAPER_T1.items():
        assert csv.loc[LABELS[key], "SD"] == pytest.approx(np.std(np.array(values) * 100, ddof=0))
        assert csv.loc[LABELS[key], "train_run_id"] == ids[key]
    assert r"94.62 $\pm$ 0.78" in (out / "table1.tex").read_text()

    # Table 2, cell by cell
    t2 = pd.read_csv(out / "table2.csv", index_col="Model")
    assert list(t2.columns[-5:]) == ["AUROC", "Accuracy", "Sensitivity", "Specificity", "Bal. Acc."]
    for key, values in PAPER_T2.items():
        assert t2.loc[LABELS[key]].iloc[-5:].to_numpy(float) == pytest.approx(np.array(values) * 100)
    md2 = (out / "table2.md").read_text()
    assert "| ConvNeXt-Small (real) | 95.42 | 88.61 | 88.73 | 88.58 | 88.66 |" in md2
    domains = pd.read_csv(out / "table2_domains_ba.csv", index_col="Model")
    assert domains.loc["Lunit SSL (real)", "breast"] == pytest.approx(86.21 - 1)
    assert "Table 1" in printed and "94.62 ± 0.78" in printed

    # the comparison: one record per backbone, synth minus real
    comparison = json.loads((out / "comparison.json").read_text())
    assert [c["backbone"] for c in comparison] == ["convnext", "lunit"]
    conv = comparison[0]["folds"]
    d = np.array(PAPER_T1[("convnext", "synth_balanced")]) - np.array(PAPER_T1[("convnext", "real_only")])
    assert conv["mean_diff"] == pytest.approx(d.mean())
    assert conv["t_pvalue"] == pytest.approx(stats.ttest_rel(PAPER_T1[("convnext", "synth_balanced")],
                                                             PAPER_T1[("convnext", "real_only")]).pvalue)


    # the runs the user names, instead of the latest per row
    named = [ids[("lunit", "synth_balanced")], paper_runs["old"]]
    assert report.main(["--register", "false", "--n_boot", "20", "--runs", ",".join(named)])["rows"] == {
        "Lunit SSL (real+synth)": named[0], "ConvNeXt-Small (real)": named[1]}

    # the other criteria choose their own rows (on the same runs)
    for criterion, winner in (("cv_auroc", ("lunit", "real_only")), ("test_ba", ("convnext", "real_only"))):
        chosen = report.main(["--register", "false", "--n_boot", "20", "--select_by", criterion])["selection"]
        assert chosen["train_run_id"] == ids[winner]
        assert chosen["value"] == pytest.approx(np.mean(PAPER_T1[winner]) if criterion == "cv_auroc" else PAPER_T2[winner][4])


def test_statistics_match_scipy_and_sklearn():
    a = {1: 0.90, 2: 0.93, 3: 0.91, 4: 0.95, 5: 0.92}
    b = {1: 0.91, 2: 0.935, 3: 0.905, 4: 0.96, 5: 0.94}
    t = paired_fold_test(a, b)
    xa, xb = list(a.values()), list(b.values())
    assert t.t_pvalue == pytest.approx(stats.ttest_rel(xb, xa).pvalue)
    assert t.wilcoxon_pvalue == pytest.approx(stats.wilcoxon(xb, xa).pvalue)
    ci = stats.ttest_rel(xb, xa).confidence_interval()
    assert (t.ci_low, t.ci_high) == pytest.approx((ci.low, ci.high))

    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.3).astype(int)
    p_a = np.round(rng.random(300) * 0.6 + 0.3 * y, 2)  # rounded: ties on purpose
    p_b = np.round(rng.random(300) * 0.6 + 0.4 * y, 2)
    boot = bootstrap_auroc_difference(y, p_a, p_b, n_boot=400, seed=0)
    assert boot.auroc_a == pytest.approx(roc_auc_score(y, p_a))
    assert boot.auroc_b == pytest.approx(roc_auc_score(y, p_b))
    assert boot.ci_low < boot.delta < boot.ci_high
    # the bootstrap draws, recomputed with sklearn, give the same interval
    r = np.random.default_rng(0)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    idx = np.concatenate([r.choice(pos, (200, len(pos))), r.choice(neg, (200, len(neg)))], axis=1)
    deltas = [roc_auc_score(y[i], p_b[i]) - roc_auc_score(y[i], p_a[i]) for i in idx]
    small = bootstrap_auroc_difference(y, p_a, p_b, n_boot=200, seed=0, chunk=200)
    assert (small.ci_low, small.ci_high) == pytest.approx(tuple(np.quantile(deltas, [0.025, 0.975])))

    # DeLong: its variance from the definition (pairwise kernel), computed here independently
    delong = delong_auroc_difference(y, p_a, p_b)
    psi = lambda p: (p[y == 1][:, None] > p[y == 0][None, :]) + 0.5 * (p[y == 1][:, None] == p[y == 0][None, :])
    v10 = np.vstack([psi(p).mean(1) for p in (p_a, p_b)])
    v01 = np.vstack([psi(p).mean(0) for p in (p_a, p_b)])
    s = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    se = np.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    assert delong.delta == pytest.approx(roc_auc_score(y, p_b) - roc_auc_score(y, p_a))
    assert delong.p_value == pytest.approx(2 * stats.norm.sf(abs(delong.delta) / se))


@pytest.mark.slow  # a model registered or trained end to end: ~5-10 s
def test_missing_pieces_are_reported_not_fatal(tracking, capsys):
    complete = log_train(("convnext", "real_only"), PAPER_T1[("convnext", "real_only")])  # no OOF predictions
    log_train(("convnext", "synth_balanced"), PAPER_T1[("convnext", "synth_balanced")], skip_fold=3)
    lunit_real = log_train(("lunit", "real_only"), PAPER_T1[("lunit", "real_only")], oof=oof_frame(0, 0.0))
    lunit_synth = log_train(("lunit", "synth_balanced"), PAPER_T1[("lunit", "synth_balanced")])  # no OOF
    log_train(("vit_small", "real_only"), [0.9] * 5, status="RUNNING")
    summary = report.main(["--register", "false", "--n_boot", "50"])
    printed = capsys.readouterr().out
    assert summary["rows"] == {"ConvNeXt-Small (real)": complete, "Lunit SSL (real)": lunit_real,
                               "Lunit SSL (real+synth)": lunit_synth}
    assert "convnext/synth_balanced" in printed and "fold 3 is missing (no metric fold3_auroc, no finished fold run)" in printed
    assert "vit_small/real_only: no finished train_cv run (found 1: RUNNING)" in printed
    assert "Table 2: no finished evaluate run of any row" in printed
    assert "ConvNeXt-Small: no synth_balanced row, nothing to compare" in printed
    assert re.search(r"Lunit SSL: out-of-fold AUROC difference skipped \(synth_balanced: fold 1 run \w{8} has no "
                     r"val_predictions.csv\)", printed)
    assert "| Lunit SSL | -0.35 [-0.56, -0.14] | 0.010 | 0.062 | — |" in printed  # the fold test still made
    assert "Figures: test ROC curves: no test predictions" in printed
    assert "Submission: no row selected by test_auroc: no evaluate runs" in printed
    with pytest.raises(SystemExit, match="no experiment 'nope'"):
        report.main(["--experiment", "nope"])
    with pytest.raises(ReportDataError, match="fold 3 is missing"):
        train_rows(mlflow.tracking.MlflowClient(), experiment_ids(mlflow.tracking.MlflowClient(), "test"), strict=True)


def test_rows_are_named_for_what_trained():
    from analysis.tables import row_label
    assert row_label("convnext", "real_only") == "ConvNeXt-Small (real)"
    demo = {"backbone_set": "demo", "pretrained": "none"}
    assert row_label("convnext", "real_only", recipe=demo) == "ConvNeXt-Atto-shaped [demo, scratch] (real)"
    assert row_label("lunit", "synth_balanced", "lodo", demo) == "ViT-Tiny-width/8 [demo, scratch] (real+synth) [LODO]"
    sota = {"finetune": "lora", "lora_rank": "8", "loss": "domain_focal", "augment": "strong"}
    assert row_label("uni2", "real_only", recipe=sota) == "UNI2-h + LoRA r8 [domain focal, strong aug] (real)"
    assert row_label("lunit", "real_only", recipe={"pretrained": "/w/lunit.pth"}) == "Lunit SSL [weights lunit.pth] (real)"


@pytest.mark.slow  # a model registered or trained end to end: ~5-10 s
def test_a_second_report_with_nothing_changed_registers_no_new_version(tiny_train_run, capsys):
    """The registered version describes itself; report registers again only when the selection
    (members, threshold rule, TTA) differs from the alias's version, and says which it did."""
    client = MlflowClient()
    log_eval(tiny_train_run, [0.9, 0.8, 0.7, 0.85, 0.775])
    first = report.main(["--register", "yes", "--n_boot", "20"])["registered"]
    assert first["new"] and str(first["version"]) == "1"
    assert "submission: registered models:/atypical-mitosis-classifier/1 (alias submission): no version had alias" \
        in capsys.readouterr().out

    second = report.main(["--register", "yes", "--n_boot", "20"])["registered"]
    printed = capsys.readouterr().out
    assert not second["new"] and str(second["version"]) == "1"
    assert [line for line in printed.splitlines() if line.startswith("submission:")] == [
        "submission: no new version: models:/atypical-mitosis-classifier/1 (alias submission) kept, version 1 has the "
        "same members, threshold rule and TTA"]
    assert len(client.search_model_versions(f"name = '{keys.MODEL_NAME}'")) == 1

    # what the version says: rule and value, row and members, CV and test figures, digests, threshold rule, TTA
    version = client.get_model_version_by_alias(keys.MODEL_NAME, keys.SUBMISSION_ALIAS)
    t = version.tags
    folds = {k: r.info.run_id for k, r in runs.fold_runs(client, tiny_train_run).items()}
    members = json.loads(t[keys.V_MEMBERS])
    assert set(members) == {"fold1", "fold2"} and all(m.startswith("m-") for m in members.values())
    assert json.loads(t[keys.V_MEMBER_RUNS]) == {f"fold{k}": r for k, r in folds.items()}
    assert {client.get_logged_model(m).source_run_id for m in members.values()} == set(folds.values())
    assert t["selected_by"] == "test_auroc" and float(t[keys.V_SELECTED_VALUE]) == 0.9
    assert t[keys.V_ROWS_COMPARED] == "1"
    assert t[keys.V_ROW] == "ConvNeXt-Small (real)" and t["train_run_id"] == tiny_train_run
    assert float(t[keys.test_metric("ba")]) == 0.775 and t[keys.TEST_SET] == "prelim"
    assert t[keys.P_TEST_DIGEST] == "abc" and keys.P_DATA_DIGEST in t
    assert t[keys.V_THRESHOLD_RULE] == "0.4" and float(t["threshold"]) == 0.4 and t[keys.P_TTA] == "none"
    assert json.loads(t[keys.V_SELECTION]) == {"members": members, "threshold": 0.4, "fold_thresholds": None,
                                               "tta": "none"}
    for words in ("selected by test_auroc = 90.00%", "the highest of 1 row(s)", *members.values(),
                  "Test set prelim", "test store `abc`", "Threshold rule: 0.4: threshold 0.4", "TTA: none"):
        assert words in version.description, words
    # the report run took the fold models as inputs and logged the submission model as its output
    run = client.get_run(version.run_id)
    assert {i.model_id for i in run.inputs.model_inputs} == set(members.values())
    [submission] = run.outputs.model_outputs
    assert version.source == f"models:/{submission.model_id}"
    assert client.get_logged_model(submission.model_id).tags[keys.V_MEMBERS] == t[keys.V_MEMBERS]

    # a newer evaluate run with TTA is another model: a new version, and the line says why
    client.log_param(log_eval(tiny_train_run, [0.9, 0.8, 0.7, 0.85, 0.775]), keys.P_TTA, "d4")
    third = report.main(["--register", "yes", "--n_boot", "20"])["registered"]
    assert third["new"] and str(third["version"]) == "2"
    assert "submission: registered models:/atypical-mitosis-classifier/2 (alias submission): TTA changed from " \
           "version 1" in capsys.readouterr().out
    assert client.get_model_version_by_alias(keys.MODEL_NAME, keys.SUBMISSION_ALIAS).tags[keys.P_TTA] == "d4"


PROJECT = ("analysis", "models", "data_tools", "pipelines")


def _import_time_names(module: str) -> set[str]:
    """What importing a project module runs, with the project modules it imports in turn: every import
    statement outside a function body (and outside `if TYPE_CHECKING:`), as dotted names."""
    root, names, seen, todo = ROOT, set(), set(), [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        candidates = [root.joinpath(*parts[:n]).with_suffix(".py") for n in range(len(parts), 0, -1)] + \
                     [root.joinpath(*parts[:n], "__init__.py") for n in range(len(parts), 0, -1)]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None or path in seen:
            continue
        seen.add(path)
        rel = path.relative_to(root).with_suffix("").parts
        todo += [".".join(rel[:n]) for n in range(1, len(rel))]  # its packages' __init__ run first
        stmts = list(ast.parse(path.read_text()).body)
        while stmts:
            node = stmts.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                    isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)):
                continue
            found = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                     if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            names.update(found)
            todo += [f for f in found if f.split(".")[0] in PROJECT]
            stmts += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]
    return names


def test_the_served_model_requires_what_serving_imports_and_no_training_stack(tiny_checkpoints, tmp_path):
    """The pyfunc's requirements against what loading and predicting import (a fresh environment
    from an index is too slow for the suite): the model's code loads and scores a crop here while
    every import statement the project's code runs is recorded, plus everything importing the
    modules it reached runs. Each distribution imported is declared or comes with one declared;
    each one declared is imported or comes with one; none is the training stack's."""
    ran, real_import = set(), builtins.__import__

    def recording(name, globals=None, locals=None, fromlist=(), level=0):
        caller = (globals or {}).get("__name__", "")
        if level == 0 and caller.split(".")[0] in PROJECT:
            ran.update([name, *(f"{name}.{f}" for f in fromlist or ())])
        return real_import(name, globals, locals, fromlist, level)

    image = make_demo(1, seed=3)[0][0]
    builtins.__import__ = recording
    members = {f"fold{k}": str(d) for k, d in enumerate(tiny_checkpoints, 1)}
    try:  # what MLflow runs: analysis/pyfunc_model.py's model, load_context with the artifacts, then predict
        model = EnsemblePyfunc()
        model.load_context(SimpleNamespace(artifacts=members, model_config={"threshold": 0.5, "device": "cpu"}))
        out = model.predict(None, pd.DataFrame({"image": [encode_png_base64(image)]}), {"tta": "flips"})
        model.predictor.predict(np.stack([image, image]), chunk=1)  # a request longer than a chunk shows progress
    finally:
        builtins.__import__ = real_import
    assert list(out.columns) == ["probability", "class"]
    names = _import_time_names("analysis.pyfunc_model") | ran
    for project_module in {n for n in ran if n.split(".")[0] in PROJECT}:
        names |= _import_time_names(project_module)
    assert not {n for n in names if n.split(".")[0] == "pipelines"}
    providers = importlib.metadata.packages_distributions()
    tops = {n.split(".")[0] for n in names} - set(PROJECT) - set(sys.stdlib_module_names) - {"__future__"}
    norm = lambda name: name.lower().replace("_", "-")
    imported = {norm(d) for top in tops for d in providers.get(top, [top])}
    imported -= {"mlflow", "mlflow-tracing"}  # `mlflow` is one import name of three distributions: skinny has it all

    def brought(names):  # what the distributions named install with them (their unconditional requirements)
        return {norm(req.name) for name in names for r in importlib.metadata.requires(name) or []
                if (req := Requirement(r)).marker is None or req.marker.evaluate({"extra": ""})}

    declared = {norm(Requirement(r).name) for r in submission.serving_requirements(adapters=False)}
    assert imported - declared - brought(declared) == set(), sorted(imported)
    assert declared - imported - brought(imported) == set(), sorted(imported)
    training = {"openslide-python", "openslide-bin", "psycopg2-binary", "optuna", "diffusers", "accelerate",
                "matplotlib", "scikit-learn", "scipy", "psutil", "nvidia-ml-py", "mlflow", "peft"}
    assert not declared & training and not imported & training
    assert "torch==2.14.1" in submission.serving_requirements(adapters=False)
    # adapter members (lora, linear) rebuild their adapters with peft (models/finetune.py imports it then)
    assert {norm(Requirement(r).name) for r in submission.serving_requirements(adapters=True)} == declared | {"peft"}
    assert "from peft import" in (ROOT / "models" / "finetune.py").read_text()
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "config.json").write_text(json.dumps({"finetune": {"mode": "lora"}}))
    assert not submission.has_adapters(members) and submission.has_adapters({**members, "fold3": str(lora)})
