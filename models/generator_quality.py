"""How good, and how original, are synthetic crops? Distribution distances (KID, FID),
a memorisation check, and image grids.

Features. KID/FID need a feature extractor, and a randomly initialised network measures
nothing. The default here is a fixed, hand-made descriptor of what matters in an H&E
mitotic-figure crop: stain colour (optical-density statistics), chromatin layout around the
centre (radial profile), texture and sharpness (gradient histograms, power spectrum) and
figure morphology (chromatin area and the number of separate chromatin clumps, which is what
tells a multipolar or lagging figure from a plate). It needs no weights, is identical on every machine, and, unlike
the fold's own VAE encoder, does not share the generator's blind spots, so numbers are
comparable across folds, runs and samplers, though not with any published figure.
The `inception` option computes on an Inception-v3's 2048-d pool features, and which network
it is decides what the numbers may be compared with (FEATURE_SETS): given the standard FID
Inception weights (`fid_weights`: the TensorFlow network of 2015-12-05 that every published
FID uses, as torch-fidelity and pytorch-fid ship it, loaded offline through torch-fidelity),
its FID is the FID of the literature (at the same number of crops: `quality_max` per class
caps it, and FID falls as it grows); without them it is torchvision's ImageNet Inception-v3
(a classifier with other weights and preprocessing), whose "FID" is not comparable with
published values and is named apart (`imagenet_inception`).

Memorisation. For each synthetic crop, the distance (pixels at 32x32) to its nearest
neighbour among the generator's training crops. It is judged against a reference: the
same distance for real crops the generator never saw, passed through its VAE (so both
carry the decoder's blur). A synthetic crop is a near-copy if it is closer to a training
crop than the `q` quantile of the reference; a generator that does not copy scores about q.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from data_tools.constants import LABEL_NAMES
from data_tools.errors import ConfigError, UserError
from data_tools.grids import mosaic

# ---------------------------------------------------------------- features

FEATURES = ("descriptor", "inception")  # what a user asks for (synthesize's `features`)
# what is computed, by name (in the metric names: analysis.keys.quality_metric) and in words
FEATURE_SETS = {
    "descriptor": "descriptor features (weight-free, this project's; not comparable with published FID values)",
    "imagenet_inception": "ImageNet Inception-v3 features (torchvision's classifier weights; not comparable with "
                          "published FID values)",
    "fid_inception": "FID: the standard FID Inception-v3 weights (comparable with published FID values of as many "
                     "crops: FID falls with the number of crops)",
}
FID_WEIGHTS_NAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")


def feature_set(features: str, fid_weights: str | None = None) -> str:
    """The feature set a `features` word computes: `inception` is the FID Inception with `fid_weights`
    (a file), torchvision's ImageNet Inception-v3 without."""
    if features not in FEATURES:
        raise ConfigError(f"unknown features {features!r}; choose from {', '.join(FEATURES)}")
    if features == "descriptor":
        return "descriptor"
    return "fid_inception" if fid_weights else "imagenet_inception"


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
        raise UserError(f"torchvision's ImageNet Inception-v3 weights are unavailable (offline?): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. Give fid_weights=<the FID "
                        f"Inception weights file> or use the default descriptor features") from None
    net.fc = torch.nn.Identity()
    return net.eval().to(device)


