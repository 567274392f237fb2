"""Training the generator, resumably: the VAE on pixels, then the DiT on cached latents.

`fit_generator` serves both stages of the paper: pretraining (no labels: the DiT learns the
null class only) and per-fold fine-tuning (labels, dropped to null once per sample with
probability `label_dropout`), starting from a previous `Generator`.

After every epoch the stage's state (weights, EMA, AdamW moments, history) is written to
`<workdir>/<stage>.safetensors` (temp file + os.replace); a rerun with the same workdir
continues after the last finished epoch. Each epoch's shuffling/noise comes from a
generator seeded by (seed, stage, epoch), so a resumed run draws what an unbroken one would.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data_tools.grids import mosaic
from data_tools.params import identity_fields, param

from models.generator import (EMA, Generator, diffusion_loss, drop_labels, encode_moments, measure_latent_stats,
                              new_generator, reconstruct, set_latent_stats, to_pixels, vae_loss)
from models.sampling import generate

# on_epoch(stage, epoch, metrics, preview): preview is a uint8 grid image or None
EpochCallback = Callable[[str, int, dict[str, float], "np.ndarray | None"], None]
PREVIEW_SAMPLER = ("ddim", 10, 1.5)  # sampler, steps, guidance of the preview grids (a glance, cheap)


@dataclass
class FitConfig:
    """How the generator is trained (both stages); the generator steps' configs extend it."""
    arch: str = param("generator size: tiny | small | base (models.generator.ARCHS)")
    vae_epochs: int = param("VAE epochs (0: keep the VAE as it is)")
    dit_epochs: int = param("DiT epochs")
    batch_size: int = param("batch size of both stages")
    lr: float = param("AdamW learning rate")
    seed: int = param("seed of the initialisation, data order and noise")
    vae_crop: int = param("train the (convolutional) VAE on random crops of this size; 0 = whole crops")
    kl_weight: float = param("weight of the VAE's KL term")
    label_dropout: float = param("classifier-free guidance: P(label -> null), per sample (no labels: unused)")
    ema_decay: float = param("EMA decay of the DiT weights that are kept")
    num_train_timesteps: int = param("DDPM timesteps")
    preview_every: int = param("epochs between preview grids; 0 = only after the last epoch; -1 = none",
                               identity=False)

    def fingerprint(self, **identity: Any) -> str:
        """A short hash of FitConfig's identity fields plus what was trained on (data, ids, start weights)."""
        blob = json.dumps({**{n: getattr(self, n) for n in identity_fields(FitConfig)}, **identity},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class _Stage:
    name: str
    model: torch.nn.Module
    epochs: int
    step: Callable[[np.ndarray, torch.Generator], tuple[torch.Tensor, dict[str, float]]]
    n: int
    ema: EMA | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def fit_generator(images: np.ndarray, labels: np.ndarray | None, cfg: FitConfig, workdir: str | Path,
                  device: torch.device | str = "cpu", init: Generator | None = None,
                  on_epoch: EpochCallback | None = None,
                  moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> Generator:
    """Train (or fine-tune `init`) on uint8 crops [N, H, W, 3]; labels None = unconditional.

    `moments`: the posterior mean/std of `images` under `init`'s VAE, computed once by a
    caller that fine-tunes several folds without touching the VAE (vae_epochs = 0)."""
    if moments is not None and (init is None or cfg.vae_epochs > 0):
        raise ValueError("precomputed latent moments need an initial generator whose VAE is not trained further")
    device = torch.device(device)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if len(images) == 0:
        raise ValueError("no crops to train the generator on")
    # a copy: fine-tuning fold after fold must start each time from the same weights
    if init is not None:
        gen = copy.deepcopy(init)
    else:
        with torch.random.fork_rng(devices=[]):  # the same seed, the same initial weights
            torch.manual_seed(cfg.seed)
            gen = new_generator(cfg.arch, images.shape[1], cfg.num_train_timesteps)
    gen.vae.requires_grad_(True)
    gen.dit.requires_grad_(True)
    if gen.image_size != images.shape[1]:
        raise ValueError(f"the generator is for {gen.image_size} px crops, the data has {images.shape[1]} px")
    gen.to(device)
    if labels is not None and (np.any(labels < 0) or np.any(labels >= gen.null)):
        raise ValueError(f"labels must be class indices 0..{gen.null - 1} for conditional training")
    notify = on_epoch or (lambda *a: None)

    # stage 1: the VAE on pixels
    fixed = np.asarray(images[: min(8, len(images))])

    def vae_step(idx: np.ndarray, g: torch.Generator):
        x = _augment(to_pixels(images[np.sort(idx)], device), cfg.vae_crop, g)
        return vae_loss(gen.vae, x, cfg.kl_weight, generator=g)

    def vae_preview() -> np.ndarray:  # top row real, bottom row reconstructed
        gen.vae.eval()
        return mosaic(np.concatenate([fixed, reconstruct(gen.vae, fixed)]), cols=len(fixed))

    stage = _Stage("vae", gen.vae, cfg.vae_epochs, vae_step, len(images))
    _run_stage(stage, cfg, workdir, device, notify, vae_preview)

    # the latent scale of this VAE, then the latents the DiT trains on
    mean, std = moments if moments is not None else encode_moments(gen.vae, images, device=device)
    shift, scale = measure_latent_stats(mean, std, seed=cfg.seed)
    set_latent_stats(gen.vae, shift, scale)
    notify("latents", 0, {"latent_shift": shift, "latent_scale": scale}, None)
    y_all = torch.full((len(images),), gen.null) if labels is None else torch.tensor(np.asarray(labels))
    y_all = y_all.long()
    dropout = cfg.label_dropout if labels is not None else 0.0

    def dit_step(idx: np.ndarray, g: torch.Generator):
        i = torch.as_tensor(idx)
        z = (mean[i] + std[i] * torch.randn(mean[i].shape, generator=g) - shift) * scale
        y = drop_labels(y_all[i], dropout, gen.null, generator=g)
        return diffusion_loss(gen.dit, gen.scheduler, z.to(device), y.to(device), generator=g), {}

    ema = EMA(gen.dit, cfg.ema_decay)
    preview_labels = np.repeat(np.arange(gen.null), 8) if labels is not None else np.full(8, gen.null)

    def dit_preview() -> np.ndarray:
        sampler, steps, guidance = PREVIEW_SAMPLER
        shown = Generator(gen.vae, ema.model, gen.scheduler, gen.meta)
        return mosaic(generate(shown, preview_labels, sampler, steps, guidance, seed=cfg.seed, progress=False), cols=8)

    stage = _Stage("dit", gen.dit, cfg.dit_epochs, dit_step, len(images), ema=ema)
    _run_stage(stage, cfg, workdir, device, notify, dit_preview)

    meta = {**gen.meta, "conditional": labels is not None, "label_dropout": dropout, "n_train": int(len(images)),
            "latent_shift": shift, "latent_scale": scale}
    if labels is not None:
        meta["n_train_per_class"] = {str(c): int((labels == c).sum()) for c in range(gen.null)}
    return Generator(gen.vae.eval(), ema.model.eval(), gen.scheduler, meta)


def _run_stage(stage: _Stage, cfg: FitConfig, workdir: Path, device: torch.device, notify: EpochCallback,
               preview: Callable[[], np.ndarray]) -> None:
    model = stage.model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ckpt = workdir / f"{stage.name}.safetensors"
    start = _load_state(ckpt, stage, opt) if ckpt.is_file() else 0
    for epoch, metrics in enumerate(stage.history, start=1):  # re-report what a killed run already did
        notify(stage.name, epoch, metrics, None)
    steps_per_epoch = max(1, stage.n // cfg.batch_size)  # drop the last partial batch
    for epoch in range(start + 1, stage.epochs + 1):
        model.train()
        g = torch.Generator().manual_seed(_seed(cfg.seed, stage.name, epoch))
        order = torch.randperm(stage.n, generator=g).numpy()
        if stage.n < cfg.batch_size:
            order = np.resize(order, cfg.batch_size)
        totals: dict[str, float] = {}
        bar = tqdm(range(steps_per_epoch), desc=f"{stage.name} epoch {epoch}/{stage.epochs}", leave=False)
        for b in bar:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, parts = stage.step(order[b * cfg.batch_size:(b + 1) * cfg.batch_size], g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if stage.ema is not None:
                stage.ema.update(model)
            for k, v in {"loss": loss.item(), **parts}.items():
                totals[k] = totals.get(k, 0.0) + v
            bar.set_postfix(loss=f"{loss.item():.4f}")
        metrics = {f"{stage.name}_{k}": v / steps_per_epoch for k, v in totals.items()}
        stage.history.append(metrics)
        _save_state(ckpt, stage, opt, epoch)
        every = cfg.preview_every
        due = every >= 0 and (epoch == stage.epochs or (every > 0 and epoch % every == 0))
        notify(stage.name, epoch, metrics, preview() if due else None)
    if start >= stage.epochs > 0 and cfg.preview_every >= 0:
        notify(stage.name, stage.epochs, {}, preview())


def _seed(seed: int, name: str, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}/{epoch}".encode()).digest()[:8], "little") >> 1


def _augment(x: torch.Tensor, crop: int, g: torch.Generator) -> torch.Tensor:
    """A random dihedral transform (orientation carries no meaning in a histology crop) and,
    if `crop`, a random crop per sample (the VAE is convolutional; crops make it cheaper)."""
    k, flip = (int(v) for v in torch.randint(0, 4, (2,), generator=g))
    x = torch.rot90(x, k, dims=(2, 3))
    if flip % 2:
        x = x.flip(3)
    size = x.shape[-1]
    if crop and crop < size:
        offs = torch.randint(0, size - crop + 1, (x.shape[0], 2), generator=g).tolist()
        x = torch.stack([xi[:, r:r + crop, c:c + crop] for xi, (r, c) in zip(x, offs)])
    return x


# ---------------------------------------------------------------- resumable state

def _save_state(path: Path, stage: _Stage, opt: torch.optim.Optimizer, epoch: int) -> None:
    tensors = {f"model.{k}": v for k, v in stage.model.state_dict().items()}
    if stage.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in stage.ema.model.state_dict().items()})
    opt_state = opt.state_dict()
    for i, state in opt_state["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in state.items()})
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {"epoch": epoch, "history": stage.history, "param_groups": opt_state["param_groups"],
            "ema_steps": stage.ema.steps if stage.ema is not None else 0}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
    os.replace(tmp, path)


def _load_state(path: Path, stage: _Stage, opt: torch.optim.Optimizer) -> int:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["state"])
    tensors = load_file(str(path))
    device = next(stage.model.parameters()).device

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    stage.model.load_state_dict(part("model."))
    if stage.ema is not None:
        stage.ema.model.load_state_dict(part("ema."))
        stage.ema.steps = meta["ema_steps"]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in part("opt.").items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v if name == "step" else v.to(device)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    stage.history = list(meta["history"])
    print(f"resuming {stage.name} after epoch {meta['epoch']} from {path}")
    return int(meta["epoch"])
