"""The latent-diffusion generator of the paper: a VAE (diffusers `AutoencoderKL`) maps crops
to latents, a class-conditional DiT (diffusers `DiTTransformer2DModel`) trained as a DDPM
generates latents.

Conventions, fixed here once:
- pixels are floats in [-1, 1]; latents fed to the DiT are `(z - shift) * scale`, with
  shift/scale measured from the data after the VAE is trained (stored in the VAE config as
  `shift_factor` / `scaling_factor`, not Stable Diffusion's 0.18215);
- classes are the store's labels (0 normal, 1 atypical); the null class is index
  `n_classes` (the extra row diffusers' label table already has). Pretraining on unlabelled
  crops uses the null class only; fine-tuning drops each sample's label to null with
  probability `label_dropout`, once per sample. diffusers' own dropout, drawn anew in every
  block, is switched off (`disable_builtin_label_dropout`);
- the DiT predicts the noise only (out_channels = in_channels; sampling uses the DDPM's
  fixed variance). `predict_eps` also accepts a learned-sigma model (2x channels).
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

from data_tools.atomic import atomic_dir
from data_tools.errors import ConfigError

N_CLASSES = 2  # 0 normal, 1 atypical (data_tools.constants)
GENERATOR_META = "generator.json"


@dataclass(frozen=True)
class Arch:
    """Sizes of the VAE and the DiT. The paper names neither; `base` follows its references:
    a Stable-Diffusion-sized KL-VAE (8x down, 4 latent channels) and DiT-B/2."""
    vae_channels: tuple[int, ...]
    vae_layers: int
    vae_groups: int
    latent_channels: int
    dit_heads: int
    dit_head_dim: int
    dit_layers: int
    patch_size: int
    vae_attention: bool = True  # self-attention in the VAE's middle block (off where it trains on small crops)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


ARCHS: dict[str, Arch] = {
    "tiny": Arch((16, 16, 32, 32), 1, 8, 4, 2, 32, 4, 2, vae_attention=False),  # demo and tests, CPU
    "small": Arch((64, 128, 256, 256), 2, 32, 4, 6, 64, 12, 2),  # DiT-S/2
    "base": Arch((128, 256, 512, 512), 2, 32, 4, 12, 64, 12, 2),  # SD-VAE-sized + DiT-B/2
}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ConfigError(f"unknown generator arch {name!r}; choose one of {sorted(ARCHS)}")
    return ARCHS[name]


# ---------------------------------------------------------------- builders

def build_vae(arch: Arch, image_size: int) -> AutoencoderKL:
    if image_size % arch.downsample:
        raise ValueError(f"image size {image_size} is not divisible by the VAE's downsampling {arch.downsample}")
    n = len(arch.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=arch.vae_channels,
                         layers_per_block=arch.vae_layers, latent_channels=arch.latent_channels,
                         norm_num_groups=arch.vae_groups, sample_size=image_size, scaling_factor=1.0,
                         shift_factor=0.0, mid_block_add_attention=arch.vae_attention)


def build_dit(arch: Arch, image_size: int, n_classes: int = N_CLASSES) -> DiTTransformer2DModel:
    latent = image_size // arch.downsample
    if latent % arch.patch_size:
        raise ValueError(f"latent size {latent} is not divisible by the DiT patch size {arch.patch_size}")
    dit = DiTTransformer2DModel(num_attention_heads=arch.dit_heads, attention_head_dim=arch.dit_head_dim,
                                in_channels=arch.latent_channels, out_channels=arch.latent_channels,
                                num_layers=arch.dit_layers, sample_size=latent, patch_size=arch.patch_size,
                                num_embeds_ada_norm=n_classes)
    _dit_init(dit)
    return disable_builtin_label_dropout(dit)


@torch.no_grad()
def _dit_init(dit: DiTTransformer2DModel) -> None:
    """DiT's initialisation (Peebles & Xie, `initialize_weights`): adaLN-Zero modulation and
    output layer at zero, so each block starts as the identity; embeddings N(0, 0.02)."""
    for block in dit.transformer_blocks:
        emb = block.norm1.emb
        torch.nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        for lin in (emb.timestep_embedder.linear_1, emb.timestep_embedder.linear_2):
            torch.nn.init.normal_(lin.weight, std=0.02)
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for lin in (dit.proj_out_1, dit.proj_out_2):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)


def disable_builtin_label_dropout(dit: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Each block of diffusers' DiT has its own `LabelEmbedding` that, in train mode, drops
    labels with its own coin flips (and the output layer re-embeds once more), so one sample
    is conditional in some blocks and unconditional in others. Set every dropout rate to 0;
    the null row of the embedding table stays, and `drop_labels` does the dropout once."""
    for block in dit.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return dit


