"""Batches of crops straight from the stores' memory-mapped uint8 arrays.

A `CropPool` is a list of (store array, row) pairs with labels and ids: a fold's training
split, optionally with synthetic crops from a second store, or a validation split. Batches
are gathered with sorted row reads (sequential on disk), optionally by a background thread
that keeps the next batches ready while the model computes, and come out as uint8
[B, H, W, 3] tensors (pinned for an asynchronous copy when the target is a GPU). An epoch's
order is a permutation (`shuffle`) or a class-balanced draw (`balanced`, `epoch_order`).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from data_tools.constants import ATYPICAL, NORMAL
from data_tools.errors import ConfigError
from data_tools.store import Store

SAMPLERS = ("shuffle", "balanced")


@dataclass
class CropPool:
    arrays: list[np.ndarray]  # uint8 [N_i, H, W, 3] each, all of the same H, W
    part: np.ndarray  # int64 [M]: which array
    rows: np.ndarray  # int64 [M]: row in that array
    labels: np.ndarray  # float32 [M]
    sample_ids: np.ndarray  # str [M]
    domains: np.ndarray  # str [M]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.arrays[0].shape[1:3])

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """uint8 [len(positions), H, W, 3] in the order of `positions`."""
        out = np.empty((len(positions), *self.arrays[0].shape[1:]), np.uint8)
        part, rows = self.part[positions], self.rows[positions]
        for p in np.unique(part):
            sel = np.flatnonzero(part == p)
            order = np.argsort(rows[sel], kind="stable")
            out[sel[order]] = self.arrays[p][rows[sel][order]]
        return out

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"sample_id": self.sample_ids, "label": self.labels.astype(np.int64),
                             "domain": self.domains})


def pool_from_store(store: Store, rows: np.ndarray) -> CropPool:
    rows = np.asarray(rows, dtype=np.int64)
    idx = store.index.iloc[rows]
    return CropPool([store.images], np.zeros(len(rows), np.int64), rows, idx["label"].to_numpy(np.float32),
                    idx["sample_id"].astype(str).to_numpy(), idx["domain"].astype(str).to_numpy())


def concat_pools(first: CropPool, *others: CropPool) -> CropPool:
    """One pool over several; arrays whose crop size differs from the first's are resized
    once, in memory, to it (a generator may sample at another resolution)."""
    arrays, parts = list(first.arrays), [first.part]
    for pool in others:
        offset = len(arrays)
        arrays += [_resized(a, first.image_size) for a in pool.arrays]
        parts.append(pool.part + offset)
    pools = (first, *others)
    return CropPool(arrays, np.concatenate(parts), np.concatenate([p.rows for p in pools]),
                    np.concatenate([p.labels for p in pools]), np.concatenate([p.sample_ids for p in pools]),
                    np.concatenate([p.domains for p in pools]))


def _resized(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if tuple(images.shape[1:3]) == tuple(size):
        return images
    out = np.empty((len(images), *size, 3), np.uint8)
    for s in range(0, len(images), 512):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + 512])).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        out[s:s + 512] = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def epoch_order(sampler: str, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One epoch's positions into a pool with these labels: each once in random order
    (`shuffle`: `rng.permutation`, as before samplers existed) or `balanced_order`."""
    if sampler == "shuffle":
        return rng.permutation(len(labels))
    if sampler == "balanced":
        return balanced_order(labels, rng)
    raise ConfigError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """len(labels) positions, half of them (the odd one by a coin) from each class, shuffled.
    A class is drawn without replacement while it has enough crops, with replacement (its crops
    repeat) when not: the rare class repeats, the common one is subsampled afresh each epoch."""
    labels = np.asarray(labels)
    by_class = [np.flatnonzero(labels == NORMAL), np.flatnonzero(labels == ATYPICAL)]
    if min(len(c) for c in by_class) == 0:
        raise ConfigError(f"sampler=balanced needs crops of both classes; this pool has "
                          f"{len(by_class[0])} normal and {len(by_class[1])} atypical")
    n = len(labels)
    n_pos = n // 2 + int(n % 2 and rng.random() < 0.5)
    picks = [rng.choice(c, size=k, replace=k > len(c)) for c, k in zip(by_class, (n - n_pos, n_pos))]
    return rng.permutation(np.concatenate(picks))


def iterate_batches(pool: CropPool, batch_size: int, order: np.ndarray | None = None, prefetch: int = 2,
                    pin: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """(uint8 images [B, H, W, 3], float labels [B], positions [B]) over `order` (default: all, in order)."""
    order = np.arange(len(pool)) if order is None else np.asarray(order)
    chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]

    def make(positions: np.ndarray):
        images = torch.from_numpy(pool.gather(positions))
        labels = torch.from_numpy(pool.labels[positions])
        if pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        return images, labels, positions

    if prefetch <= 0:
        yield from (make(c) for c in chunks)
        return
    yield from _prefetched((make(c) for c in chunks), prefetch)


_DONE = object()


def _prefetched(items: Iterator, depth: int) -> Iterator:
    """Run `items` in a background thread, `depth` ahead; errors surface in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)
        q.put(_DONE)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
