"""How good, and how original, are synthetic crops? Distribution distances (KID, FID),
a memorisation check, and image grids.

Features. KID/FID need a feature extractor. The standard one (Inception-v3 on ImageNet)
needs a download, and a randomly initialised network measures nothing. The default here is
a fixed, hand-made descriptor of what matters in an H&E mitotic-figure crop: stain colour
(optical-density statistics), chromatin layout around the centre (radial profile), texture
and sharpness (gradient histograms, power spectrum) and figure morphology (chromatin area
and the number of separate chromatin clumps, which is what tells a multipolar or lagging
figure from a plate). It needs no weights, is identical on every machine, and, unlike
the fold's own VAE encoder, does not share the generator's blind spots, so numbers are
comparable across folds, runs and samplers. `inception_features` gives the standard
features on a machine that can download torchvision's weights.

Memorisation. For each synthetic crop, the distance (pixels at 32x32) to its nearest
neighbour among the generator's training crops. It is judged against a reference: the
same distance for real crops the generator never saw, passed through its VAE (so both
carry the decoder's blur). A synthetic crop is a near-copy if it is closer to a training
crop than the `q` quantile of the reference; a generator that does not copy scores about q.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg, ndimage

from data_tools.constants import LABEL_NAMES
from data_tools.errors import ConfigError
from data_tools.grids import mosaic

# ---------------------------------------------------------------- features

FEATURES = ("descriptor", "inception")


def descriptor(images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Fixed, weight-free features of uint8 crops [N, H, W, 3] -> float64 [N, 77]."""
    out = [_descriptor_batch(images[s:s + batch_size]) for s in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 77))


def _descriptor_batch(images: np.ndarray) -> np.ndarray:
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(64, 64), mode="area") if x.shape[-1] != 64 else x
    od = -torch.log((x + 1.0) / 256.0)  # optical density per RGB channel (Beer-Lambert)
    n = od.shape[0]
    flat = od.flatten(2)
    colour = torch.cat([flat.mean(2), flat.std(2), torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9]), dim=2)
                        .permute(1, 2, 0).reshape(n, -1)], 1)  # 15
    dens = od.sum(1)  # [N, 64, 64] total stain
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    ring = (((yy - 31.5) ** 2 + (xx - 31.5) ** 2).sqrt() / 4).long().clamp(max=7).flatten()  # 8 rings of 4 px
    df = dens.flatten(1)
    count = torch.bincount(ring, minlength=8).float()
    r_mean = torch.zeros(n, 8).index_add_(1, ring, df) / count
    r_sq = torch.zeros(n, 8).index_add_(1, ring, df ** 2) / count
    radial = torch.cat([r_mean, (r_sq - r_mean ** 2).clamp_min(0).sqrt()], 1)  # 16
    grads = []
    for img in (dens, F.avg_pool2d(dens[:, None], 2)[:, 0]):
        gy, gx = torch.gradient(img, dim=(1, 2))
        mag = (gx ** 2 + gy ** 2).sqrt().flatten(1)
        bins = torch.bucketize(mag, torch.linspace(0, 1.5, 17)[1:-1])  # 16 bins, the last one open
        grads.append(F.one_hot(bins, 16).float().mean(1))
    spec = torch.fft.fftshift(torch.fft.fft2(dens - dens.mean((1, 2), keepdim=True)).abs() ** 2, dim=(1, 2)).flatten(1)
    power = torch.log1p(torch.zeros(n, 8).index_add_(1, ring, spec) / count)  # 8
    morph = torch.as_tensor(np.stack([_morphology(d) for d in dens.numpy()]), dtype=torch.float32)  # 6
    return torch.cat([colour, radial, *grads, power, morph], 1).double().numpy()


def _morphology(dens: np.ndarray) -> np.ndarray:
    """Chromatin area at 3 density levels relative to the crop's background, clumps at 3."""
    base = np.median(dens)
    feats = []
    for rel in (0.6, 1.0, 1.5):
        mask = dens > base + rel
        feats.append(mask.mean())
        feats.append(float(ndimage.label(mask)[1]))
    return np.array(feats)


