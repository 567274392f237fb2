"""Foundation backbones with LoRA and linear probing: the model cards' architectures (timm's
classes, depth and width shrunk, random init), adapter counts, a training epoch, checkpoints that
keep only what was trained, peft's own adapter files, the ensemble through `predict` and the
pyfunc, and the hub's errors."""
import dataclasses
import json
import re
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from analysis import keys
from analysis.queries import load_row
from analysis.serving import load_predictor
from analysis.submission import log_ensemble_model
from data_tools.images import encode_png_base64
from data_tools.ingest import ingest
from models import backbones
from data_tools.augment import preprocess
from models.checkpoint import TRAINED, WEIGHTS, WEIGHTS_DIR_ENV, CheckpointError, load_checkpoint
from models.classifier import PretrainedWeightsError, build_classifier
from models.finetune import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_finetune, count_params
from models.training import fold_pools, predict_pool, train_fold
from pipelines.config import build
from pipelines.train_cv import TrainCVConfig, run_train_cv

FOUNDATION = ("uni2", "virchow2", "hoptimus0", "dinov3", "dinov3_s")
# the layers the AMi-Br benchmark adapts, named independently of models.finetune's pattern
ADAPTED = re.compile(r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc1_g|fc1_x|fc2))$")


def shrunk(name: str) -> backbones.BackboneSpec:
    """The registry's spec with the model card's arguments, 2 blocks of width 32 at 28/32 px."""
    spec = backbones.resolve_backbone(name, "paper")
    patch = 16 if "dinov3" in name else 14
    kwargs = {**spec.model_kwargs, "depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 2 * patch}
    return dataclasses.replace(spec, model_kwargs=kwargs, input_size=2 * patch)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    store, _ = ingest("demo", None, tmp_path_factory.mktemp("stores") / "demo150", folds=2, seed=0, size=150)
    return store


@pytest.fixture
def tiny_set(monkeypatch):
    """A backbone set `tiny` holding the shrunk foundation models (TrainConfig.spec resolves it)."""
    monkeypatch.setitem(backbones.REGISTRY, "tiny", {n: shrunk(n) for n in FOUNDATION})


def _config(store, backbone: str, pretrained: str, finetune: str, **kw) -> TrainCVConfig:
    cfg = build(TrainCVConfig, "demo", data=str(store.path), backbone="lunit", folds="1", epochs=1, batch_size=32,
                finetune=finetune, pretrained=pretrained, augment="flips", workroot=".work", **kw)
    return dataclasses.replace(cfg, backbone=backbone, backbone_set="tiny")


def _base_file(spec: backbones.BackboneSpec, path) -> str:
    """A weights file as a model card ships it: the backbone without a classifier head."""
    torch.manual_seed(0)
    model = build_classifier(spec)
    model = getattr(model, "backbone", model)
    save_file({k: v for k, v in model.state_dict().items() if not k.startswith("head")}, str(path))
    return str(path)


@pytest.mark.parametrize("name", FOUNDATION)
def test_lora_trains_only_adapters_and_head_and_its_checkpoint_round_trips(name, small_store, tiny_set, tmp_path):
    spec = shrunk(name)
    base = _base_file(spec, tmp_path / f"{name}.safetensors")
    plain = build_classifier(spec, base)
    ft = _config(small_store, name, base, "lora", lora_rank=4).finetune_spec()
    lora = apply_finetune(build_classifier(spec, base), ft)
    linears = {n: m for n, m in plain.named_modules() if ADAPTED.fullmatch(n) and isinstance(m, torch.nn.Linear)}
    assert len(linears) == 2 * (4 if name != "dinov3" else 5)  # qkv, proj, fc1 (SwiGLU: fc1_g + fc1_x), fc2
    head = plain.head  # every registered architecture names its classifier `head`
    expected = sum(4 * (m.in_features + m.out_features) for m in linears.values()) + sum(
        p.numel() for p in head.parameters())
    n, trainable = count_params(lora)
    assert n == sum(p.numel() for p in plain.parameters()) + (trainable - sum(p.numel() for p in head.parameters()))
    assert trainable == expected
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert all("lora_" in t or ".head." in f".{t}" for t in trained), trained

    cfg = _config(small_store, name, base, "lora", lora_rank=4)
    result = train_fold(cfg, small_store, 1, None, tmp_path / "work")
    assert len(result.history) == 1 and np.isfinite(result.history[0].train_loss)
    files = {p.name for p in result.checkpoint.iterdir()}
    assert TRAINED in files and WEIGHTS not in files  # the frozen backbone is not stored again
    model, _, _ = load_checkpoint(result.checkpoint)
    assert not any("lora_" in k for k in model.state_dict())  # merged: a plain timm model again
    _, val = fold_pools(cfg, small_store, 1, None)[:2]
    probs, _ = predict_pool(model, spec, val, torch.device("cpu"))
    np.testing.assert_allclose(probs, result.val_predictions["prob"].to_numpy(), atol=1e-5)


def test_linear_probe_trains_the_head_only(small_store, tiny_set, tmp_path):
    spec = shrunk("virchow2")  # the class token + mean of patch tokens head
    base = _base_file(spec, tmp_path / "virchow2.safetensors")
    model = apply_finetune(build_classifier(spec, base), _config(small_store, "virchow2", base, "linear").finetune_spec())
    assert count_params(model)[1] == 2 * 32 + 1
    result = train_fold(_config(small_store, "virchow2", base, "linear"), small_store, 1, None, tmp_path / "w")
    loaded, _, _ = load_checkpoint(result.checkpoint)
    frozen = build_classifier(spec, base)
    for (n, a), b in zip(loaded.named_parameters(), frozen.parameters()):
        assert torch.equal(a, b) != n.startswith("head"), n  # only the head moved


@pytest.mark.parametrize("name, mode, peft_type", [("dinov3_s", "lora", "LORA"),
                                                    ("virchow2", "linear", "LN_TUNING")])  # a linear probe: the head
def test_peft_loads_the_folds_adapter_with_the_logits_of_the_projects_loader(name, mode, peft_type, small_store,
                                                                              tiny_set, tmp_path):
    from peft import PeftModel

    spec = shrunk(name)
    base = _base_file(spec, tmp_path / f"{name}.safetensors")
    result = train_fold(_config(small_store, name, base, mode, lora_rank=4), small_store, 1, None, tmp_path / "w")
    adapter = json.loads((result.checkpoint / ADAPTER_CONFIG).read_text())
    assert (adapter["peft_type"], adapter["base_model_name_or_path"]) == (peft_type, f"{name}.safetensors")
    assert (result.checkpoint / ADAPTER_WEIGHTS).is_file()
    # what a peft user does: the named base (here the file), then the adapter folder
    with_peft = PeftModel.from_pretrained(build_classifier(spec, base), str(result.checkpoint)).eval()
    ours, _, _ = load_checkpoint(result.checkpoint)
    x = preprocess(torch.from_numpy(np.array(small_store.images[:8])), spec.input_size, spec.mean, spec.std,
                   torch.device("cpu"))
    with torch.inference_mode():
        expected = ours(x).reshape(-1)
        torch.testing.assert_close(with_peft(x).reshape(-1), expected, atol=1e-5, rtol=1e-5)
        assert expected.std() > 0  # different crops, different logits: a model, not a constant
        # the project's loader reads peft's files alone as well
        adapter_only = shutil.copytree(result.checkpoint, tmp_path / "adapter_only")
        (adapter_only / TRAINED).unlink()
        torch.testing.assert_close(load_checkpoint(adapter_only)[0](x).reshape(-1), expected, atol=1e-5, rtol=1e-5)


def test_missing_or_changed_base_weights_are_named(small_store, tiny_set, tmp_path, monkeypatch):
    spec = shrunk("dinov3_s")
    base = tmp_path / "weights" / "dinov3_s.safetensors"
    base.parent.mkdir()
    _base_file(spec, base)
    result = train_fold(_config(small_store, "dinov3_s", str(base), "lora"), small_store, 1, None, tmp_path / "w")
    elsewhere = tmp_path / "moved"
    elsewhere.mkdir()
    base.rename(elsewhere / base.name)
    with pytest.raises(CheckpointError, match=rf"{base.name}.*missing on this machine.*{WEIGHTS_DIR_ENV}"):
        load_checkpoint(result.checkpoint)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(elsewhere))
    load_checkpoint(result.checkpoint)
    torch.manual_seed(1)
    other = build_classifier(spec)
    save_file({k: v for k, v in other.state_dict().items() if not k.startswith("head")}, str(elsewhere / base.name))
    with pytest.raises(CheckpointError, match="is a different file"):
        load_checkpoint(result.checkpoint)