def imagenet_inception_features(images: np.ndarray, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    """torchvision's ImageNet Inception-v3 pool features (2048-d): not the FID network (see the
    module doc). Needs torchvision's weights (downloaded once into the torch cache)."""
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


@functools.lru_cache(maxsize=2)
def fid_inception(weights: str, device: str = "cpu") -> torch.nn.Module:
    """torch-fidelity's FID Inception-v3 (the 2015-12-05 TensorFlow network) with the weights in the
    file `weights`, offline; a missing or wrong file is a one-line error naming it."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = Path(weights).expanduser()
    how = (f"give the FID Inception weights as a file (torch-fidelity's {FID_WEIGHTS_NAMES[0]} or "
           f"pytorch-fid's {FID_WEIGHTS_NAMES[1]}), or leave fid_weights empty")
    if not path.is_file():
        raise UserError(f"fid_weights={weights}: no such file; {how}")
    try:
        torch.load(path, map_location="cpu", weights_only=True)  # tensors only: a file that would run code stops here
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except Exception as e:  # noqa: BLE001 - not a state dict, or not this architecture's
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"fid_weights={weights} is not the FID Inception-v3 weights ({why}); {how}") from None
    return net.to(device)


def fid_inception_features(images: np.ndarray, weights: str, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    """The FID features (2048-d pool of the FID Inception, torch-fidelity's resize and scaling) of uint8
    crops [N, H, W, 3]."""
    net = fid_inception(str(weights), str(device))
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = torch.as_tensor(np.asarray(images[s:s + batch_size]), device=device).permute(0, 3, 1, 2).contiguous()
            out.append(net(x)[0].double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2048))


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


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the two feature sets:
    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))."""
    if len(real) < 2 or len(fake) < 2:
        return float("nan")
    a, b = real - real.mean(0), fake - fake.mean(0)
    n, m = len(a) - 1, len(b) - 1
    trace_s1, trace_s2 = (a ** 2).sum() / n, (b ** 2).sum() / m
    diff = real.mean(0) - fake.mean(0)
    return float(diff @ diff + trace_s1 + trace_s2 - 2 * trace_sqrt_product(a, b))


def trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
    """tr(sqrt(S1 S2)) of the covariances of centred samples a [n, d] and b [m, d], exactly, without
    a d x d matrix square root: the non-zero eigenvalues of S1 S2 = a'a b'b / (n-1)(m-1) are those of
    (a b')(a b')' / (n-1)(m-1), the squared singular values of a b' (scaled). With fewer samples than
    features (2048-d Inception features) this is an SVD of an n x m matrix instead of scipy's sqrtm
    of a 2048 x 2048 one, which took 79 s on 2 cores for 4 samples; with more, the symmetric
    form sqrt(S1) S2 sqrt(S1)."""
    n, m, d = len(a) - 1, len(b) - 1, a.shape[1]
    if min(len(a), len(b)) <= d:
        return float(np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(n * m))
    w, v = np.linalg.eigh(a.T @ a / n)
    root = (v * np.sqrt(w.clip(min=0))) @ v.T
    eig = np.linalg.eigvalsh(root @ (b.T @ b / m) @ root)
    return float(np.sqrt(eig.clip(min=0)).sum())


def distribution_distance(real: np.ndarray, fake: np.ndarray, seed: int = 0, features: str = "descriptor",
                          device: str = "cpu", fid_weights: str | None = None) -> dict[str, float]:
    """KID (mean, std) and FID between two sets of crops, on the features `features` (descriptor |
    inception, see feature_set; or a FEATURE_SETS name) compute."""
    which = features if features in FEATURE_SETS else feature_set(features, fid_weights)
    if which == "descriptor":
        r, f = standardise(descriptor(real), descriptor(fake))
    elif which == "imagenet_inception":
        r, f = imagenet_inception_features(real, device), imagenet_inception_features(fake, device)
    else:
        if not fid_weights:
            raise ConfigError("the FID Inception features need fid_weights=<the weights file>")
        r, f = fid_inception_features(real, fid_weights, device), fid_inception_features(fake, fid_weights, device)
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
                   device: str = "cpu",
                   fid_weights: str | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Metrics and grids for one fold's synthetic crops against the generator's training crops.

    Per class present in `synthetic_labels`: KID/FID against real training crops of that
    class (`kid_<class>`, `fid_<class>` on the descriptor; with `features` including "inception",
    `kid_<set>_<class>`... for its FEATURE_SETS name: `imagenet_inception`, or `fid_inception` given
    `fid_weights`) and a real-vs-synthetic grid; over all synthetic crops:
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
            for feats in features:  # descriptor: kid_<class>; the others: kid_<set>_<class>
                which = feature_set(feats, fid_weights)
                tag = "" if which == "descriptor" else f"{which}_"
                dist = distribution_distance(real, fake, seed=seed, features=which, device=device,
                                             fid_weights=fid_weights)
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
