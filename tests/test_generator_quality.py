"""Generator quality metrics named for what they compute: the FID Inception from a weights file
(the real architecture, random values: no download), its metric names, the errors for a missing
or wrong file, the exact FID without a d x d square root, and the report's table of features."""
from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy import linalg

from analysis import keys
from analysis.quality import FID_COLUMN, KID_COLUMN, quality_table
from analysis.queries import TrainRow
from data_tools.constants import ATYPICAL
from data_tools.demo import make_demo
from data_tools.errors import ConfigError, UserError
from models.generator_quality import FEATURE_SETS, fid, quality_report
from pipelines.config import build
from pipelines.synthesize import SynthConfig


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    """A state dict of the FID Inception-v3 (torchvision's Inception3 with FID's 1008 classes and
    no auxiliary head has its names and shapes), random values."""
    from torchvision.models import inception_v3
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False).state_dict(), path)
    return path


@pytest.mark.slow  # builds Inception and scores crops: ~4-6 s
def test_given_the_fid_weights_inception_computes_the_fid_under_its_own_name(fid_weights):
    crops = make_demo(15, seed=3, size=32)[0]
    train, synthetic, unseen = crops[:6], crops[6:12], crops[12:]
    metrics, _ = quality_report(synthetic, np.full(6, ATYPICAL), train, np.full(6, ATYPICAL), unseen, max_n=3,
                                features=("descriptor", "inception"), fid_weights=str(fid_weights))
    fid_key = keys.quality_metric(keys.FID, "atypical", features=keys.FID_INCEPTION)
    assert fid_key == "fid_fid_inception_atypical" and np.isfinite(metrics[fid_key]) and metrics[fid_key] > 0
    assert keys.quality_metric(keys.KID, "atypical", features=keys.FID_INCEPTION) in metrics
    assert keys.quality_metric(keys.KID, "atypical") in metrics  # the descriptor's, named as before
    assert not any(keys.IMAGENET_INCEPTION in k for k in metrics)  # torchvision's network was not asked for
    assert set(FEATURE_SETS) == {keys.DESCRIPTOR_FEATURES, keys.IMAGENET_INCEPTION, keys.FID_INCEPTION}


def test_a_missing_or_wrong_fid_weights_file_is_a_one_line_error_naming_it(tmp_path):
    crops = make_demo(4, seed=1, size=32)[0]
    labels = np.full(2, ATYPICAL)
    wrong = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), wrong)
    code = tmp_path / "code.pth"
    torch.save({"weights": torch.zeros(1), "object": ConfigError("not a tensor")}, code)
    for path, why in ((tmp_path / "absent.pth", "no such file"), (wrong, "is not the FID Inception-v3 weights"),
                      (code, "is not the FID Inception-v3 weights")):
        with pytest.raises(UserError) as e:
            quality_report(crops[:2], labels, crops[2:], labels, crops[2:], features=("inception",),
                           fid_weights=str(path))
        assert str(path) in str(e.value) and why in str(e.value) and "\n" not in str(e.value)


def test_synthesize_refuses_fid_weights_without_the_inception_features():
    cfg = build(SynthConfig, "demo", finetune_run_id="x", fid_weights="weights.pth")
    with pytest.raises(ConfigError, match="fid_weights=weights.pth is given but features=descriptor"):
        cfg.feature_sets()
    assert build(SynthConfig, "demo", finetune_run_id="x").feature_sets() == [keys.DESCRIPTOR_FEATURES]
    with_weights = build(SynthConfig, "demo", finetune_run_id="x", features="descriptor,inception", fid_weights="w")
    assert with_weights.feature_sets() == [keys.DESCRIPTOR_FEATURES, keys.FID_INCEPTION]
    without = build(SynthConfig, "demo", finetune_run_id="x", features="descriptor,inception")
    assert without.feature_sets() == [keys.DESCRIPTOR_FEATURES, keys.IMAGENET_INCEPTION]


@pytest.mark.parametrize("n, m, d", [(50, 40, 5), (6, 9, 300)])  # more samples than features, and fewer
def test_fid_equals_its_definition(n, m, d):
    """|mu1 - mu2|^2 + tr(S1 + S2) - 2 tr(sqrt(S1 S2)), the last from the eigenvalues of S1 S2."""
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(n, d)), rng.normal(0.3, 1.5, size=(m, d)) @ rng.normal(size=(d, d))
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root_trace = np.sqrt(np.clip(linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    expected = ((real.mean(0) - fake.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * root_trace
    assert fid(real, fake) == pytest.approx(expected, rel=1e-6)


def test_the_report_says_what_each_synthesize_runs_kid_and_fid_were_computed_on(tracking):
    client = MlflowClient()
    with mlflow.start_run() as synth:
        mlflow.log_metrics({keys.quality_metric(keys.KID, "atypical"): 0.012,
                            keys.quality_metric(keys.FID, "atypical"): 3.5,
                            keys.quality_metric(keys.KID, "atypical", features=keys.FID_INCEPTION): 0.002,
                            keys.quality_metric(keys.FID, "atypical", features=keys.FID_INCEPTION): 41.0})
    with mlflow.start_run() as train:
        mlflow.log_param(keys.P_SYNTH_RUN_ID, synth.info.run_id)
    row = TrainRow("convnext", keys.SYNTH_BALANCED, client.get_run(train.info.run_id))
    table, skipped = quality_table(client, [row])
    assert not skipped and list(table["features"]) == [FEATURE_SETS["descriptor"], FEATURE_SETS["fid_inception"]]
    assert list(table[KID_COLUMN]) == pytest.approx([12.0, 2.0]) and list(table[FID_COLUMN]) == [3.5, 41.0]
    assert "comparable with published FID values" in table["features"].iloc[1]
    assert "not comparable" in table["features"].iloc[0]
