"""Folds side by side on one machine: `train_cv` with fold_jobs=N (N processes, cores shared out)
against the same folds one after the other with all the cores, measured in the same run.

    python scripts/bench_fold_jobs.py [--size 1500] [--folds 1,2] [--epochs 1] [--jobs 2] [--backbone convnext]

Prints each wall time and the ratio. On a CPU the gain comes from small models that cannot use
all cores in one process; on a GPU from a device that one small-batch fold leaves mostly idle.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_tools.ingest import ingest  # noqa: E402


def timed_train_cv(store: Path, tmp: Path, name: str, folds: str, epochs: int, jobs: int, backbone: str) -> float:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": name,
           "OMP_NUM_THREADS": str(os.cpu_count() or 1), "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    cmd = [sys.executable, "-m", "pipelines.train_cv", "--data", str(store), "--backbone", backbone, "--folds", folds,
           "--epochs", str(epochs), "--fold_jobs", str(jobs), "--workroot", str(tmp / name)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1500)
    p.add_argument("--folds", default="1,2")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--backbone", default="convnext")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store, _ = ingest("demo", None, tmp / "demo", folds=5, size=args.size)
        n = len(args.folds.split(","))
        print(f"demo store {len(store)} crops; folds {args.folds}, {args.epochs} epoch(s), {args.backbone}, {cores} cores")
        sequential = timed_train_cv(store.path, tmp, "sequential", args.folds, args.epochs, 1, args.backbone)
        print(f"sequential, 1 process x {cores} threads: {sequential:6.1f} s ({sequential / n:.1f} s per fold)")
        side = timed_train_cv(store.path, tmp, "side_by_side", args.folds, args.epochs, args.jobs, args.backbone)
        print(f"fold_jobs={args.jobs}, {args.jobs} processes x {max(1, cores // args.jobs)} thread(s): {side:6.1f} s")
        print(f"ratio sequential / side by side: {sequential / side:.2f}x (process start-up included in both)")


if __name__ == "__main__":
    main()
