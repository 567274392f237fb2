"""Which GPU a job runs on. Fold jobs of `train_cv` and `main`'s side-by-side steps are spread over
the GPUs round-robin through `CUDA_VISIBLE_DEVICES`, several jobs on one GPU when there are more
jobs than GPUs (one fold of ConvNeXt-S at batch 16 leaves a GPU mostly idle). On a CPU nothing is
placed: each job gets its share of the cores (pipelines/children.py).

`devices`: `auto` (every GPU this process sees) or a list such as `0,1,3` (indices among those it
sees). A job is given the physical id: the entry of this process's `CUDA_VISIBLE_DEVICES` (a Slurm
allocation sets it), so a job placed inside a placed job stays on its parent's GPU.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import TYPE_CHECKING, Iterator

from data_tools.errors import ConfigError

if TYPE_CHECKING:
    import torch

VISIBLE = "CUDA_VISIBLE_DEVICES"


def visible_gpus(count: int | None = None) -> list[str]:
    """Physical ids of the GPUs this process sees; `count` fakes how many (tests), default torch's count."""
    if count is None:
        import torch  # here: a process that only places jobs (a submitted job's wrapper) need not load torch
        count = torch.cuda.device_count()
    n = count
    inherited = os.environ.get(VISIBLE)
    ids = [d.strip() for d in inherited.split(",") if d.strip()] if inherited is not None else \
        [str(i) for i in range(n)]
    return ids[:n]


def gpus(devices: str = "auto", device: str = "auto", count: int | None = None) -> list[str]:
    """The GPUs to place jobs on: [] on a CPU or when the step's `device` names one itself (cpu, cuda:1)."""
    seen = visible_gpus(count)
    if device not in ("auto", "cuda", "") or not seen:
        return []
    if devices in ("auto", ""):
        return seen
    picked = [d.strip() for d in str(devices).split(",") if d.strip()]
    bad = [d for d in picked if not d.isdigit() or int(d) >= len(seen)]
    if bad:
        raise ConfigError(f"devices={devices!r}: this machine sees {len(seen)} GPU(s), 0 to {len(seen) - 1}; "
                          f"give auto or a list of those indices, e.g. devices=0,1")
    return [seen[int(d)] for d in picked]


def round_robin(jobs: int, on: list[str]) -> list[str | None]:
    """The GPU of each of `jobs` jobs started together (None: a CPU, nothing placed)."""
    return [on[i % len(on)] if on else None for i in range(jobs)]


def gpu_env(gpu: str | None) -> dict[str, str]:
    """The variable that puts a child process on `gpu` (nothing on a CPU)."""
    return {VISIBLE: gpu} if gpu is not None else {}


class Slots:
    """GPUs handed to jobs as they start and given back as they end: a job goes to the GPU with the
    fewest jobs, the first in the list on a tie, so jobs started together go round-robin. Thread-safe."""

    def __init__(self, on: list[str]):
        self.load = {g: 0 for g in on}
        self._lock = threading.Lock()

    def take(self) -> str | None:
        with self._lock:
            if not self.load:
                return None
            gpu = min(self.load, key=lambda g: (self.load[g], list(self.load).index(g)))
            self.load[gpu] += 1
            return gpu

    def give(self, gpu: str | None) -> None:
        if gpu is not None:
            with self._lock:
                self.load[gpu] -= 1

    @contextlib.contextmanager
    def slot(self) -> Iterator[str | None]:
        gpu = self.take()
        try:
            yield gpu
        finally:
            self.give(gpu)


def device_tag(device: "torch.device") -> str:
    """What a run records as its device: `gpu 3` (the physical id: this process's CUDA_VISIBLE_DEVICES
    entry), or `cpu`."""
    if device.type != "cuda":
        return device.type
    ids = [d.strip() for d in os.environ.get(VISIBLE, "").split(",") if d.strip()]
    index = device.index or 0
    return f"gpu {ids[index] if index < len(ids) else index}"
