"""Training augmentation, applied to whole batches as tensors on the training device, and
the resize + normalise (optionally stain normalisation) that validation, test and inference share.

Input is a uint8 [N, H, W, 3] batch straight from a store. Every random draw comes from a
CPU `torch.Generator` (a few numbers per image), so a batch is augmented identically on
CPU and GPU and a resumed epoch repeats exactly. Per image: one affine warp (scale,
translation, rotation, horizontal/vertical flip folded into one matrix, reflection at the
borders), colour jitter (brightness, contrast, saturation, hue as a rotation in YIQ
space), and a sharpness change (torchvision's 3x3 smoothing blend) with probability p:
the paper's augmentation. `strong` adds, after the warp, HED stain jitter (Tellez et al.
2018: per image and stain, optical density in haematoxylin-eosin-DAB space scaled by
alpha ~ U(1-s, 1+s) and shifted by beta ~ U(-b, b)) and, last, a Gaussian blur with
probability p. Their numbers are drawn after the paper's, and only when they are on, so
the paper's presets give the same batches as before they existed.

`stain_norm=macenko` maps every crop onto one reference stain appearance (Macenko et al.
2009, batched: stain vectors from the extreme angles of the tissue pixels' optical density
in its principal plane, concentrations rescaled to the reference's 99th percentile); it is
preprocessing, so training and inference must use the same setting. The reference is
Macenko's published one, a constant, so the setting needs no state beside the model.
Hand-written (the HED jitter too: no library draws it from a caller's CPU generator):
torchstain normalises one [C, H, W] image at a time, torch-staintools (batched; the same stain
vectors on the tests' tissue) fits only to a reference image, pins kornia 0.8, returns
inference-mode tensors and, on any error, hands the batch back unchanged with a log line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

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
    # beyond the paper (all off in its presets; `strong` turns them on)
    hed_scale: float = 0.0  # s: alpha ~ U(1 - s, 1 + s) per image and HED channel
    hed_shift: float = 0.0  # b: beta ~ U(-b, b), optical density units
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.0)  # Gaussian sigma in pixels of the crop as augmented

    @property
    def stain_jitter(self) -> bool:
        return self.hed_scale > 0 or self.hed_shift > 0

    @property
    def extended(self) -> bool:
        """Whether anything beyond the paper's augmentation is on (and draws numbers)."""
        return self.stain_jitter or self.blur_p > 0


# named presets (the train_cv parameter `augment`): the paper's, flips only, none, and `strong`
# in the spirit of the MIDOG 2025 winner's heavy augmentation: any rotation, wider scale and
# colour ranges, HED stain jitter, focus blur (our ranges; the winner's exact pipeline is not published)
PRESETS: dict[str, AugmentConfig | None] = {
    "paper": AugmentConfig(),
    "flips": AugmentConfig(scale=(1.0, 1.0), translate=0.0, rotate=0.0, brightness=0.0, contrast=0.0,
                           saturation=0.0, hue=0.0, sharpness_p=0.0),
    "none": None,
    "strong": AugmentConfig(scale=(0.8, 1.25), translate=0.1, rotate=180.0, brightness=0.25, contrast=0.25,
                            saturation=0.25, hue=0.05, hed_scale=0.2, hed_shift=0.05, blur_p=0.2,
                            blur_sigma=(0.1, 1.0)),
}
STAIN_NORMS = ("none", "macenko")


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


def preprocess(batch: torch.Tensor, size: int, mean, std, device: torch.device | str,
               stain_norm: str = "none") -> torch.Tensor:
    """Validation / test / inference: (stain normalisation,) resize + normalise only."""
    return normalize(resize(stain_normalize(to_float(batch, device), stain_norm), size), mean, std)


def augment_and_preprocess(batch: torch.Tensor, size: int, mean, std, device: torch.device | str,
                           generator: torch.Generator, cfg: AugmentConfig = AugmentConfig(),
                           stain_norm: str = "none") -> torch.Tensor:
    """Training: augment at the smaller of the crop and model sizes (cheaper), resize, normalise."""
    x = to_float(batch, device)
    if x.shape[-1] > size:
        x = resize(x, size)
    x = augment(stain_normalize(x, stain_norm), generator, cfg)
    return normalize(resize(x, size), mean, std)


