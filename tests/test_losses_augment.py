"""Losses (focal, domain-weighted focal, BCE with pos_weight), the class-balanced sampler, and
stain augmentation / normalisation, each against its definition on small tensors the test makes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from data_tools import augment as A
from data_tools.batches import SAMPLERS, balanced_order, epoch_order
from data_tools.errors import ConfigError
from models.losses import LOSSES, classification_loss, domain_weights, focal_loss

# --- losses


def _batch(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=g, dtype=torch.float64) * 4
    logits[:4] = torch.tensor([30.0, -30.0, 25.0, -25.0], dtype=torch.float64)  # saturated sigmoids
    targets = (torch.rand(n, generator=g) < 0.3).double()
    targets[:4] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # confidently right, and confidently wrong
    return logits, targets


def _focal_by_definition(z: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Lin et al. 2017, Eq. 4 (no alpha): FL(p_t) = -(1 - p_t)^gamma log(p_t), in float64."""
    p = torch.sigmoid(z)
    p_t = torch.where(t == 1, p, 1 - p)
    log_p_t = torch.where(t == 1, torch.log(p), torch.log1p(-p))
    return -((1 - p_t) ** gamma) * log_p_t


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_and_domain_focal_match_the_definition(gamma):
    z, t = _batch()
    z, t = z[4:], t[4:]  # the definition itself loses precision at saturated logits (1 - p rounds to 0)
    expected = _focal_by_definition(z, t, gamma)
    torch.testing.assert_close(focal_loss(z, t, gamma), expected, rtol=1e-9, atol=1e-12)
    assert torch.isclose(classification_loss(z, t, "focal", focal_gamma=gamma), expected.mean(), rtol=1e-9)

    domains = np.array(["a"] * 40 + ["b"] * 15 + ["c"] * 5)
    w = torch.from_numpy(domain_weights(domains)).double()
    got = classification_loss(z, t, "domain_focal", focal_gamma=gamma, sample_weights=w)
    assert torch.isclose(got, (w * expected).mean(), rtol=1e-6)
    pw = classification_loss(z, t, "focal", focal_gamma=gamma, pos_weight=3.0)
    assert torch.isclose(pw, (torch.where(t == 1, 3.0, 1.0) * expected).mean(), rtol=1e-9)
    with pytest.raises(ValueError, match="sample_weights"):
        classification_loss(z, t, "domain_focal")


def test_focal_gradient_stays_finite_where_torchvisions_does_not():
    z, t = _batch()
    z = z.float().requires_grad_()
    ours = focal_loss(z, t.float(), gamma=0.5).sum()
    ours.backward()
    assert torch.isfinite(z.grad).all()
    z2 = z.detach().clone().requires_grad_()
    sigmoid_focal_loss(z2, t.float(), alpha=-1, gamma=0.5, reduction="sum").backward()
    assert not torch.isfinite(z2.grad).all()  # why focal_loss is not torchvision's
    # same values where torchvision is well defined
    torch.testing.assert_close(focal_loss(z.detach(), t.float(), 2.0),
                               sigmoid_focal_loss(z.detach(), t.float(), alpha=-1, gamma=2.0), rtol=1e-5, atol=1e-7)


def test_bce_with_pos_weight_is_torchs():
    z, t = _batch()
    for pw in (None, 4.0):
        torch_pw = None if pw is None else torch.tensor(pw, dtype=torch.float64)
        expected = F.binary_cross_entropy_with_logits(z, t, pos_weight=torch_pw)
        assert torch.isclose(classification_loss(z, t, "bce", pos_weight=pw), expected, rtol=1e-12)
    # gamma = 0: the focal loss is BCE
    assert torch.isclose(classification_loss(z, t, "focal", focal_gamma=0.0), classification_loss(z, t), rtol=1e-12)
    assert LOSSES == ("bce", "focal", "domain_focal")
    with pytest.raises(ConfigError, match="hinge"):
        classification_loss(z, t, "hinge")


