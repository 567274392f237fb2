"""Sample grids: one PNG per class and one per domain, to see what a store holds at a glance.

The crops are tiled into one mosaic array and drawn with a single imshow (fast for any
store size); matplotlib's object API with the Agg canvas, so no GUI backend is touched.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data_tools.constants import LABEL_NAMES
from data_tools.store import Store


def mosaic(images: np.ndarray, cols: int, gap: int = 2) -> np.ndarray:
    """Tile uint8 [N, H, W, 3] into one white-separated image, `cols` crops per row."""
    n, h, w = images.shape[:3]
    rows = max(1, -(-n // cols))
    out = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        out[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = images[k]
    return out


def draw_grid(images: np.ndarray, title: str, path: Path, cols: int = 8) -> Path:
    tile = mosaic(images, cols)
    inches = 8.0
    fig = Figure(figsize=(inches, inches * tile.shape[0] / tile.shape[1] + 0.5), dpi=tile.shape[1] / inches)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    ax.imshow(tile, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(title, fontsize=11, y=1 - 0.1 / fig.get_figheight(), va="top")
    fig.savefig(path, pil_kwargs={"compress_level": 1})  # H&E barely compresses; level 6 triples the time
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "unnamed"


def save_grids(store: Store, out_dir: str | Path, per_grid: int = 64, seed: int = 0) -> list[Path]:
    """Write `class_<name>.png` per label and `domain_<name>.png` per domain into out_dir,
    each showing up to `per_grid` random crops of that subset (fixed by `seed`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = store.index["label"].to_numpy()
    domains = store.index["domain"].astype(str).to_numpy()
    subsets = [(f"class_{LABEL_NAMES[int(v)]}", f"{store.name}: {LABEL_NAMES[int(v)]}", labels == v)
               for v in sorted(set(labels.tolist()), reverse=True)]
    subsets += [(f"domain_{_slug(d)}", f"{store.name}: {d}", domains == d) for d in sorted(set(domains))]
    written = []
    for stem, title, mask in subsets:
        rows = np.flatnonzero(mask)
        pick = np.sort(rng.choice(rows, min(per_grid, len(rows)), replace=False))
        written.append(draw_grid(np.asarray(store.images[pick]), f"{title} ({len(rows)} crops, {len(pick)} shown)",
                                 out_dir / f"{stem}.png"))
    return written
