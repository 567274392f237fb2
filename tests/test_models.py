"""Backbones, pretrained loading, checkpoints, the fold ensemble, batch augmentation, metrics."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score, roc_auc_score

from models.metrics import (_weighted_metrics, ba_optimal_threshold, binary_metrics, bootstrap_metrics,
                              mean_and_population_sd)
from data_tools.augment import PRESETS, augment_and_preprocess, preprocess
from data_tools.constants import IMAGENET_MEAN, LUNIT_MEAN, LUNIT_STD
from models.backbones import resolve_backbone
from models.checkpoint import load_checkpoint, save_checkpoint
from models.classifier import PretrainedWeightsError, build_classifier, predict_logits
from models.ensemble import FoldEnsemble


def test_registry_has_the_paper_networks_and_small_demo_members():
    conv, lunit, s16 = (resolve_backbone(n, "paper") for n in ("convnext", "lunit", "lunit_s16"))
    assert (conv.timm_name, conv.input_size, conv.mean, conv.default_lr) == ("convnext_small.fb_in1k", 128,
                                                                             IMAGENET_MEAN, 1e-4)
    assert (lunit.input_size, lunit.mean, lunit.std, lunit.default_lr) == (224, LUNIT_MEAN, LUNIT_STD, 1e-5)
    assert lunit.hub_id == "hf-hub:1aurent/vit_small_patch8_224.lunit_dino" and "patch16" in s16.hub_id
    demo_conv, demo_vit = resolve_backbone("convnext", "demo"), resolve_backbone("lunit", "demo")
    assert (demo_conv.family, demo_vit.family) == ("convnext", "vit")
    assert demo_conv.input_size < 128 and demo_vit.input_size < 224 and demo_vit.mean == LUNIT_MEAN
    other = resolve_backbone("resnet18", "demo")  # any timm name passes through with timm's config
    assert (other.timm_name, other.input_size, other.family) == ("resnet18", 224, "timm")
    with pytest.raises(ValueError, match="unknown backbone"):
        resolve_backbone("no_such_net", "paper")


def test_one_logit_per_image_for_both_families():
    for name in ("convnext", "lunit"):
        spec = resolve_backbone(name, "demo")
        model = build_classifier(spec, "none").eval()
        with torch.no_grad():
            assert model(torch.zeros(3, 3, spec.input_size, spec.input_size)).shape == (3, 1)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_is_loaded_exactly(tmp_path, suffix):
    spec = resolve_backbone("lunit", "demo")
    torch.manual_seed(123)
    source = build_classifier(spec, "none")  # stands in for a released checkpoint (its own head)
    state = {k: v.clone() for k, v in source.state_dict().items() if not k.startswith("head.")}
    path = tmp_path / f"weights{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    torch.manual_seed(0)
    loaded = build_classifier(spec, str(path)).state_dict()
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key


def test_failed_loads_are_errors_with_the_way_out(tmp_path):
    spec = resolve_backbone("convnext", "demo")
    with pytest.raises(PretrainedWeightsError, match="pretrained=none"):
        build_classifier(spec, str(tmp_path / "missing.safetensors"))
    with pytest.raises(PretrainedWeightsError, match="No hub weights"):
        build_classifier(spec, "hub")  # the demo shape has none; never a silent random init
    other = tmp_path / "other.safetensors"  # a file of another architecture
    save_file({"stem.0.weight": torch.zeros(24, 3, 4, 4)}, str(other))
    with pytest.raises(PretrainedWeightsError, match="lacks"):
        build_classifier(spec, str(other))


def test_checkpoint_round_trip_rebuilds_offline(tmp_path):
    spec = resolve_backbone("convnext", "demo")
    torch.manual_seed(1)
    model = build_classifier(spec, "none").eval()
    folder = save_checkpoint(model, spec, tmp_path / "ckpt", extra={"fold": 3})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind
    again, spec2, extra = load_checkpoint(folder)
    assert spec2 == spec and extra == {"fold": 3}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_ensemble_is_the_mean_probability_of_its_folds(tmp_path):
    spec = resolve_backbone("convnext", "demo")
    dirs, models = [], []
    for k in (1, 2):
        torch.manual_seed(k)
        models.append(build_classifier(spec, "none").eval())
        dirs.append(save_checkpoint(models[-1], spec, tmp_path / f"fold{k}"))
    images = np.random.default_rng(0).integers(0, 256, (5, 128, 128, 3), dtype=np.uint8)
    ens = FoldEnsemble.from_dirs(dirs)
    prob = ens.predict_proba(images, batch_size=2)
    with torch.no_grad():
        each = [torch.sigmoid(predict_logits(m, spec, torch.from_numpy(images), torch.device("cpu"))) for m in models]
    assert prob.dtype == np.float32 and prob.shape == (5,)
    np.testing.assert_allclose(prob, torch.stack(each).mean(0).numpy(), atol=1e-6)
    assert ens.predict_proba(images, tta=True).shape == (5,)
    with pytest.raises(ValueError, match="uint8"):
        ens.predict_proba(images.astype(np.float32))


def test_vit_path_uses_its_own_size_and_normalisation():
    spec = resolve_backbone("lunit", "demo")
    images = torch.full((2, 128, 128, 3), 200, dtype=torch.uint8)
    x = preprocess(images, spec.input_size, spec.mean, spec.std, "cpu")
    assert x.shape == (2, 3, spec.input_size, spec.input_size)
    expected = (200 / 255 - torch.tensor(LUNIT_MEAN)) / torch.tensor(LUNIT_STD)
    torch.testing.assert_close(x[0, :, 0, 0], expected.float())
    paper = resolve_backbone("lunit", "paper")  # the real architecture builds offline (random init)
    vit = build_classifier(paper, "none")
    assert vit.patch_embed.patch_size == (8, 8) and vit.global_pool == "token"
    assert vit.pos_embed.shape[1] == 1 + (224 // 8) ** 2


def test_batch_augmentation_is_seeded_and_flips_only_flip():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    a = augment_and_preprocess(images, 32, mean, std, "cpu", torch.Generator().manual_seed(5))
    b = augment_and_preprocess(images, 32, mean, std, "cpu", torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    plain = preprocess(images, 32, mean, std, "cpu")
    assert not torch.allclose(a, plain, atol=1e-3)  # the paper's augmentation changes every image
    flipped = augment_and_preprocess(images, 32, mean, std, "cpu", torch.Generator().manual_seed(1), PRESETS["flips"])
    for i in range(len(images)):
        options = [plain[i].flip(d) if d else plain[i] for d in ((), (-1,), (-2,), (-2, -1))]
        assert min(float((flipped[i] - o).abs().max()) for o in options) < 1e-4


def test_metrics_bootstrap_and_threshold():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.normal(0.35, 0.2, 300), 0, 1).round(2)  # ties on purpose
    m = binary_metrics(y, p, 0.5)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    pred = p >= 0.5  # the threshold is inclusive
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, ~pred))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["ba"] == pytest.approx(balanced_accuracy_score(y, pred))
    w = rng.multinomial(300, np.full(300, 1 / 300), size=3).astype(float)  # resamples as weights
    fast = _weighted_metrics(y, p, w, 0.5)["auroc"]
    for b in range(3):
        idx = np.repeat(np.arange(300), w[b].astype(int))
        assert fast[b] == pytest.approx(roc_auc_score(y[idx], p[idx]))
    ci = bootstrap_metrics(y, p, 0.5, n_boot=200)
    for name, (point, lo, hi) in ci.items():
        assert lo <= point <= hi and hi - lo < 0.5, name
    t = ba_optimal_threshold(y, p)
    best = max(binary_metrics(y, p, c)["ba"] for c in np.unique(p))
    assert binary_metrics(y, p, t)["ba"] == pytest.approx(best)
    assert mean_and_population_sd([0.9, 0.8]) == pytest.approx((0.85, 0.05))
