"""Samplers compared on one trained generator, in one run: images/s and quality for the
paper's DDPM (1,000 steps) vs DDIM (50) vs DPM-Solver++ (20), same seeds, same guidance.

Quality: KID and FID (models.generator_quality descriptor features) of the synthetic
atypical crops against the real atypical crops the generator was trained on.

    .venv/bin/python scripts/bench_samplers.py                  # trains a tiny generator on demo crops first
    .venv/bin/python scripts/bench_samplers.py --generator DIR  # a saved generator (e.g. a run's artifacts)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.constants import ATYPICAL  # noqa: E402
from data_tools.demo import make_demo  # noqa: E402
from models.generator import Generator  # noqa: E402
from models.generator_quality import distribution_distance  # noqa: E402
from models.generator_training import FitConfig, fit_generator  # noqa: E402
from models.sampling import generate  # noqa: E402

CONFIGS = (("ddpm", 1000), ("ddim", 50), ("dpmsolver++", 20))


def tiny_generator(n: int, seed: int, workdir: Path) -> tuple[Generator, np.ndarray]:
    """A tiny class-conditional generator trained from scratch on demo crops (demo-profile settings)."""
    images, index = make_demo(n=n, seed=seed)
    labels = index["label"].to_numpy()
    cfg = FitConfig(arch="tiny", vae_epochs=2, dit_epochs=12, batch_size=8, lr=2e-3, vae_crop=64, kl_weight=1e-4,
                    ema_decay=0.999, preview_every=-1, seed=seed, label_dropout=0.1, num_train_timesteps=1000)
    return fit_generator(images, labels, cfg, workdir), images[labels == ATYPICAL]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default="", help="folder with vae/ and dit/ (default: train a tiny one)")
    p.add_argument("--real", default="", help="with --generator: a store whose atypical crops are the reference")
    p.add_argument("--n_train", type=int, default=800, help="demo crops to train the tiny generator on")
    p.add_argument("--n", type=int, default=64, help="atypical crops per sampler")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for the tiny model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.generator:
            from data_tools.store import open_store
            gen = Generator.load(args.generator)
            real = open_store(args.real)
            real_atypical = np.asarray(real.images[np.flatnonzero(real.index["label"].to_numpy() == ATYPICAL)])
        else:
            gen, real_atypical = tiny_generator(args.n_train, args.seed, Path(tmp))
    print(f"generator ready in {time.perf_counter() - start:.0f} s; "
          f"reference: {len(real_atypical)} real atypical crops; "
          f"{args.n} synthetic per sampler, guidance {args.guidance}, {torch.get_num_threads()} thread(s)")
    labels = np.full(args.n, ATYPICAL)
    rows = []
    for sampler, steps in CONFIGS:
        t = time.perf_counter()
        images = generate(gen, labels, sampler, steps, args.guidance, seed=args.seed, batch_size=args.batch_size,
                          progress=False)
        seconds = time.perf_counter() - t
        quality = distribution_distance(real_atypical, images, seed=args.seed)
        rows.append({"sampler": sampler, "steps": steps, "images_per_s": len(images) / seconds, "seconds": seconds,
                     **quality})
    base = rows[0]["images_per_s"]
    print(f"\n{'sampler':<12} {'steps':>5} {'images/s':>9} {'speed-up':>8} {'KID':>8} {'FID':>8}")
    for r in rows:
        print(f"{r['sampler']:<12} {r['steps']:>5} {r['images_per_s']:>9.2f} {r['images_per_s'] / base:>7.1f}x "
              f"{r['kid']:>8.3f} {r['fid']:>8.2f}")
    half = len(real_atypical) // 2
    floor = distribution_distance(real_atypical[:half], real_atypical[half:], seed=args.seed)
    print(f"{'real vs real':<12} {'':>5} {'':>9} {'':>8} {floor['kid']:>8.3f} {floor['fid']:>8.2f}"
          "  (two halves of the reference)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