@pytest.mark.slow  # a model registered or trained end to end: ~5-10 s
def test_lora_ensemble_predicts_through_predict_and_the_pyfunc(small_store, tiny_set, tracking, tmp_path):
    spec = shrunk("uni2")
    base = _base_file(spec, tmp_path / "uni2.safetensors")
    cfg = dataclasses.replace(_config(small_store, "uni2", base, "lora"), folds="all")
    parent = run_train_cv(cfg)
    client = MlflowClient()
    params = client.get_run(parent).data.params
    assert int(params[keys.P_N_TRAINABLE_PARAMS]) < int(params[keys.P_N_PARAMS]) / 5
    row = load_row(client, client.get_run(parent))
    with mlflow.start_run():
        version = log_ensemble_model(row, 0.5, registered_name="lora-test", alias=None)
    uri = f"models:/lora-test/{version.version}"
    images = small_store.images[:6]
    prob, _ = load_predictor(uri).predict(images)  # what `predict` runs
    served = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [encode_png_base64(im) for im in images]}))
    np.testing.assert_allclose(served["probability"].to_numpy(float), prob, atol=1e-6)
    assert 0 < prob.min() < prob.max() < 1


@pytest.mark.slow
def test_train_cv_lora_on_the_demo_vit_logs_counts_and_a_cv_auroc(demo_store, tracking):
    cfg = build(TrainCVConfig, "demo", data=str(demo_store.path), backbone="lunit", folds="1", epochs=1,
                finetune="lora", workroot=".work")
    parent = MlflowClient().get_run(run_train_cv(cfg))
    n, trainable = int(parent.data.params[keys.P_N_PARAMS]), int(parent.data.params[keys.P_N_TRAINABLE_PARAMS])
    assert trainable < n / 10 and parent.data.params[keys.P_FINETUNE] == "lora"
    assert 0 <= parent.data.metrics[keys.CV_AUROC_MEAN] <= 1


