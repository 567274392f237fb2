"""Leave one domain out: a store split by domain (one fold per domain or merged group, recorded in
the manifest), the generator's fold k never sees domain k, train_cv logs which domain each fold
holds out, and the report's domain table and domain-gap figure."""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from analysis import keys
from data_tools.folds import FoldError, domain_folds, merge_small_domains
from data_tools.ingest import ingest
from data_tools.provenance import fold_train_ids
from pipelines import report
from pipelines.config import build
from pipelines.train_cv import TrainCVConfig, parent_params
from test_report import artifacts_of, log_train


@pytest.fixture(scope="module")
def lodo_store(tmp_path_factory):
    store, _ = ingest("demo", None, tmp_path_factory.mktemp("lodo") / "demo_lodo", folds=5, seed=0, size=400,
                      split="lodo", split_by="domain")
    return store


def test_one_fold_per_domain_and_no_domain_in_two_folds(lodo_store):
    index = lodo_store.index
    domains = sorted(index["domain"].unique())
    assert lodo_store.folds == list(range(1, len(domains) + 1)) and len(domains) == 4
    assert index.groupby("domain")["fold"].nunique().eq(1).all()  # no domain in two folds
    assert index.groupby("fold")["domain"].nunique().eq(1).all()  # no fold with two domains
    split = lodo_store.manifest["split"]
    assert split["method"] == "leave-one-domain-out" and split["split_by"] == "domain"
    assert {int(k): g for k, g in split["domains"].items()} == {
        k: [index.loc[index["fold"] == k, "domain"].iloc[0]] for k in lodo_store.folds}


def test_the_generator_for_fold_k_never_sees_domain_k(lodo_store):
    for k in lodo_store.folds:
        held_out = set(lodo_store.index.loc[lodo_store.index["fold"] == k, "domain"])
        seen = lodo_store.index[lodo_store.index["sample_id"].isin(fold_train_ids(lodo_store, k))]
        assert len(seen) and held_out.isdisjoint(seen["domain"]), k


def test_small_domains_are_merged_and_the_rule_is_recorded():
    sizes = {"big": 100, "mid": 50, "tiny": 5, "small": 10}
    assert merge_small_domains(sizes, 30) == [["big"], ["mid", "small", "tiny"]]  # 15 < 30: joined to "mid"
    assert merge_small_domains(sizes, 8) == [["big"], ["mid"], ["small", "tiny"]]  # 5 < 8: joined to "small"
    assert merge_small_domains(sizes, 5) == [["big"], ["mid"], ["small"], ["tiny"]]
    rng = np.random.default_rng(0)
    domain = np.repeat(list(sizes), list(sizes.values()))
    index = pd.DataFrame({"sample_id": [f"s{i}" for i in range(len(domain))], "domain": domain,
                          "label": (rng.random(len(domain)) < 0.4).astype(int), "group": "g", "source": "t"})
    index.loc[[0, 100, 150, 155], "label"] = [1, 1, 1, 1]  # every domain has an atypical crop
    index.loc[[1, 101, 151, 156], "label"] = [0, 0, 0, 0]
    folded, spec = domain_folds(index, "domain", min_domain_size=30)
    assert spec["min_domain_size"] == 30 and spec["domains"] == {"1": ["big"], "2": ["mid", "small", "tiny"]}
    assert folded.groupby("domain")["fold"].nunique().eq(1).all()


def test_a_domain_without_atypical_figures_cannot_be_held_out():
    index = pd.DataFrame({"sample_id": list("abcdef"), "domain": ["x", "x", "y", "y", "z", "z"],
                          "label": [0, 1, 0, 1, 0, 0], "group": list("abcdef"), "source": "t"})
    with pytest.raises(FoldError, match="domain z .*no atypical"):
        domain_folds(index)
    with pytest.raises(FoldError, match="not a column"):
        domain_folds(index, "Scanner")


def test_train_cv_logs_the_domain_each_fold_holds_out(lodo_store):
    params = parent_params(build(TrainCVConfig, "demo"), lodo_store)
    assert params[keys.P_SPLIT] == keys.LODO and params[keys.P_SPLIT_BY] == "domain"
    for k in lodo_store.folds:
        assert params[keys.fold_domain_param(k)] == lodo_store.index.loc[lodo_store.index["fold"] == k, "domain"].iloc[0]


def _log_lodo(key, aurocs: dict[str, float]) -> str:
    run_id = log_train(key, list(aurocs.values()))
    client = mlflow.tracking.MlflowClient()
    client.log_param(run_id, keys.P_SPLIT, keys.LODO)
    for k, domain in enumerate(aurocs, 1):
        client.log_param(run_id, keys.fold_domain_param(k), domain)
    return run_id


def test_the_report_builds_the_domain_table_and_the_gap(tracking, tmp_path, capsys):
    grouped = log_train(("convnext", "real_only"), [0.90, 0.92, 0.91, 0.93, 0.89])
    held_out = {"lymphoma": 0.80, "breast": 0.86, "sarcoma": 0.71, "nets": 0.83}
    lodo = _log_lodo(("convnext", "real_only"), held_out)
    lodo_synth = _log_lodo(("convnext", "synth_balanced"), {d: v - 0.02 for d, v in held_out.items()})
    summary = report.main(["--register", "false", "--n_boot", "20"])
    printed = capsys.readouterr().out
    assert summary["rows"] == {"ConvNeXt-Small (real)": grouped, "ConvNeXt-Small (real) [LODO]": lodo,
                               "ConvNeXt-Small (real+synth) [LODO]": lodo_synth}
    assert "Table 1, leave one domain out (AUROC)" in printed
    assert "| Model | lymphoma | breast | sarcoma | nets | Worst | Worst domain | Mean ± SD |" in printed
    assert "| ConvNeXt-Small (real) [LODO] | 80.00 | 86.00 | 71.00 | 83.00 | 71.00 | sarcoma | 80.00 ± 5.61 |" in printed
    assert "Does synthetic balancing help on an unseen domain?" in printed  # paired over the four domains
    assert "slide-grouped CV 91.00, leave one domain out 80.00 (worst domain 71.00); CV minus leave-one-domain-out " \
        "+11.00 pp" in printed
    files = artifacts_of(mlflow.search_runs(filter_string="tags.step = 'report'", output_format="list")[0].info.run_id,
                         tmp_path)
    assert (files / keys.FIG_DOMAIN_GAP).is_file() and (files / f"{keys.TABLE1_DOMAINS}_ba.csv").is_file()
    table = pd.read_csv(files / f"{keys.TABLE1_DOMAINS}_auroc.csv", index_col=0)
    assert table.loc["ConvNeXt-Small (real) [LODO]", "sarcoma"] == pytest.approx(71.0)