def test_domain_weights_are_inverse_frequency_with_mean_one():
    domains = np.array(["scanner_a"] * 60 + ["scanner_b"] * 30 + ["dog"] * 10)
    w = domain_weights(domains)
    assert w.dtype == np.float32 and w.shape == (100,)
    assert w.mean() == pytest.approx(1.0, abs=1e-6)
    # inverse frequency: w * share is the same for every domain (= 1 / number of domains)
    for d, share in (("scanner_a", 0.6), ("scanner_b", 0.3), ("dog", 0.1)):
        assert np.allclose(w[domains == d], 1 / (3 * share))
    assert np.allclose(domain_weights(np.array(["x"] * 7)), 1.0)


# --- sampler


def test_balanced_sampler_is_one_to_one_and_reproducible():
    labels = np.zeros(1001, np.float32)
    labels[np.random.default_rng(0).permutation(1001)[:150]] = 1  # 15 % atypical
    order = balanced_order(labels, np.random.default_rng(3))
    assert order.shape == (1001,)
    pos = labels[order] == 1
    assert abs(pos.sum() - 500.5) <= 0.5  # half each, the odd one to either class
    assert len(np.unique(order[~pos])) == (~pos).sum()  # the common class: no repeats, a fresh subset
    assert len(np.unique(order[pos])) > 120  # the rare class: repeats, yet most of it is drawn
    np.testing.assert_array_equal(order, balanced_order(labels, np.random.default_rng(3)))
    assert not np.array_equal(order, balanced_order(labels, np.random.default_rng(4)))
    # shuffle is the permutation the loop drew before samplers existed (same rng, same order)
    np.testing.assert_array_equal(epoch_order("shuffle", labels, np.random.default_rng(5)),
                                  np.random.default_rng(5).permutation(1001))
    np.testing.assert_array_equal(epoch_order("balanced", labels, np.random.default_rng(3)), order)
    assert SAMPLERS == ("shuffle", "balanced")
    with pytest.raises(ConfigError, match="both classes"):
        balanced_order(np.zeros(10, np.float32), np.random.default_rng(0))
    with pytest.raises(ConfigError, match="sampler"):
        epoch_order("weighted", labels, np.random.default_rng(0))


# --- stains

_UNIT = lambda m: m / m.norm(dim=1, keepdim=True)  # noqa: E731
REF_STAINS = _UNIT(torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]))  # rows H, E (Ruifrok & Johnston)
SHIFTED_STAINS = _UNIT(torch.tensor([[0.45, 0.80, 0.40], [0.25, 0.90, 0.30]]))  # another lab's H&E


def _smooth(n: int, size: int, g: torch.Generator, cells: int = 8) -> torch.Tensor:
    c = torch.rand(n, 1, cells, cells, generator=g)
    return F.interpolate(c, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)[:, 0]


def _tissue(n: int, stains: torch.Tensor, seed: int, size: int = 48) -> torch.Tensor:
    """Synthetic H&E [n, 3, size, size] in [0, 1]: haematoxylin nuclei, eosin stroma, some
    background, through Beer-Lambert with the given stain vectors."""
    g = torch.Generator().manual_seed(seed)
    nuclei = (_smooth(n, size, g, 12) > 0.6).float()
    stroma = (_smooth(n, size, g, 4) > 0.3).float() * (1 - nuclei)
    h = nuclei * (0.6 + 0.8 * _smooth(n, size, g)) + stroma * 0.1 * _smooth(n, size, g)
    e = stroma * (0.3 + 0.9 * _smooth(n, size, g)) + nuclei * 0.2
    od = torch.einsum("sc,nshw->nchw", stains, torch.stack([h, e], 1))
    return torch.exp(-od).clamp(0, 1)


def test_hed_jitter_keeps_range_moves_stain_and_identity_is_a_no_op():
    x = _tissue(8, REF_STAINS, seed=1)
    x[0, :, :4, :4] = 0.0  # black and white pixels: the ends of the range
    x[0, :, -4:, -4:] = 1.0
    same = A.hed_jitter(x, torch.ones(8, 3), torch.zeros(8, 3))
    torch.testing.assert_close(same, x, rtol=0, atol=1e-5)

    g = torch.Generator().manual_seed(0)
    alpha, beta = 1 + 0.3 * (2 * torch.rand(8, 3, generator=g) - 1), 0.1 * (2 * torch.rand(8, 3, generator=g) - 1)
    y = A.hed_jitter(x, alpha, beta)
    assert y.min() >= 0 and y.max() <= 1
    moved = (A.rgb_to_hed(y) - A.rgb_to_hed(x)).mean((2, 3)).abs()  # [8, 3]: per image and stain
    assert moved[:, :2].mean() > 0.02  # haematoxylin and eosin shift visibly (their means are ~0.2-0.5)
    # Tellez et al.'s definition, per pixel: HED' = alpha * HED + beta (where no channel was clipped)
    expected = A.rgb_to_hed(x) * alpha[:, :, None, None] + beta[:, :, None, None]
    unclipped = ((y > 1e-6) & (y < 1)).all(1, keepdim=True).expand_as(y)
    assert unclipped.float().mean() > 0.5
    torch.testing.assert_close(A.rgb_to_hed(y)[unclipped], expected[unclipped], rtol=0, atol=1e-4)


