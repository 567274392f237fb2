"""The paper's training augmentation, applied to whole batches as tensors on the training
device, and the resize + normalise that validation, test and inference share.

Input is a uint8 [N, H, W, 3] batch straight from a store. Every random draw comes from a
CPU `torch.Generator` (a few numbers per image), so a batch is augmented identically on
CPU and GPU and a resumed epoch repeats exactly. Per image: one affine warp (scale,
translation, rotation, horizontal/vertical flip folded into one matrix, reflection at the
borders), colour jitter (brightness, contrast, saturation, hue as a rotation in YIQ
space), and a sharpness change (torchvision's 3x3 smoothing blend) with probability p.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data_tools.errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    """The paper's values (the paper, "Augmentations")."""
    scale: tuple[float, float] = (0.95, 1.25)
    translate: float = 0.1  # fraction of the crop size, each axis (torchvision RandomAffine's convention)
    rotate: float = 30.0  # degrees, +-
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    hue: float = 0.05  # fraction of a full turn, +-
    sharpness: float = 0.25
    sharpness_p: float = 0.5
    hflip_p: float = 0.5
    vflip_p: float = 0.5


# named presets (the train_cv parameter `augment`): the paper's, flips only, none
PRESETS: dict[str, AugmentConfig | None] = {
    "paper": AugmentConfig(),
    "flips": AugmentConfig(scale=(1.0, 1.0), translate=0.0, rotate=0.0, brightness=0.0, contrast=0.0,
                           saturation=0.0, hue=0.0, sharpness_p=0.0),
    "none": None,
}


def preset(name: str) -> AugmentConfig | None:
    if name not in PRESETS:
        raise ConfigError(f"augment must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


GRAY = (0.299, 0.587, 0.114)


def to_float(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 [N, H, W, 3] (any device) -> float [N, 3, H, W] in [0, 1] on `device`."""
    return batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def preprocess(batch: torch.Tensor, size: int, mean, std, device: torch.device | str) -> torch.Tensor:
    """Validation / test / inference: resize + normalise only."""
    return normalize(resize(to_float(batch, device), size), mean, std)


def augment_and_preprocess(batch: torch.Tensor, size: int, mean, std, device: torch.device | str,
                           generator: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Training: augment at the smaller of the crop and model sizes (cheaper), resize, normalise."""
    x = to_float(batch, device)
    if x.shape[-1] > size:
        x = resize(x, size)
    x = augment(x, generator, cfg)
    return normalize(resize(x, size), mean, std)


def augment(x: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Augment float [N, 3, H, W] images in [0, 1]; returns a new tensor in [0, 1]."""
    n = x.shape[0]
    r = torch.rand(n, 12, generator=generator).to(x.device)
    x = _affine(x, r[:, 0:6], cfg)
    x = _colour(x, r[:, 6:10], cfg)
    return _sharpness(x, r[:, 10:12], cfg)


def _uniform(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


def _affine(x: torch.Tensor, r: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    scale = _uniform(r[:, 0], *cfg.scale)
    angle = _uniform(r[:, 1], -cfg.rotate, cfg.rotate) * (math.pi / 180)
    shift = _uniform(r[:, 2:4], -cfg.translate, cfg.translate) * 2  # normalised coordinates span 2
    fx = torch.where(r[:, 4] < cfg.hflip_p, -1.0, 1.0)
    fy = torch.where(r[:, 5] < cfg.vflip_p, -1.0, 1.0)
    # output -> input: x_in = F S^-1 R(-angle) (x_out - t); grid_sample wants that map
    cos, sin = torch.cos(angle), torch.sin(angle)
    inv_rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # R(-angle)
    inv = torch.stack([fx, fy], -1).unsqueeze(-1) / scale.view(-1, 1, 1) * inv_rot
    theta = torch.cat([inv, -(inv @ shift.unsqueeze(-1))], dim=2).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * a + (1 - factor) * b, clamped (torchvision's _blend)."""
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp_(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _colour(x: torch.Tensor, r: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    b = _uniform(r[:, 0], 1 - cfg.brightness, 1 + cfg.brightness)
    c = _uniform(r[:, 1], 1 - cfg.contrast, 1 + cfg.contrast)
    s = _uniform(r[:, 2], 1 - cfg.saturation, 1 + cfg.saturation)
    h = _uniform(r[:, 3], -cfg.hue, cfg.hue) * (2 * math.pi)
    x = (x * b.view(-1, 1, 1, 1)).clamp_(0, 1)
    x = _blend(x, _gray(x).mean((2, 3), keepdim=True), c)
    x = _blend(x, _gray(x), s)
    return _hue_rotate(x, h)


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)  # once, not per batch (on a GPU, inv waits for the device)


def _hue_rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma plane of YIQ by `angle` per image (a linear stand-in for an HSV hue shift)."""
    to_yiq = _RGB2YIQ.to(x.device, x.dtype)
    to_rgb = _YIQ2RGB.to(x.device, x.dtype)
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rot = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, cos, -sin], -1),
                       torch.stack([zero, sin, cos], -1)], -2)
    m = to_rgb @ rot @ to_yiq  # [N, 3, 3]
    return torch.einsum("nij,njhw->nihw", m, x).clamp_(0, 1)


def _sharpness(x: torch.Tensor, r: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    if cfg.sharpness_p <= 0:  # not `apply.any()`: reading it back would stall the GPU every batch
        return x
    apply = r[:, 0] < cfg.sharpness_p
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device) / 13
    smooth = F.conv2d(x, k.expand(3, 1, 3, 3), groups=3)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth  # torchvision keeps the border pixels
    factor = torch.where(apply, torch.tensor(cfg.sharpness, dtype=x.dtype, device=x.device), torch.ones_like(r[:, 0]))
    return _blend(x, degenerate, factor)