def test_an_unreachable_gated_repository_is_an_error_that_says_what_to_do(monkeypatch, tmp_path):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedWeightsError) as e:
        build_classifier(shrunk("uni2"), "hub")
    text = str(e.value)
    for part in ("MahmoodLab/UNI2-h", "gated", "licence", "HF_TOKEN", "pretrained=<path"):
        assert part in text, text


@pytest.mark.slow  # a fold trained: ~3 s
def test_the_leaderboard_recipe_trains_a_fold(small_store, tmp_path):
    """domain focal loss + class-balanced sampler + strong augmentation, on the demo ViT with LoRA."""
    cfg = build(TrainCVConfig, "demo", data=str(small_store.path), backbone="lunit", folds="1", epochs=1,
                finetune="lora", loss="domain_focal", sampler="balanced", augment="strong", workroot=".work")
    result = train_fold(cfg, small_store, 1, None, tmp_path)
    plain = train_fold(dataclasses.replace(cfg, loss="bce", sampler="shuffle", augment="flips"), small_store, 1,
                       None, tmp_path / "plain")
    assert np.isfinite(result.history[0].train_loss)
    assert result.history[0].train_loss != plain.history[0].train_loss  # the options reached the loop


@pytest.mark.slow  # a fold trained: ~3 s
def test_stain_normalisation_is_kept_with_the_model_and_applied_at_inference(small_store, tmp_path):
    cfg = build(TrainCVConfig, "demo", data=str(small_store.path), backbone="lunit", folds="1", epochs=1,
                stain_norm="macenko", workroot=".work")
    result = train_fold(cfg, small_store, 1, None, tmp_path)
    model, spec, _ = load_checkpoint(result.checkpoint)
    assert spec.stain_norm == "macenko"
    _, val = fold_pools(cfg, small_store, 1, None)[:2]
    probs, _ = predict_pool(model, spec, val, torch.device("cpu"))
    np.testing.assert_allclose(probs, result.val_predictions["prob"].to_numpy(), atol=1e-6)
    unnormalised, _ = predict_pool(model, dataclasses.replace(spec, stain_norm="none"), val, torch.device("cpu"))
    assert np.abs(unnormalised - probs).max() > 1e-4  # the normalisation changes what the model sees