def test_strong_preset_is_reproducible_and_the_paper_presets_are_unchanged():
    x = _tissue(6, REF_STAINS, seed=2)
    strong = A.preset("strong")
    out = A.augment(x, torch.Generator().manual_seed(11), strong)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out, A.augment(x, torch.Generator().manual_seed(11), strong), rtol=0, atol=0)
    assert not torch.equal(out, A.augment(x, torch.Generator().manual_seed(12), strong))
    no_stain = dataclasses.replace(strong, hed_scale=0.0, hed_shift=0.0)
    with_stain = A.augment(x, torch.Generator().manual_seed(11), strong)
    without = A.augment(x, torch.Generator().manual_seed(11), no_stain)
    assert (A.rgb_to_hed(with_stain) - A.rgb_to_hed(without)).mean((2, 3)).abs().max() > 0.01

    for name in ("paper", "flips"):
        cfg = A.preset(name)
        off = dataclasses.replace(cfg, hed_scale=0.0, hed_shift=0.0, blur_p=0.0)
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        torch.testing.assert_close(A.augment(x, g1, cfg), A.augment(x, g2, off), rtol=0, atol=0)
        # the paper's presets still draw exactly 12 numbers per image (the next batch repeats too)
        ref = torch.Generator().manual_seed(5)
        torch.rand(6, 12, generator=ref)
        assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=ref))
    batch = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    plain = A.normalize(A.resize(A.to_float(batch, "cpu"), 32), mean, std)
    assert torch.equal(A.preprocess(batch, 32, mean, std, "cpu"), plain)  # stain_norm defaults to none
    with pytest.raises(ConfigError, match="stain_norm"):
        A.preprocess(batch, 32, mean, std, "cpu", stain_norm="reinhard")


def test_macenko_moves_a_stain_shifted_image_towards_the_reference():
    reference = A.fit_stain_reference(_tissue(1, REF_STAINS, seed=3))
    assert torch.allclose(reference.stains.T, REF_STAINS, atol=0.07)  # near H and E (nuclei hold some eosin)
    shifted = _tissue(8, SHIFTED_STAINS, seed=4)
    target = _tissue(8, REF_STAINS, seed=4)  # the same tissue in the reference's stains
    before = (shifted - target).abs().mean()
    after = (A.macenko_normalize(shifted, reference) - target).abs().mean()
    assert after < before / 4, (before, after)

    # the default target is Macenko's published reference: estimated again, the output's stains are its
    out = A.stain_normalize(shifted, "macenko")
    est_in, est_out = A._macenko(shifted, 0.15, 1.0)[0], A._macenko(out, 0.15, 1.0)[0]
    ref = A.MACENKO_REFERENCE.stains
    assert (est_out - ref).abs().mean() < (est_in - ref).abs().mean() / 3
    # a crop without tissue is left as it is, in the same batch
    blank = torch.cat([torch.ones(1, 3, 48, 48), shifted[:1]])
    normed = A.macenko_normalize(blank)
    assert torch.equal(normed[0], blank[0]) and not torch.equal(normed[1], blank[1])
    # through preprocessing, from a store's uint8 batch (what evaluate and predict would run)
    batch = (shifted.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    x = A.preprocess(batch, 32, (0.0,) * 3, (1.0,) * 3, "cpu", stain_norm="macenko")
    assert x.shape == (8, 3, 32, 32) and torch.isfinite(x).all()
    torch.testing.assert_close(x, A.resize(A.macenko_normalize(A.to_float(batch, "cpu")), 32))