@functools.lru_cache(maxsize=2)
def _inception(device: str) -> torch.nn.Module:
    from torchvision.models import Inception_V3_Weights, inception_v3
    try:
        net = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1, aux_logits=True)
    except Exception as e:  # noqa: BLE001 - any download/cache failure
        raise RuntimeError(f"Inception-v3 weights unavailable (offline?): {e}. "
                           "Use the default descriptor features.") from e
    net.fc = torch.nn.Identity()
    return net.eval().to(device)


def inception_features(images: np.ndarray, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    """The standard FID features (Inception-v3 pool, 2048-d). Needs torchvision's ImageNet
    weights (downloaded once into the torch cache); fails loudly where they cannot be had."""
    net = _inception(str(device))
    mean = torch.tensor([0.485, 0.456, 0.406], device=device)[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225], device=device)[:, None, None]
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = torch.as_tensor(np.asarray(images[s:s + batch_size]), device=device).permute(0, 3, 1, 2).float() / 255
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(net((x - mean) / std).double().cpu().numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------- distances


def standardise(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Put the features (different units) on one scale: the pooled mean/std of both sets.
    Pooled, not the real set's alone: a feature constant in the real crops (say, no second
    chromatin clump) would otherwise blow any synthetic deviation up without bound.
    Features constant in both sets carry no information and are dropped."""
    both = np.concatenate([real, fake])
    mu, sd = both.mean(0), both.std(0)
    keep = sd > 1e-8
    return (real[:, keep] - mu[keep]) / sd[keep], (fake[:, keep] - mu[keep]) / sd[keep]


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 50, subset_size: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the cubic
    polynomial kernel, mean and std over random subsets."""
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    d = real.shape[1]
    vals = []
    for _ in range(subsets):
        r = real[rng.choice(len(real), m, replace=False)]
        f = fake[rng.choice(len(fake), m, replace=False)]
        k_rr, k_ff, k_rf = ((r @ r.T) / d + 1) ** 3, ((f @ f.T) / d + 1) ** 3, ((r @ f.T) / d + 1) ** 3
        off = ~np.eye(m, dtype=bool)
        vals.append(k_rr[off].mean() + k_ff[off].mean() - 2 * k_rf.mean())
    return float(np.mean(vals)), float(np.std(vals))


def fid(real: np.ndarray, fake: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to the two feature sets."""
    if len(real) < 2 or len(fake) < 2:
        return float("nan")
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    with warnings.catch_warnings():  # fewer samples than feature dimensions: singular by construction
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(covmean)))


def distribution_distance(real: np.ndarray, fake: np.ndarray, seed: int = 0, features: str = "descriptor",
                          device: str = "cpu") -> dict[str, float]:
    """KID (mean, std) and FID between two sets of crops, on `descriptor` or `inception` features."""
    if features == "descriptor":
        r, f = standardise(descriptor(real), descriptor(fake))
    elif features == "inception":
        r, f = inception_features(real, device), inception_features(fake, device)
    else:
        raise ConfigError(f"unknown features {features!r}; choose one of {FEATURES}")
    k, k_std = kid(r, f, seed=seed)
    return {"kid": k, "kid_std": k_std, "fid": fid(r, f)}


# ---------------------------------------------------------------- memorisation


def _thumbs(images: np.ndarray, size: int = 32) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255
    return F.interpolate(x, size=(size, size), mode="area").flatten(1)


def nearest_neighbours(queries: np.ndarray, pool: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """For each query crop, the index of and RMS pixel distance (32x32, [0,1]) to its nearest pool crop."""
    return _nearest(queries, _thumbs(pool), chunk)


def _nearest(queries: np.ndarray, pool_t: torch.Tensor, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    idx, dist = [], []
    for s in range(0, len(queries), chunk):
        d = torch.cdist(_thumbs(queries[s:s + chunk]), pool_t)
        v, i = d.min(1)
        idx.append(i.numpy())
        dist.append(v.numpy() / np.sqrt(pool_t.shape[1]))
    return np.concatenate(idx), np.concatenate(dist)


def memorisation(synthetic: np.ndarray, train: np.ndarray, reference: np.ndarray, q: float = 0.05) -> dict[str, float]:
    """Near-copy share of synthetic crops, calibrated on unseen `reference` crops (see module doc)."""
    pool_t = _thumbs(train)
    return near_copy_figures(_nearest(synthetic, pool_t)[1], _nearest(reference, pool_t)[1], q)


def near_copy_figures(d_syn: np.ndarray, d_ref: np.ndarray, q: float = 0.05) -> dict[str, float]:
    """The memorisation figures from nearest-training-crop distances of synthetic and reference crops."""
    threshold = float(np.quantile(d_ref, q))
    return {"near_copy_share": float((d_syn < threshold).mean()), "near_copy_threshold": threshold,
            "nn_dist_median": float(np.median(d_syn)), "nn_dist_ratio": float(np.median(d_syn) / np.median(d_ref))}


# ---------------------------------------------------------------- grids


def side_by_side(real: np.ndarray, synthetic: np.ndarray, ncols: int = 4, gap: int = 12) -> np.ndarray:
    """Real crops (left panel) and synthetic crops (right panel) of one class, same grid size."""
    n = min(len(real), len(synthetic), ncols * ncols)
    ncols = min(ncols, max(n, 1))
    left, right = mosaic(real[:n], ncols), mosaic(synthetic[:n], ncols)
    h = max(left.shape[0], right.shape[0])
    canvas = np.full((h, left.shape[1] + gap + right.shape[1], 3), 255, np.uint8)
    canvas[: left.shape[0], : left.shape[1]] = left
    canvas[: right.shape[0], left.shape[1] + gap:] = right
    return canvas


def nearest_pairs(synthetic: np.ndarray, train: np.ndarray, n: int = 8,
                  neighbours: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The n synthetic crops closest to a training crop (top row) above that crop (bottom row);
    `neighbours`: nearest_neighbours(synthetic, train) when already computed."""
    idx, dist = neighbours if neighbours is not None else nearest_neighbours(synthetic, train)
    order = np.argsort(dist)[:n]
    return mosaic(np.concatenate([synthetic[order], train[idx[order]]]), cols=max(len(order), 1))


# ---------------------------------------------------------------- one fold's report


def quality_report(synthetic: np.ndarray, synthetic_labels: np.ndarray, train: np.ndarray, train_labels: np.ndarray,
                   reference: np.ndarray, max_n: int = 1000, seed: int = 0, features: tuple[str, ...] = ("descriptor",),
                   device: str = "cpu") -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Metrics and grids for one fold's synthetic crops against the generator's training crops.

    Per class present in `synthetic_labels`: KID/FID against real training crops of that
    class (`kid_<class>`, `fid_<class>`; `kid_inception_<class>`... with `features` including
    "inception") and a real-vs-synthetic grid; over all synthetic crops:
    the memorisation figures and a grid of the closest synthetic/training pairs. `reference`:
    unseen real crops passed through the fold's VAE. The sets compared are capped at `max_n`
    random crops; the nearest-neighbour search covers every training crop."""
    rng = np.random.default_rng(seed)

    def cap(rows: np.ndarray) -> np.ndarray:
        return np.sort(rng.choice(rows, min(max_n, len(rows)), replace=False))

    metrics: dict[str, float] = {}
    grids: dict[str, np.ndarray] = {}
    for c in sorted(set(np.asarray(synthetic_labels).tolist()), reverse=True):
        name = LABEL_NAMES[int(c)]
        real_rows = cap(np.flatnonzero(train_labels == c))
        fake_rows = cap(np.flatnonzero(synthetic_labels == c))
        real, fake = np.asarray(train[real_rows]), synthetic[fake_rows]
        if len(real) and len(fake):
            for feats in features:  # descriptor: kid_<class>; inception: kid_inception_<class>
                tag = "" if feats == "descriptor" else f"{feats}_"
                dist = distribution_distance(real, fake, seed=seed, features=feats, device=device)
                metrics.update({f"{k}_{tag}{name}": v for k, v in dist.items()})
            grids[f"real_vs_synthetic_{name}"] = side_by_side(real, fake)
    syn = synthetic[cap(np.arange(len(synthetic)))]
    pool = np.asarray(train)  # all of them: a copy of any training crop must be found
    if len(syn) and len(pool) and len(reference):
        pool_t = _thumbs(pool)  # once: the thumbnails of every training crop are the costly part
        idx, d_syn = _nearest(syn, pool_t)
        metrics.update(near_copy_figures(d_syn, _nearest(reference, pool_t)[1]))
        grids["nearest_training_pairs"] = nearest_pairs(syn, pool, neighbours=(idx, d_syn))
    return metrics, grids
