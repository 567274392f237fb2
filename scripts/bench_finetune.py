"""What each fine-tuning mode trains and how fast: parameters, trainable parameters and training
images/s of `full`, `lora` and `linear` on one backbone, measured in the same run.

    .venv/bin/python scripts/bench_finetune.py                         # the demo ViT on the CPU
    .venv/bin/python scripts/bench_finetune.py --backbone uni2 --set paper --device cuda

Random weights (the compute is the same as trained ones); batches of demo crops, augmented as
train_cv does. Ratios are against `full` in this run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_train import train_steps  # noqa: E402
from data_tools.augment import augment_and_preprocess, preset  # noqa: E402
from data_tools.demo import make_demo  # noqa: E402
from models.backbones import resolve_backbone  # noqa: E402
from models.checkpoint import resolve_device  # noqa: E402
from models.classifier import build_classifier  # noqa: E402
from models.finetune import FINETUNE_MODES, apply_finetune, count_params  # noqa: E402
from pipelines.config import build  # noqa: E402
from pipelines.train_cv import TrainCVConfig  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="lunit")
    p.add_argument("--set", default="demo", help="backbone set: demo | paper")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    spec = resolve_backbone(args.backbone, args.set)
    crops, index = make_demo(256, seed=0)
    labels = index["label"].to_numpy()
    rows = []
    for mode in FINETUNE_MODES:
        torch.manual_seed(0)
        finetune = build(TrainCVConfig, "demo", finetune=mode).finetune_spec()  # the profile's LoRA values
        model = apply_finetune(build_classifier(spec), finetune).to(device)
        opt = torch.optim.NAdam([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)

        def batches():
            while True:
                idx = rng.integers(0, len(crops), args.batch)
                x = augment_and_preprocess(torch.from_numpy(crops[idx]), spec.input_size, spec.mean, spec.std,
                                           device, gen, preset("flips"))
                yield x, torch.tensor(labels[idx], dtype=torch.float32)
        rate, _ = train_steps(model, opt, batches(), device, args.steps)
        n, trainable = count_params(model)
        rows.append({"mode": mode, "n_params": n, "n_trainable_params": trainable, "images_per_s": rate})
    full = rows[0]["images_per_s"]
    print(f"{spec.display or spec.name} ({spec.timm_name}, {spec.input_size} px) on {device}, batch {args.batch}, "
          f"{args.threads} threads:")
    for r in rows:
        print(f"  {r['mode']:<6} {r['n_trainable_params']:>12,} of {r['n_params']:,} parameters train "
              f"({r['n_trainable_params'] / r['n_params']:.2%}); {r['images_per_s']:7.1f} img/s "
              f"({r['images_per_s'] / full:.2f}x full)")
    return rows


if __name__ == "__main__":
    main()
