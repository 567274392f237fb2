"""Mixed precision by capability (models/precision.py): bf16 where a GPU has it natively, fp16 with
a gradient scaler on older GPUs (faked capabilities: no GPU needed), fp32 on a CPU, overrides; the
scaler's steps; a fold trained in fp16 on the CPU, with the choice logged on its run."""
import contextlib

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from analysis import keys
from data_tools.errors import ConfigError
from data_tools.ingest import ingest
from models.backbones import resolve_backbone
from models.classifier import build_classifier, predict_logits
from models.precision import backward_step, choose_precision
from pipelines.config import build
from pipelines.train_cv import TrainCVConfig, run_train_cv


@pytest.mark.parametrize("capability, name", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_is_bf16_where_native_else_fp16_with_a_scaler(capability, name):
    chosen = choose_precision("auto", "cuda", capability=capability)  # T4, V100, A100, H100
    assert (chosen.name, chosen.dtype, chosen.scaled) == (name, getattr(torch, {"fp16": "float16",
                                                                                "bf16": "bfloat16"}[name]),
                                                         name == "fp16")


def test_a_cpu_computes_in_fp32_and_an_explicit_precision_wins():
    cpu = choose_precision("auto", "cpu")
    assert cpu.name == "fp32" and not cpu.scaled and isinstance(cpu.autocast(), contextlib.nullcontext)
    assert not cpu.scaler().is_enabled()
    assert choose_precision("fp32", "cuda", capability=(9, 0)).name == "fp32"
    assert choose_precision("bf16", "cuda", capability=(7, 5)).name == "bf16"  # asked: emulated, but as asked
    assert choose_precision("fp16", "cuda", capability=(9, 0)).scaled
    fp16_cpu = choose_precision("fp16", "cpu")
    assert fp16_cpu.scaler().is_enabled() and isinstance(fp16_cpu.autocast(), torch.autocast)
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, fp16, bf16; got 'half'"):
        choose_precision("half", "cpu")


def test_the_fp16_scaler_steps_and_skips_a_step_whose_gradients_overflowed():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fp16 = choose_precision("fp16", "cpu")
    scaler = fp16.scaler()
    x = torch.randn(4, 8)

    def step(factor: float) -> torch.Tensor:
        before = model[0].weight.detach().clone()
        with fp16.autocast():
            z = model(x)
        assert z.dtype == torch.float16
        backward_step(z.float().square().mean() * factor, opt, scaler)
        return model[0].weight.detach() - before

    assert step(1.0).abs().max() > 0 and scaler.get_scale() == 2.0 ** 16  # a step, at the initial scale
    assert step(1e6).abs().max() == 0 and scaler.get_scale() == 2.0 ** 15  # fp16 overflow: skipped, scale halved
    assert step(1.0).abs().max() > 0  # and training goes on


def test_inference_honours_the_precision_it_is_given():
    spec = resolve_backbone("lunit", "demo")
    torch.manual_seed(0)
    model = build_classifier(spec).eval()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8))
    cpu = torch.device("cpu")
    with torch.inference_mode():
        fp32 = predict_logits(model, spec, images, cpu)  # the CPU's own choice: fp32
        fp16 = predict_logits(model, spec, images, cpu, precision=choose_precision("fp16", cpu))
    assert 0 < (fp32 - fp16).abs().max() < 0.05  # rounded to fp16, not another model


@pytest.mark.slow  # a model registered or trained end to end: ~5-10 s
def test_a_fold_trains_in_fp16_with_the_scaler_and_its_run_says_so(tmp_path, tracking):
    store, _ = ingest("demo", None, tmp_path / "demo40", folds=2, seed=0, size=40)
    cfg = build(TrainCVConfig, "demo", data=str(store.path), backbone="lunit", folds="1", epochs=1, batch_size=8,
                precision="fp16", augment="none", workroot=str(tmp_path / "work"))
    client = MlflowClient()
    parent = client.get_run(run_train_cv(cfg))
    assert parent.data.params[keys.P_PRECISION] == "fp16"  # as asked
    (fold,) = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert fold.data.params[keys.P_PRECISION] == "fp16"  # as computed
    assert np.isfinite(fold.data.metrics[keys.TRAIN_LOSS]) and 0 <= parent.data.metrics[keys.CV_AUROC_MEAN] <= 1
    # the default, auto, resolves on this CPU to fp32, which is what the fold runs log
    assert choose_precision(build(TrainCVConfig, "demo").precision, "cpu").name == "fp32"
