"""The generator library on 32 px demo crops: label dropout, training, guidance, samplers,
resuming after a kill, saving, quality figures."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel

from models.generator import (ARCHS, BatchRandom, Generator, build_dit, diffusion_loss, drop_labels, encode_moments,
                              new_generator, null_class, predict_eps, vae_loss)
from models.generator_quality import distribution_distance, memorisation
from models.generator_training import FitConfig, fit_generator
from models.sampling import SAMPLERS, generate, guided_eps

# every field but the epochs (a FitConfig has no defaults: the profiles hold them)
FAST = dict(arch="tiny", batch_size=16, lr=2e-3, kl_weight=1e-3, ema_decay=0.99, seed=0, vae_crop=0, label_dropout=0.1,
            num_train_timesteps=1000, preview_every=0)


@pytest.fixture(scope="module")
def trained(thumb_stores, tmp_path_factory):
    """A generator pretrained unconditionally on the pool, then fine-tuned with labels on
    fold 1's training split of the real store; with the epoch metrics of both."""
    real, pool = thumb_stores
    work = tmp_path_factory.mktemp("gen_work")
    logs: dict[str, list] = {"pre": [], "fine": []}
    pre = fit_generator(pool.images, None, FitConfig(vae_epochs=4, dit_epochs=6, **FAST), work / "pre",
                        on_epoch=lambda *a: logs["pre"].append(a))
    rows = real.fold_rows(1)[0]
    labels = real.index["label"].to_numpy()[rows]
    fine = fit_generator(real.images[rows], labels, FitConfig(vae_epochs=1, dit_epochs=6, **FAST), work / "fine",
                         init=pre, on_epoch=lambda *a: logs["fine"].append(a))
    return pre, fine, logs, real.images[rows]


def _series(log, key):
    return [m[key] for stage, _, m, _ in log if key in m]


def test_diffusers_drops_labels_per_block_ours_once_per_sample():
    torch.manual_seed(0)
    arch = ARCHS["tiny"]
    x, t = torch.randn(64, 4, 4, 4), torch.full((64,), 500)
    y = torch.ones(64, dtype=torch.long)
    stock = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                                  num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=2).train()
    assert not torch.equal(stock(x, timestep=t, class_labels=y).sample, stock(x, timestep=t, class_labels=y).sample), \
        "control: diffusers' stock DiT draws its own label dropout on every call in train mode"
    ours = build_dit(arch, 32).train()
    for block in ours.transformer_blocks:  # make the label matter at init (adaLN-Zero starts at 0)
        torch.nn.init.normal_(block.norm1.linear.weight, std=0.1)
    torch.nn.init.normal_(ours.proj_out_2.weight, std=0.1)
    assert torch.equal(predict_eps(ours, x, t, y), predict_eps(ours, x, t, y)), "built-in dropout must be off"
    null = null_class(ours)
    assert null == 2 and ours.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 3
    labels = torch.randint(0, 2, (40_000,))
    dropped = drop_labels(labels, 0.25, null, BatchRandom(torch.Generator().manual_seed(0), len(labels)))
    is_null = dropped == null
    assert abs(is_null.float().mean().item() - 0.25) < 0.01
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert torch.equal(drop_labels(labels, 0.0, null), labels)