def augment(x: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Augment float [N, 3, H, W] images in [0, 1]; returns a new tensor in [0, 1]."""
    n = x.shape[0]
    r = torch.rand(n, 12, generator=generator).to(x.device)
    extra = torch.rand(n, 8, generator=generator).to(x.device) if cfg.extended else None
    x = _affine(x, r[:, 0:6], cfg)
    if extra is not None and cfg.stain_jitter:
        x = hed_jitter(x, _uniform(extra[:, 0:3], 1 - cfg.hed_scale, 1 + cfg.hed_scale),
                       _uniform(extra[:, 3:6], -cfg.hed_shift, cfg.hed_shift))
    x = _colour(x, r[:, 6:10], cfg)
    x = _sharpness(x, r[:, 10:12], cfg)
    if extra is not None:
        x = _blur(x, extra[:, 6:8], cfg)
    return x


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


def _blur(x: torch.Tensor, r: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Separable Gaussian blur, sigma ~ U(blur_sigma) per image, applied with probability blur_p."""
    if cfg.blur_p <= 0:
        return x
    n, c, h, w = x.shape
    radius = max(1, math.ceil(2 * cfg.blur_sigma[1]))
    sigma = _uniform(r[:, 1], *cfg.blur_sigma).to(x.dtype).clamp_min(1e-3)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N * 3, 2r + 1]: one kernel per image and channel
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c).view(n, c, h, w).clamp_(0, 1)
    return torch.where((r[:, 0] < cfg.blur_p).view(-1, 1, 1, 1), y, x)


# --- stains: optical density, HED (Ruifrok & Johnston's vectors, skimage.color's rgb_from_hed), Macenko

_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])  # rows: H, E, DAB
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_OD_FLOOR = 1e-6  # skimage's: a black pixel has optical density -log(1e-6), not infinity


def optical_density(x: torch.Tensor) -> torch.Tensor:
    """Beer-Lambert: OD = -log(intensity), per RGB channel, of [N, 3, H, W] images in [0, 1]."""
    return -torch.log(x.clamp_min(_OD_FLOOR))


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> haematoxylin, eosin, DAB densities [N, 3, H, W] (skimage's
    rgb2hed without its rescaling by -log(1e-6))."""
    return torch.einsum("nchw,cs->nshw", optical_density(x), _HED_FROM_RGB.to(x.device, x.dtype))


def hed_jitter(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Per image: HED densities * alpha + beta ([N, 3] each), back to RGB, clamped to [0, 1].
    One 3x3 map and offset per image in optical density space (alpha = 1, beta = 0: identity)."""
    to_hed, to_od = _HED_FROM_RGB.to(x.device, x.dtype), _RGB_FROM_HED.to(x.device, x.dtype)
    m = to_hed @ (alpha.to(x.dtype)[:, :, None] * to_od)  # [N, 3, 3]: OD row vector -> jittered OD row vector
    shift = beta.to(x.dtype) @ to_od  # [N, 3]
    od = torch.einsum("nchw,ncd->ndhw", optical_density(x), m) + shift[:, :, None, None]
    return torch.exp(-od).clamp_(0, 1)


class StainReference(NamedTuple):
    """The target of Macenko normalisation: unit OD vectors of H and E and their 99th-percentile concentrations."""
    stains: torch.Tensor  # [3, 2]: columns H, E
    max_conc: torch.Tensor  # [2]


# Macenko's reference (the value in his code, torchstain and HEnorm_python)
MACENKO_REFERENCE = StainReference(torch.tensor([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]),
                                   torch.tensor([1.9705, 1.0308]))
MIN_TISSUE = 0.05  # a crop with fewer tissue pixels than this share is left as it is


def stain_normalize(x: torch.Tensor, method: str = "none") -> torch.Tensor:
    if method == "none":
        return x
    if method == "macenko":
        return macenko_normalize(x)
    raise ConfigError(f"stain_norm must be one of {STAIN_NORMS}, got {method!r}")


