"""Training throughput of the project's data path against a per-sample PIL pipeline.

Both arms train the same model on the same crops with the paper's augmentation:
- batched: uint8 batches gathered from the store's memmap (a background thread keeps the
  next ones ready), augmented as whole tensors on the training device (data_tools.augment),
  in the training step's thread (on a CPU a second augmenting thread fights the model's
  threads: measured slower);
- per-sample: a torch Dataset that makes one PIL image per crop and runs torchvision's
  transforms (RandomAffine, ColorJitter, RandomAdjustSharpness, flips, Resize, ToTensor,
  Normalize), batched by a DataLoader with `--workers` worker processes.
Prints images/s and the share of each step's wall time spent outside forward/backward/step.

    python scripts/bench_train.py [--backbone convnext --backbone_set demo --steps 40 --batch_size 32]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_tools.augment import augment_and_preprocess  # noqa: E402
from data_tools.batches import iterate_batches, pool_from_store  # noqa: E402
from data_tools.ingest import ingest  # noqa: E402
from data_tools.store import open_store  # noqa: E402
from models.backbones import resolve_backbone  # noqa: E402
from models.classifier import build_classifier  # noqa: E402
from models.precision import PRECISIONS, Precision, backward_step, choose_precision  # noqa: E402


class PilCrops(Dataset):
    """The usual way: one PIL image per crop, torchvision transforms per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int, mean, std):
        self.images, self.labels = images, labels
        self.tf = T.Compose([
            T.RandomAffine(degrees=30, translate=(0.1, 0.1), scale=(0.95, 1.25)),
            T.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.05),
            T.RandomAdjustSharpness(0.25, p=0.5), T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
            T.Resize(size, antialias=True), T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.tf(Image.fromarray(np.asarray(self.images[i]))), torch.tensor(self.labels[i], dtype=torch.float32)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_steps(model, opt, batches, device, steps: int, warmup: int = 3,
                precision: Precision | None = None) -> tuple[float, float]:
    """(images/s, share of wall time outside forward/backward/step) over `steps` after `warmup`, in
    `precision` (default: the device's, as train_cv's precision=auto: models.precision)."""
    precision = precision or choose_precision("auto", device)
    scaler = precision.scaler()
    model.train()
    n = compute = 0.0
    it = iter(batches)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        x, y = next(it)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        sync(device)
        t0 = time.perf_counter()
        with precision.autocast():
            z = model(x).reshape(-1)
        loss = F.binary_cross_entropy_with_logits(z.float(), y)
        backward_step(loss, opt, scaler)
        sync(device)
        if i >= warmup:
            compute += time.perf_counter() - t0
            n += len(y)
    wall = time.perf_counter() - start
    return n / wall, 1 - compute / wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="a store (default: a fresh 1,500-crop demo store)")
    p.add_argument("--backbone", default="convnext")
    p.add_argument("--backbone_set", default="demo")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the per-sample baseline")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="as train_cv's: auto = bf16 on a GPU with native bf16, fp16 + gradient scaler on older "
                        "ones, fp32 on a CPU")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(args.data) if args.data else ingest("demo", None, Path(tmp) / "demo", folds=5, size=1500)[0]
        spec = resolve_backbone(args.backbone, args.backbone_set)
        rows, _ = store.fold_rows(1)
        n_needed = (args.steps + 3) * args.batch_size
        rows = np.resize(rows, n_needed)  # repeat rows if the store is small
        precision = choose_precision(args.precision, device)
        print(f"{args.backbone} ({spec.timm_name}, {spec.input_size} px) on {device} in {precision.name}, batch "
              f"{args.batch_size}, {args.steps} steps, {torch.get_num_threads()} torch threads, "
              f"crops {store.images.shape[1:3]}")

        def fresh():
            torch.manual_seed(0)
            model = build_classifier(spec, "none").to(device)
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            return model, torch.optim.NAdam(model.parameters(), lr=1e-4)

        pool = pool_from_store(store, rows)
        gen = torch.Generator().manual_seed(0)

        def batched():
            for images, labels, _ in iterate_batches(pool, args.batch_size, pin=device.type == "cuda"):
                yield augment_and_preprocess(images, spec.input_size, spec.mean, spec.std, device, gen), labels

        model, opt = fresh()
        ours, ours_out = train_steps(model, opt, batched(), device, args.steps, precision=precision)
        labels = store.index["label"].to_numpy().astype(np.float32)
        dataset = torch.utils.data.Subset(PilCrops(store.images, labels, spec.input_size, spec.mean, spec.std), rows)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                            pin_memory=device.type == "cuda")
        model, opt = fresh()
        base, base_out = train_steps(model, opt, loader, device, args.steps, precision=precision)
    print(f"{'data path':<46} {'images/s':>9} {'outside fwd/bwd':>16}")
    print(f"{'batched memmap + tensor augmentation (ours)':<46} {ours:>9.1f} {ours_out:>15.1%}")
    print(f"{f'per-sample PIL + torchvision, {args.workers} workers':<46} {base:>9.1f} {base_out:>15.1%}")
    print(f"speed-up: {ours / base:.2f}x")
    return ours, base


if __name__ == "__main__":
    main()