def test_shards_of_a_batch_draw_what_the_batch_draws_and_average_to_its_loss():
    """Data parallel (N processes, each its rows of one batch): the same random numbers as one
    process, and the mean of the processes' mean losses is the one-process loss."""
    def draws(rows=slice(None)):
        return BatchRandom(torch.Generator().manual_seed(0), 8, rows)
    halves = (slice(0, 4), slice(4, 8))
    for name, args in (("randn", (3, 2)), ("rand", ()), ("randint", (1000,))):
        whole = getattr(draws(), name)(*args)
        assert whole.shape[0] == 8 and torch.equal(torch.cat([getattr(draws(r), name)(*args) for r in halves]), whole)
    torch.manual_seed(0)
    gen = new_generator("tiny", 32)
    x, y = torch.rand(8, 3, 32, 32) * 2 - 1, torch.tensor([0, 1] * 4)
    z = torch.randn(8, 4, 4, 4)
    with torch.no_grad():
        for loss in (lambda d, r: vae_loss(gen.vae, x[r], 1e-3, d)[0],
                     lambda d, r: diffusion_loss(gen.dit, gen.scheduler, z[r], drop_labels(y[r], 0.5, gen.null, d), d)):
            shards = torch.stack([loss(draws(r), r) for r in halves])
            torch.testing.assert_close(shards.mean(), loss(draws(), slice(None)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_losses_fall_and_the_latent_scale_is_measured(trained, thumb_stores):
    pre, fine, logs, train_images = trained
    for log, stage_keys in ((logs["pre"], ("vae_loss", "dit_loss")), (logs["fine"], ("dit_loss",))):
        for key in stage_keys:
            series = _series(log, key)
            assert series[-1] < series[0], f"{key} did not fall: {series}"
    mean, std = encode_moments(fine.vae, train_images)
    z = (mean + std * torch.randn_like(mean) - fine.vae.config.shift_factor) * fine.vae.config.scaling_factor
    assert fine.vae.config.scaling_factor != pytest.approx(0.18215)
    assert 0.8 < z.std().item() < 1.25 and abs(z.mean().item()) < 0.2
    previews = [p for *_, p in logs["pre"] if p is not None]
    assert len(previews) == 2 and previews[0].dtype == np.uint8  # after the last VAE and the last DiT epoch
    assert fine.meta["conditional"] and not pre.meta["conditional"]


@pytest.mark.slow
def test_guidance_combines_conditional_and_null_predictions(trained):
    _, fine, _, _ = trained
    x, t = torch.randn(4, 4, 4, 4), torch.tensor(300)
    y = torch.tensor([1, 1, 0, 0])
    with torch.no_grad():
        cond = predict_eps(fine.dit, x, t, y)
        uncond = predict_eps(fine.dit, x, t, torch.full_like(y, fine.null))
        other = predict_eps(fine.dit, x, t, 1 - y)
        assert (cond - uncond).abs().max() > 1e-4, "the class must change the prediction"
        assert (cond - other).abs().max() > 1e-4
        torch.testing.assert_close(guided_eps(fine.dit, x, t, y, fine.null, 1.0), cond)
        torch.testing.assert_close(guided_eps(fine.dit, x, t, y, fine.null, 0.0), uncond)
        torch.testing.assert_close(guided_eps(fine.dit, x, t, y, fine.null, 3.0), uncond + 3 * (cond - uncond),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("ddim", 8), ("dpmsolver++", 6)])
def test_samplers_give_crops_of_the_right_shape_and_range(trained, sampler, steps):
    _, fine, _, _ = trained
    labels = [1, 0, fine.null, 1]
    a = generate(fine, labels, sampler, steps, guidance=2.0, seed=3, batch_size=4, progress=False)
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
    assert a.std() > 1.0, "not a constant image"
    b = generate(fine, labels, sampler, steps, guidance=2.0, seed=3, batch_size=3, progress=False)
    # a crop depends on its seed, not on the batch it was drawn in (up to float rounding of other batch shapes)
    assert np.abs(a.astype(int) - b).max() <= 3
    assert np.abs(a[0].astype(int) - a[3]).mean() > 1, "different seeds, different crops"


def test_every_sampler_is_tested():
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmsolver++"}


@pytest.mark.slow
def test_training_resumes_after_a_kill_where_it_stopped(thumb_stores, tmp_path):
    _, pool = thumb_stores
    images = pool.images[:32]
    cfg = FitConfig(vae_epochs=1, dit_epochs=3, **{**FAST, "preview_every": -1})
    whole = fit_generator(images, None, cfg, tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill_after_dit_epoch_2(stage, epoch, metrics, preview):
        if stage == "dit" and epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        fit_generator(images, None, cfg, tmp_path / "broken", on_epoch=kill_after_dit_epoch_2)
    seen = []
    resumed = fit_generator(images, None, cfg, tmp_path / "broken", on_epoch=lambda s, e, m, p: seen.append((s, e)))
    assert ("dit", 1) in seen and ("dit", 3) in seen  # past epochs re-reported, the rest trained
    for a, b in zip(whole.dit.state_dict().values(), resumed.dit.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_generator_round_trips_through_disk(trained, tmp_path):
    _, fine, _, _ = trained
    fine.save(tmp_path / "gen")
    fine.save(tmp_path / "gen")  # overwriting is atomic too
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["dit", "vae"]
    back = Generator.load(tmp_path / "gen")
    assert back.vae.config.scaling_factor == pytest.approx(fine.vae.config.scaling_factor)
    assert back.meta["null_class"] == back.null == 2
    a = generate(fine, [1, 0], "ddim", 5, 2.0, seed=1, progress=False)
    b = generate(back, [1, 0], "ddim", 5, 2.0, seed=1, progress=False)
    assert np.array_equal(a, b)


def test_quality_figures_tell_similar_from_different_and_copies_from_new(thumb_stores):
    real, pool = thumb_stores
    same = distribution_distance(real.images[:48], real.images[48:])
    darker = np.clip(real.images[48:].astype(int) - 60, 0, 255).astype(np.uint8)
    shifted = distribution_distance(real.images[:48], darker)
    assert same["kid"] < shifted["kid"] and same["fid"] < shifted["fid"]
    train, unseen = real.images[:64], real.images[64:]
    copies = memorisation(train[:20], train, unseen)
    fresh = memorisation(pool.images[:40], train, unseen)
    assert copies["near_copy_share"] == 1.0 and copies["nn_dist_median"] < 1e-3
    assert fresh["near_copy_share"] < 0.3 and fresh["nn_dist_ratio"] > 0.5
