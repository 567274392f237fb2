"""Procedural H&E-like mitotic-figure crops: the embedded default data set.

No download, deterministic from a seed (image i depends only on (seed, i)). Images are
rendered in optical density and turned into RGB by Beer-Lambert with per-domain and
per-slide stain vectors, so domains differ the way scanners and labs do (hue, intensity,
blur, noise). Normal figures are metaphase plates or anaphase pairs; atypical ones are
multipolar, lagging-chromosome or asymmetric figures. Some normal figures carry stray
chromatin and some atypical ones are subtle, so the task is learnable but not trivial.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

from data_tools.constants import ATYPICAL, NORMAL

H_VEC = np.array([0.65, 0.70, 0.29])
E_VEC = np.array([0.07, 0.99, 0.11])


@dataclass(frozen=True)
class Domain:
    name: str
    scanner: str
    h_shift: tuple[float, float, float]  # added to the haematoxylin OD vector
    e_shift: tuple[float, float, float]
    stain_strength: float
    blur: float  # optical blur of the scanner, pixels
    noise: float  # sensor noise, grey levels


DOMAINS = (
    Domain("human breast carcinoma", "scanner A", (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 1.0, 0.9, 3.0),
    Domain("canine lymphoma", "scanner B", (0.08, -0.05, 0.15), (0.05, -0.1, 0.08), 1.25, 1.2, 4.0),
    Domain("human neuroendocrine tumour", "scanner C", (-0.1, 0.05, -0.05), (0.12, -0.05, -0.02), 0.8, 0.7, 5.0),
    Domain("canine soft tissue sarcoma", "scanner A", (0.02, 0.1, 0.05), (-0.03, 0.05, 0.1), 1.1, 1.5, 2.5),
)
NORMAL_KINDS = ("metaphase", "anaphase")
ATYPICAL_KINDS = ("multipolar", "lagging", "asymmetric")


def _segment(rng, centre, angle, length, width, n):
    """Chromosome points scattered along a line segment (a metaphase plate or a daughter set)."""
    t = rng.uniform(-0.5, 0.5, n) * length
    w = rng.normal(0, width, n)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([centre[0] + t * c - w * s, centre[1] + t * s + w * c], 1)


def _figure_points(rng, kind: str, centre: np.ndarray) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    axis = np.array([np.cos(angle + np.pi / 2), np.sin(angle + np.pi / 2)])
    length, width = rng.uniform(26, 42), rng.uniform(2.4, 3.8)
    if kind == "metaphase":
        pts = _segment(rng, centre, angle, length, width, rng.integers(90, 140))
        if rng.random() < 0.15:  # a stray chromosome: normal figures are not all textbook
            pts = np.vstack([pts, centre + axis * rng.uniform(9, 14) * rng.choice([-1, 1]) + rng.normal(0, 1.5, (8, 2))])
        return pts
    sep = rng.uniform(18, 32)
    if kind == "anaphase":
        n = rng.integers(60, 90)
        a = _segment(rng, centre + axis * sep / 2, angle, length * rng.uniform(0.7, 0.9), width, n)
        b = _segment(rng, centre - axis * sep / 2, angle, length * rng.uniform(0.7, 0.9), width, n + rng.integers(-4, 5))
        return np.vstack([a, b])
    if kind == "multipolar":
        poles = rng.integers(3, 5)
        arms = []
        for p in range(poles):
            theta = angle + 2 * np.pi * p / poles + rng.normal(0, 0.25)
            mid = centre + np.array([np.cos(theta), np.sin(theta)]) * length * 0.3
            arms.append(_segment(rng, mid, theta, length * rng.uniform(0.45, 0.65), width, rng.integers(30, 50)))
        return np.vstack(arms)
    if kind == "lagging":
        n = rng.integers(55, 85)
        a = _segment(rng, centre + axis * sep / 2, angle, length * 0.8, width, n)
        b = _segment(rng, centre - axis * sep / 2, angle, length * 0.8, width, n)
        lag = [centre + axis * rng.uniform(-sep / 4, sep / 4) + rng.normal(0, 1.5, (rng.integers(6, 12), 2))
               + np.array([np.cos(angle), np.sin(angle)]) * rng.uniform(-length / 3, length / 3)
               for _ in range(rng.integers(1, 4))]
        return np.vstack([a, b, *lag])
    if kind == "asymmetric":
        ratio = rng.uniform(0.35, 0.7)
        n = rng.integers(70, 100)
        a = _segment(rng, centre + axis * sep / 2, angle, length, width, n)
        b = _segment(rng, centre - axis * sep / 2, angle, length * ratio, width, int(n * ratio))
        return np.vstack([a, b])
    raise ValueError(f"unknown figure kind {kind!r}")


def render_crop(rng: np.random.Generator, kind: str, domain: Domain, slide_jitter: np.ndarray, size: int = 128) -> np.ndarray:
    """One uint8 RGB crop with a mitotic figure of `kind` at (about) its centre."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # eosin: stroma / cytoplasm texture
    e_od = 0.22 + 0.12 * gaussian_filter(rng.normal(0, 1, (size, size)), 5) * 3
    e_od += 0.05 * gaussian_filter(rng.normal(0, 1, (size, size)), 1.2)
    # haematoxylin: interphase nuclei around the figure
    h_od = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(3, 8)):
        cx, cy = rng.uniform(0, size, 2)
        if np.hypot(cx - size / 2, cy - size / 2) < 34:
            continue
        a, b, th = rng.uniform(7, 13), rng.uniform(5, 9), rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u, v = dx * np.cos(th) + dy * np.sin(th), -dx * np.sin(th) + dy * np.cos(th)
        h_od += rng.uniform(0.25, 0.45) * ((u / a) ** 2 + (v / b) ** 2 < 1)
    # the mitotic cell: clear cytoplasm, then condensed chromatin
    centre = np.array([size / 2, size / 2]) + rng.normal(0, 3, 2)
    cell = np.exp(-(((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * rng.uniform(20, 26) ** 2)))
    e_od *= 1 - 0.55 * cell
    pts = _figure_points(rng, kind, centre)
    dep = np.zeros((size, size), np.float32)
    ij = np.clip(np.round(pts).astype(int), 0, size - 1)
    np.add.at(dep, (ij[:, 1], ij[:, 0]), rng.uniform(0.7, 1.3, len(ij)))
    chrom = gaussian_filter(dep, 1.6)
    h_od += np.clip(chrom / max(np.percentile(chrom, 99.7), 1e-6), 0, 1) * rng.uniform(1.5, 2.1)
    h_od = gaussian_filter(h_od, domain.blur)
    e_od = gaussian_filter(np.clip(e_od, 0.02, None), domain.blur)
    h_vec = H_VEC + np.array(domain.h_shift) + slide_jitter[:3]
    e_vec = E_VEC + np.array(domain.e_shift) + slide_jitter[3:]
    h_vec, e_vec = h_vec / np.linalg.norm(h_vec), e_vec / np.linalg.norm(e_vec)
    od = domain.stain_strength * (h_od[..., None] * h_vec + e_od[..., None] * e_vec)
    rgb = 245.0 * np.exp(-od) + rng.normal(0, domain.noise, (size, size, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def make_demo(n: int = 3000, seed: int = 0, size: int = 128, atypical_fraction: float = 0.15,
              slides_per_domain: int = 8) -> tuple[np.ndarray, pd.DataFrame]:
    """Images [n, size, size, 3] and an index with the store's columns plus `scanner`, `morphology`."""
    setup = np.random.default_rng([seed, 0xD0])
    n_slides = slides_per_domain * len(DOMAINS)
    slide_domain = np.arange(n_slides) % len(DOMAINS)
    slide_jitter = setup.normal(0, 0.04, (n_slides, 6))
    slide_rate = np.clip(atypical_fraction * setup.uniform(0.5, 1.5, n_slides), 0.02, 0.6)
    images = np.empty((n, size, size, 3), np.uint8)
    rows = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        slide = int(rng.integers(n_slides))
        label = ATYPICAL if rng.random() < slide_rate[slide] else NORMAL
        kind = rng.choice(ATYPICAL_KINDS if label == ATYPICAL else NORMAL_KINDS)
        domain = DOMAINS[slide_domain[slide]]
        images[i] = render_crop(rng, str(kind), domain, slide_jitter[slide], size)
        rows.append({"sample_id": f"demo_{seed}_{i:05d}", "label": label, "domain": domain.name,
                     "group": f"slide_{slide:02d}", "source": "demo", "fold": -1,
                     "scanner": domain.scanner, "morphology": str(kind)})
    return images, pd.DataFrame(rows)
