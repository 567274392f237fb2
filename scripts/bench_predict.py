"""Crops per second of the fold ensemble on the CPU (or --device cuda), for a few batch sizes.

    python scripts/bench_predict.py                       # 5 x paper ConvNeXt-Small, random weights
    python scripts/bench_predict.py --backbone lunit      # 5 x Lunit ViT-S/8 at 224 px
    python scripts/bench_predict.py --model models:/atypical-mitosis-classifier@submission

Without --model the ensemble is built from randomly initialised networks of the chosen
backbone and backbone set: the compute is the same as with trained weights, and nothing is
downloaded. The platform gives 16 crops per stack, so batch 16 is the case that matters.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.serving import load_predictor  # noqa: E402
from data_tools.demo import make_demo  # noqa: E402
from models.backbones import resolve_backbone  # noqa: E402
from models.classifier import build_classifier  # noqa: E402
from models.ensemble import FoldEnsemble  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="model URI, pyfunc folder or train_cv run id (default: random weights)")
    p.add_argument("--backbone", default="convnext")
    p.add_argument("--backbone_set", default="paper", help="backbone sizes: paper | demo")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--batch_sizes", default="1,16,64")
    p.add_argument("--n", type=int, default=128, help="crops per measurement")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tta", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        ensemble, what = load_predictor(args.model, args.device).ensemble, args.model
    else:
        spec = resolve_backbone(args.backbone, args.backbone_set)
        models = [build_classifier(spec, "none") for _ in range(args.folds)]
        ensemble = FoldEnsemble(models, [spec] * args.folds, args.device)
        what = f"{args.folds} x {spec.timm_name} at {spec.input_size} px (random weights)"
    images, _ = make_demo(min(args.n, 64), seed=0)
    images = np.resize(images, (args.n, *images.shape[1:]))
    print(f"{what} on {args.device} ({torch.get_num_threads()} threads), {args.n} crops, tta={args.tta}")
    ensemble.predict_proba(images[:2], batch_size=2, tta=args.tta)  # warm-up
    results = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        t0 = time.perf_counter()
        ensemble.predict_proba(images, batch_size=bs, tta=args.tta)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        results.append({"batch_size": bs, "crops_per_s": args.n / seconds, "s_per_stack_of_16": 16 * seconds / args.n})
        print(f"batch {bs:4d}: {args.n / seconds:8.1f} crops/s  ({16 * seconds / args.n:.2f} s per stack of 16)")
    return results


if __name__ == "__main__":
    main()
