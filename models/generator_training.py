"""Training the generator, resumably: the VAE on pixels, then the DiT on cached latents.

`fit_generator` serves both stages of the paper: pretraining (no labels: the DiT learns the
null class only) and per-fold fine-tuning (labels, dropped to null once per sample with
probability `label_dropout`), starting from a previous `Generator`.

After every epoch the stage's state (weights, EMA, AdamW moments, history) is written to
`<workdir>/<stage>.safetensors` (data_tools.atomic.atomic_file); a rerun with the same workdir
continues after the last finished epoch. Each epoch's shuffling/noise comes from a
generator seeded by (seed, stage, epoch), so a resumed run draws what an unbroken one would.

Data parallel: in a run that `accelerate launch` (or torchrun) started as N processes
(`data_parallel`), every process shuffles alike and trains on its 1/N of each batch, with its
rows of the random numbers drawn for the whole batch (`BatchRandom`); DDP averages the
gradients, so N processes take the steps one process would (up to float rounding). One
process writes the checkpoints and reports the epochs; a plain one-process run is unchanged.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import get_int_from_env
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data_tools.atomic import atomic_file
from data_tools.errors import ConfigError
from data_tools.grids import mosaic
from data_tools.params import identity_fields, param

from models.generator import (EMA, BatchRandom, Generator, diffusion_loss, drop_labels, encode_moments,
                              measure_latent_stats, new_generator, reconstruct, set_latent_stats, to_pixels, vae_loss)
from models.precision import backward_step, choose_precision
from models.sampling import generate

# on_epoch(stage, epoch, metrics, preview): preview is a uint8 grid image or None
EpochCallback = Callable[[str, int, dict[str, float], "np.ndarray | None"], None]
PREVIEW_SAMPLER = ("ddim", 10, 1.5)  # sampler, steps, guidance of the preview grids (a glance, cheap)
# how a launcher tells a process how many were started (torchrun / accelerate launch, MPI), as accelerate reads it
WORLD_SIZE_ENV = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]


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


def data_parallel(device: torch.device | str) -> Accelerator | None:
    """The Accelerator of a run that `accelerate launch` (or torchrun) started as several
    processes, on `device`'s kind: cuda, one GPU per process (NCCL); cpu, one process per share
    of the cores (gloo). None in a one-process run, which trains as it always did. Mixed
    precision stays ours in both (models.precision: bf16 or fp16 + scaler on cuda), whatever the
    launcher was told."""
    if get_int_from_env(WORLD_SIZE_ENV, 1) <= 1:
        return None
    return Accelerator(cpu=torch.device(device).type == "cpu", mixed_precision="no")


# a stage's step: (this batch's indices, its random numbers) -> (loss, detached parts to report)
Step = Callable[[np.ndarray, BatchRandom], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class _Stage:
    name: str
    model: torch.nn.Module
    epochs: int
    step: Step
    n: int
    ema: EMA | None = None
    history: list[dict[str, float]] = field(default_factory=list)


class _Objective(torch.nn.Module):
    """A stage's step as the forward of a module that holds the trained model: DDP averages the
    gradients of what runs inside the forward of the module it wraps, and the VAE's step calls
    encode and decode, not the VAE's forward."""

    def __init__(self, model: torch.nn.Module, step: Step):
        super().__init__()
        self.model, self.step = model, step

    def forward(self, batch: np.ndarray, draws: BatchRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.step(batch, draws)


def fit_generator(images: np.ndarray, labels: np.ndarray | None, cfg: FitConfig, workdir: str | Path,
                  device: torch.device | str = "cpu", init: Generator | None = None,
                  on_epoch: EpochCallback | None = None,
                  moments: tuple[torch.Tensor, torch.Tensor] | None = None,
                  accelerator: Accelerator | None = None) -> Generator:
    """Train (or fine-tune `init`) on uint8 crops [N, H, W, 3]; labels None = unconditional.

    `moments`: the posterior mean/std of `images` under `init`'s VAE, computed once by a
    caller that fine-tunes several folds without touching the VAE (vae_epochs = 0).
    `accelerator` (from `data_parallel`): train together with the other processes, which call
    this with the same arguments and get the same generator back; the device is the
    accelerator's, `workdir` must be the same folder for all (one machine: it is), and only the
    main process writes checkpoints and calls `on_epoch`."""
    if moments is not None and (init is None or cfg.vae_epochs > 0):
        raise ValueError("precomputed latent moments need an initial generator whose VAE is not trained further")
    if accelerator is not None and cfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"batch_size={cfg.batch_size} does not split evenly over {accelerator.num_processes} "
                          f"processes: give a multiple of {accelerator.num_processes}")
    device = torch.device(device) if accelerator is None else accelerator.device
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
    is_main = accelerator is None or accelerator.is_main_process
    notify = on_epoch if on_epoch is not None and is_main else (lambda *a: None)

    # stage 1: the VAE on pixels
    fixed = np.asarray(images[: min(8, len(images))])

    def vae_step(batch: np.ndarray, draws: BatchRandom):
        x = _augment(to_pixels(images[draws.take(np.sort(batch))], device), cfg.vae_crop, draws)
        return vae_loss(gen.vae, x, cfg.kl_weight, draws)

    def vae_preview() -> np.ndarray:  # top row real, bottom row reconstructed
        gen.vae.eval()
        return mosaic(np.concatenate([fixed, reconstruct(gen.vae, fixed)]), cols=len(fixed))

    stage = _Stage("vae", gen.vae, cfg.vae_epochs, vae_step, len(images))
    _run_stage(stage, cfg, workdir, device, notify, vae_preview, accelerator)

    # the latent scale of this VAE, then the latents the DiT trains on
    mean, std = moments if moments is not None else encode_moments(gen.vae, images, device=device)
    shift, scale = measure_latent_stats(mean, std, seed=cfg.seed)
    set_latent_stats(gen.vae, shift, scale)
    notify("latents", 0, {"latent_shift": shift, "latent_scale": scale}, None)
    y_all = torch.full((len(images),), gen.null) if labels is None else torch.tensor(np.asarray(labels))
    y_all = y_all.long()
    dropout = cfg.label_dropout if labels is not None else 0.0

    def dit_step(batch: np.ndarray, draws: BatchRandom):
        i = torch.as_tensor(draws.take(batch))
        z = (mean[i] + std[i] * draws.randn(*mean.shape[1:]) - shift) * scale
        y = drop_labels(y_all[i], dropout, gen.null, draws)
        return diffusion_loss(gen.dit, gen.scheduler, z.to(device), y.to(device), draws), {}

    ema = EMA(gen.dit, cfg.ema_decay)
    preview_labels = np.repeat(np.arange(gen.null), 8) if labels is not None else np.full(8, gen.null)

    def dit_preview() -> np.ndarray:
        sampler, steps, guidance = PREVIEW_SAMPLER
        shown = Generator(gen.vae, ema.model, gen.scheduler, gen.meta)
        return mosaic(generate(shown, preview_labels, sampler, steps, guidance, seed=cfg.seed, progress=False), cols=8)

    stage = _Stage("dit", gen.dit, cfg.dit_epochs, dit_step, len(images), ema=ema)
    _run_stage(stage, cfg, workdir, device, notify, dit_preview, accelerator)

    meta = {**gen.meta, "conditional": labels is not None, "label_dropout": dropout, "n_train": int(len(images)),
            "latent_shift": shift, "latent_scale": scale}
    if labels is not None:
        meta["n_train_per_class"] = {str(c): int((labels == c).sum()) for c in range(gen.null)}
    return Generator(gen.vae.eval(), ema.model.eval(), gen.scheduler, meta)


