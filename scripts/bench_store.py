"""How much faster does a batch of random crops come from the store than from PNG files?

Measured in one run on the same crops: the store's memory map (fancy-indexed, sorted
rows) against decoding the PNGs one by one with PIL. Uses the AMi-Br release given with
--amibr (its folder), else PNGs written from demo data. Both paths are timed warm (files in the
page cache), which is how training reads them after the first epoch.

    .venv/bin/python scripts/bench_store.py [--amibr <AMi-Br folder>] [--batch 256] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_tools.ingest import ingest  # noqa: E402



def _source(tmp: Path, amibr: Path | None) -> tuple[str, Path, list[Path]]:
    if amibr is not None:
        if not (amibr / "amibr_train_split.csv").is_file():
            raise SystemExit(f"{amibr}: no amibr_train_split.csv; give the AMi-Br release folder")
        return "amibr", amibr, sorted(amibr.glob("*/*.png"))
    from data_tools.demo import make_demo
    images, index = make_demo(2000, seed=0)
    root = tmp / "demo_pngs"
    for image, sid, label in zip(images, index["sample_id"], index["label"]):
        folder = root / ("Atypical" if label == 1 else "Normal")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{sid}.png")
    return "folder", root, sorted(root.glob("*/*.png"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--amibr", type=Path, default=None, help="AMi-Br release folder (default: demo PNGs)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source, root, pngs = _source(tmp, args.amibr)
        t0 = time.perf_counter()
        store, _ = ingest(source, root, tmp / "store", folds=0)
        ingest_s = time.perf_counter() - t0
        path_of = {p.stem: p for p in pngs}
        files = [path_of[s] for s in store.index["sample_id"]]
        rng = np.random.default_rng(0)
        batches = [np.sort(rng.choice(len(store), args.batch, replace=False)) for _ in range(args.repeats + 1)]

        def from_store(rows):
            return np.asarray(store.images[rows])

        def from_pngs(rows):
            return np.stack([np.asarray(Image.open(files[r]).convert("RGB")) for r in rows])

        assert np.array_equal(from_store(batches[0]), from_pngs(batches[0]))  # same crops; also warms both
        timings = {}
        for name, fn in (("store (memmap)", from_store), ("PNG + PIL", from_pngs)):
            times = []
            for rows in batches[1:]:
                t = time.perf_counter()
                fn(rows)
                times.append((time.perf_counter() - t) * 1000)
            timings[name] = statistics.median(times)
        print(f"data: {source} at {root} ({len(store)} crops {store.images.shape[1]}x{store.images.shape[2]}); "
              f"ingest {ingest_s:.1f} s ({len(store) / ingest_s:.0f} crops/s)")
        print(f"batch of {args.batch} random crops, median of {args.repeats}:")
        for name, ms in timings.items():
            print(f"  {name:15s} {ms:8.2f} ms/batch")
        print(f"  store is {timings['PNG + PIL'] / timings['store (memmap)']:.0f}x faster")


if __name__ == "__main__":
    main()
