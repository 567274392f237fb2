"""Sampling from a trained generator: our own loop with classifier-free guidance (diffusers'
`DiTPipeline` hard-codes null = 1000), for three samplers built from the trained DDPM's config:
`ddpm` (the paper, 1,000 steps), `ddim` and `dpmsolver++` (few steps).

Every sample has its own seed (`seed + i`), so a crop does not depend on the batch it was
drawn in, and the same seed gives the same crops on any batch size.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

from data_tools.errors import ConfigError
from models.generator import Generator, decode, predict_eps

SAMPLERS = ("ddpm", "ddim", "dpmsolver++")


def make_scheduler(name: str, trained: DDPMScheduler):
    """A sampler that shares the trained DDPM's noise schedule."""
    if name == "ddpm":
        return DDPMScheduler.from_config(trained.config)
    if name == "ddim":
        return DDIMScheduler.from_config(trained.config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(trained.config, algorithm_type="dpmsolver++", solver_order=2)
    raise ConfigError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")


def guided_eps(dit, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, null: int, guidance: float) -> torch.Tensor:
    """eps_uncond + guidance * (eps_cond - eps_uncond); guidance 1 is plain conditional sampling
    (one forward pass), guidance 0 unconditional."""
    if guidance == 1.0:
        return predict_eps(dit, x, t, labels)
    both = predict_eps(dit, torch.cat([x, x]), t, torch.cat([labels, torch.full_like(labels, null)]))
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def sample_latents(gen: Generator, labels: torch.Tensor, sampler: str, steps: int, guidance: float,
                   seeds: list[int]) -> torch.Tensor:
    """Latents for one batch; `labels` may hold the null class for unconditional samples."""
    device = next(gen.dit.parameters()).device
    cfg = gen.dit.config
    scheduler = make_scheduler(sampler, gen.scheduler)
    scheduler.set_timesteps(steps, device=device)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    shape = (len(seeds), cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x = randn_tensor(shape, generator=generators, device=device) * scheduler.init_noise_sigma
    labels = labels.to(device)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        eps = guided_eps(gen.dit, model_in, t.to(device), labels, gen.null, guidance)
        x = scheduler.step(eps, t, x, generator=generators).prev_sample
    return x


def generate(gen: Generator, labels: np.ndarray | list[int], sampler: str = "ddim", steps: int = 50,
             guidance: float = 1.5, seed: int = 0, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Crops uint8 [N, H, W, 3] for the given class labels (null = unconditional)."""
    labels = np.asarray(labels, dtype=np.int64)
    out = []
    batches = range(0, len(labels), batch_size)
    for s in tqdm(batches, desc=f"sampling {sampler} x{steps}", disable=not progress or len(batches) < 2):
        lab = torch.from_numpy(labels[s:s + batch_size])
        z = sample_latents(gen, lab, sampler, steps, guidance, seeds=[seed + i for i in range(s, s + len(lab))])
        out.append(decode(gen.vae, z))
    size = gen.image_size
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)