def _run_stage(stage: _Stage, cfg: FitConfig, workdir: Path, device: torch.device, notify: EpochCallback,
               preview: Callable[[], np.ndarray], accelerator: Accelerator | None) -> None:
    model = stage.model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    precision = choose_precision("auto", device)  # by the GPU's capability; fp32 on a CPU
    scaler = precision.scaler()  # fp16's loss scaling; a pass-through otherwise
    ckpt = workdir / f"{stage.name}.safetensors"
    start = _load_state(ckpt, stage, opt) if ckpt.is_file() else 0  # every process loads the same state
    objective: torch.nn.Module = _Objective(model, stage.step)
    rank, processes, is_main = 0, 1, True
    if accelerator is not None:
        rank, processes, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
        if not torch.all(accelerator.gather(torch.tensor([start], device=device)) == start):
            raise ConfigError(f"the processes would resume {stage.name} from different epochs: work_dir "
                              f"{workdir} must be one folder that all of them see")
        objective = accelerator.prepare_model(objective)  # DDP: gradients averaged over the processes
    for epoch, metrics in enumerate(stage.history, start=1):  # re-report what a killed run already did
        notify(stage.name, epoch, metrics, None)
    steps_per_epoch = max(1, stage.n // cfg.batch_size)  # drop the last partial batch
    share = cfg.batch_size // processes  # each process: its rows of every (global) batch
    rows = slice(rank * share, (rank + 1) * share)
    for epoch in range(start + 1, stage.epochs + 1):
        model.train()
        g = torch.Generator().manual_seed(_seed(cfg.seed, stage.name, epoch))
        order = torch.randperm(stage.n, generator=g).numpy()
        if stage.n < cfg.batch_size:
            order = np.resize(order, cfg.batch_size)
        totals: dict[str, torch.Tensor] = {}  # summed on the device: no host sync per step
        bar = tqdm(range(steps_per_epoch), desc=f"{stage.name} epoch {epoch}/{stage.epochs}", leave=False,
                   disable=not is_main)
        for b in bar:
            draws = BatchRandom(g, cfg.batch_size, rows)
            with precision.autocast():
                loss, parts = objective(order[b * cfg.batch_size:(b + 1) * cfg.batch_size], draws)
            backward_step(loss, opt, scaler)
            if stage.ema is not None:
                stage.ema.update(model)
            for k, v in {"loss": loss.detach(), **parts}.items():
                totals[k] = totals.get(k, 0.0) + v.double()
        means = torch.stack(list(totals.values())) / steps_per_epoch
        if accelerator is not None:  # equal shares: the mean of the processes' means is the batch mean
            means = accelerator.reduce(means, "mean")
        metrics = {f"{stage.name}_{k}": v for k, v in zip(totals, means.tolist())}
        stage.history.append(metrics)
        every = cfg.preview_every
        due = every >= 0 and (epoch == stage.epochs or (every > 0 and epoch % every == 0))
        if is_main:
            _save_state(ckpt, stage, opt, epoch)
            notify(stage.name, epoch, metrics, preview() if due else None)
        if accelerator is not None:
            accelerator.wait_for_everyone()  # the checkpoint is written before anyone goes on
    if start >= stage.epochs > 0 and cfg.preview_every >= 0 and is_main:
        notify(stage.name, stage.epochs, {}, preview())
    if accelerator is not None:
        accelerator.free_memory()  # the accelerator's references to this stage's DDP wrapper


def _seed(seed: int, name: str, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}/{epoch}".encode()).digest()[:8], "little") >> 1


def _augment(x: torch.Tensor, crop: int, draws: BatchRandom) -> torch.Tensor:
    """A random dihedral transform (orientation carries no meaning in a histology crop), one for
    the whole batch, and, if `crop`, a random crop per sample (the VAE is convolutional; crops
    make it cheaper)."""
    k, flip = (int(v) for v in torch.randint(0, 4, (2,), generator=draws.generator))
    x = torch.rot90(x, k, dims=(2, 3))
    if flip % 2:
        x = x.flip(3)
    size = x.shape[-1]
    if crop and crop < size:
        offs = draws.randint(size - crop + 1, 2).tolist()
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
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})


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