def null_class(dit: DiTTransformer2DModel) -> int:
    return int(dit.config.num_embeds_ada_norm)


def drop_labels(labels: torch.Tensor, p: float, null: int, draws: BatchRandom | None = None) -> torch.Tensor:
    """Classifier-free-guidance dropout: each sample's label becomes `null` with probability p."""
    if p <= 0:
        return labels
    drop = (draws or BatchRandom(None, len(labels))).rand() < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, null), labels)


def predict_eps(dit: DiTTransformer2DModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The noise prediction; a learned-sigma DiT outputs 2x channels, of which the first half is eps."""
    out = dit(x, timestep=t.expand(x.shape[0]) if t.ndim == 0 else t, class_labels=labels).sample
    return out[:, : x.shape[1]]


def ddpm_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The DDPM the DiT is trained for (DiT's linear betas). No x0 clipping: latents are not in [-1, 1]."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, clip_sample=False, prediction_type="epsilon", variance_type="fixed_small")


# ---------------------------------------------------------------- losses (one training step each)

@dataclass(frozen=True)
class BatchRandom:
    """The random numbers of one training batch, drawn for the whole batch of `size` samples
    and cut to `rows`, the share of one of several data-parallel processes. Every process draws
    the same numbers from the same seeded generator, so N processes together see exactly what
    one process would (one process: all rows). generator None: torch's global generator."""
    generator: torch.Generator | None
    size: int
    rows: slice = field(default_factory=lambda: slice(None))  # a slice is unhashable: no plain default

    def take(self, batch):
        """This process's rows of something with one row per sample of the whole batch."""
        return batch[self.rows]

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn((self.size, *shape), generator=self.generator)[self.rows]

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand((self.size, *shape), generator=self.generator)[self.rows]

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(high, (self.size, *shape), generator=self.generator)[self.rows]


def to_pixels(batch: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    x = torch.tensor(np.asarray(batch)).to(device)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float,
             draws: BatchRandom | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L1 reconstruction + kl_weight * KL per latent element (the KL keeps latents smooth for the DiT).
    The parts come back as detached tensors: reading them (a host sync) is the caller's choice."""
    draws = draws or BatchRandom(None, len(x))
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * draws.randn(*posterior.mean.shape[1:]).to(x.device)
    rec = (vae.decode(z).sample - x).abs().mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    loss = rec + kl_weight * kl
    return loss, {"rec": rec.detach(), "kl": kl.detach()}


def diffusion_loss(dit: DiTTransformer2DModel, scheduler: DDPMScheduler, latents: torch.Tensor,
                   labels: torch.Tensor, draws: BatchRandom | None = None) -> torch.Tensor:
    """The DDPM objective: noise the latents at a random timestep, predict the noise (MSE)."""
    draws = draws or BatchRandom(None, len(latents))
    t = draws.randint(scheduler.config.num_train_timesteps).to(latents.device)
    noise = draws.randn(*latents.shape[1:]).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    return F.mse_loss(predict_eps(dit, noisy, t, labels).float(), noise)


class EMA:
    """Exponential moving average of a model's weights, with the usual warm-up
    (decay_t = min(decay, (1 + t) / (10 + t))) so that short runs still average sensibly."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)


# ---------------------------------------------------------------- latents

@torch.no_grad()
def encode_moments(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every crop (cached so the DiT never runs the encoder)."""
    vae.eval()
    means, stds = [], []
    for s in range(0, len(images), batch_size):
        post = vae.encode(to_pixels(images[s:s + batch_size], device)).latent_dist
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def measure_latent_stats(mean: torch.Tensor, std: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """(shift, scale) so that (z - shift) * scale has zero mean and unit variance over the data."""
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    return float(z.mean()), float(1.0 / z.std().clamp_min(1e-6))


def set_latent_stats(vae: AutoencoderKL, shift: float, scale: float) -> None:
    vae.register_to_config(shift_factor=float(shift), scaling_factor=float(scale))


def latent_stats(vae: AutoencoderKL) -> tuple[float, float]:
    return float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """DiT latents -> uint8 crops [N, H, W, 3]."""
    shift, scale = latent_stats(vae)
    out = [to_uint8(vae.decode(latents[s:s + batch_size] / scale + shift).sample)
           for s in range(0, len(latents), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Crops through the VAE (posterior mean): what the decoder makes of real data."""
    device = next(vae.parameters()).device
    out = [to_uint8(vae.decode(vae.encode(to_pixels(images[s:s + batch_size], device)).latent_dist.mean).sample)
           for s in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, *images.shape[1:]), np.uint8)


# ---------------------------------------------------------------- the saved generator

@dataclass
class Generator:
    """A trained generator: VAE, DiT (EMA weights) and the DDPM it was trained for.

    On disk (and as MLflow artifacts): `vae/` and `dit/` in diffusers' layout
    (config.json + diffusion_pytorch_model.safetensors); `dit/` also holds the DDPM's
    `scheduler_config.json` and `generator.json` (classes, null index, training facts)."""
    vae: AutoencoderKL
    dit: DiTTransformer2DModel
    scheduler: DDPMScheduler
    meta: dict[str, Any]

    @property
    def null(self) -> int:
        return null_class(self.dit)

    @property
    def image_size(self) -> int:
        return int(self.vae.config.sample_size)

    def to(self, device: torch.device | str) -> "Generator":
        self.vae.to(device).eval()
        self.dit.to(device).eval()
        return self

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_dir(out / "vae", lambda tmp: self.vae.save_pretrained(tmp))

        def write_dit(tmp: Path) -> None:
            self.dit.save_pretrained(tmp)
            self.scheduler.save_pretrained(tmp)
            (tmp / GENERATOR_META).write_text(json.dumps(self.meta, indent=1, default=str))
        _atomic_dir(out / "dit", write_dit)
        return out

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "Generator":
        path = Path(path)
        for part in ("vae", "dit"):
            if not (path / part / "config.json").is_file():
                raise FileNotFoundError(f"{path / part} is not a saved generator part (no config.json)")
        vae = AutoencoderKL.from_pretrained(path / "vae", low_cpu_mem_usage=False)
        dit = DiTTransformer2DModel.from_pretrained(path / "dit", low_cpu_mem_usage=False)
        dit = disable_builtin_label_dropout(dit)
        scheduler = DDPMScheduler.from_pretrained(path / "dit")
        meta_file = path / "dit" / GENERATOR_META
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        return cls(vae, dit, scheduler, meta).to(device)


def new_generator(arch_name: str, image_size: int, num_train_timesteps: int = 1000) -> Generator:
    arch = get_arch(arch_name)
    meta = {"arch": arch_name, **asdict(arch), "classes": {"0": "normal", "1": "atypical"}, "null_class": N_CLASSES}
    vae, dit = build_vae(arch, image_size), build_dit(arch, image_size)
    return Generator(vae, dit, ddpm_scheduler(num_train_timesteps), meta)


def _atomic_dir(out: Path, write) -> None:
    """Write a folder via a temporary sibling and a rename, so a kill never leaves half of it."""
    with atomic_dir(out) as tmp:
        write(tmp)