def macenko_normalize(x: torch.Tensor, reference: StainReference = MACENKO_REFERENCE,
                      od_threshold: float = 0.15, percentile: float = 1.0) -> torch.Tensor:
    """Macenko normalisation of [N, 3, H, W] images in [0, 1] onto `reference`, batched."""
    stains, conc, max_conc, ok = _macenko(x, od_threshold, percentile)
    ref_stains = reference.stains.to(x.device, x.dtype)
    conc = conc * (reference.max_conc.to(x.device, x.dtype) / max_conc)[:, :, None]
    out = torch.exp(-(ref_stains @ conc)).clamp_(0, 1).view_as(x)
    return torch.where(ok.view(-1, 1, 1, 1), out, x)


def fit_stain_reference(x: torch.Tensor, od_threshold: float = 0.15, percentile: float = 1.0) -> StainReference:
    """A reference from example crops [N, 3, H, W]: the median over those with enough tissue."""
    stains, _, max_conc, ok = _macenko(x, od_threshold, percentile)
    if not bool(ok.any()):
        raise ConfigError("no reference crop has enough tissue for a Macenko stain estimate")
    s = stains[ok].median(0).values
    return StainReference(s / s.norm(dim=0, keepdim=True), max_conc[ok].median(0).values)


def _macenko(x: torch.Tensor, od_threshold: float, percentile: float):
    """(stain vectors [N, 3, 2], concentrations [N, 2, P], 99th-percentile concentrations [N, 2], ok [N])."""
    od = optical_density(x).flatten(2)  # [N, 3, P]
    # tissue: OD vector longer than the threshold. Macenko's code asks it of every channel, which
    # drops light eosin (its red OD is a tenth of its green) and then finds no eosin vector
    tissue = od.norm(dim=1) > od_threshold  # [N, P]
    ok = tissue.float().mean(1) >= MIN_TISSUE
    tissue = tissue | ~ok[:, None]  # crops left as they are still compute (on all pixels): no data-dependent shapes
    w = tissue.to(od.dtype)[:, None]
    count = w.sum(2, keepdim=True)
    centred = (od - (od * w).sum(2, keepdim=True) / count) * w
    cov = centred @ centred.transpose(1, 2) / (count - 1).clamp_min(1)
    plane = torch.linalg.eigh(cov).eigenvectors[..., 1:]  # [N, 3, 2]: the two largest, ascending
    plane = plane * torch.where(plane.sum(1, keepdim=True) < 0, -1.0, 1.0)  # eigh's signs are arbitrary
    proj = plane.transpose(1, 2) @ od  # [N, 2, P]
    lo, hi = _masked_percentiles(torch.atan2(proj[:, 1], proj[:, 0]), tissue, (percentile, 100 - percentile))
    v_lo = (plane @ torch.stack([lo.cos(), lo.sin()], 1)[..., None])[..., 0]  # [N, 3]
    v_hi = (plane @ torch.stack([hi.cos(), hi.sin()], 1)[..., None])[..., 0]
    h_first = (v_lo[:, 0] > v_hi[:, 0])[:, None, None]  # haematoxylin absorbs more red
    stains = torch.where(h_first, torch.stack([v_lo, v_hi], 2), torch.stack([v_hi, v_lo], 2))
    conc = torch.linalg.pinv(stains) @ od  # [N, 2, P], least squares
    max_conc = _masked_percentiles(conc, tissue[:, None], (99.0,))[0].clamp_min(1e-6)
    return stains, conc, max_conc, ok


def _masked_percentiles(v: torch.Tensor, mask: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """[len(qs), ...]: per row of v [..., P], the q-th percentiles (nearest rank) of the entries
    where mask (broadcast to v) is true; one sort for all qs."""
    mask = mask.expand_as(v)
    ordered = v.masked_fill(~mask, math.inf).sort(-1).values
    last = (mask.sum(-1, keepdim=True) - 1).clamp_min(0)
    return torch.stack([ordered.gather(-1, (last * (q / 100)).round().long())[..., 0] for q in qs])
