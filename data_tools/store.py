"""The dataset store: the one on-disk format every step reads (docs/DESIGN.md, "The dataset store").

A store is a folder with `images.npy` (uint8 [N, H, W, 3], memory-mapped on read),
`index.parquet` (one row per image) and `manifest.json` (counts, split spec, provenance,
digest). It is written into a temporary sibling folder and renamed into place, and
`manifest.json` is written last, so a killed ingest never leaves a store that opens.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_tools.atomic import atomic_file, replace_dir, staging_dir
from data_tools.constants import ATYPICAL, NORMAL, UNLABELLED
from data_tools.errors import UserError

IMAGES, INDEX, MANIFEST = "images.npy", "index.parquet", "manifest.json"
REQUIRED_COLUMNS = {"sample_id": str, "label": "int64", "domain": str, "group": str, "source": str, "fold": "int64"}
VALID_LABELS = {ATYPICAL, NORMAL, UNLABELLED}


class StoreError(UserError, ValueError):
    """A store is missing, incomplete or breaks the contract."""


@dataclass
class Store:
    path: Path
    images: np.ndarray  # uint8 [N, H, W, 3], read-only memory map
    index: pd.DataFrame
    manifest: dict[str, Any]

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def folds(self) -> list[int]:
        return sorted(int(f) for f in self.index["fold"].unique() if f > 0)

    def fold_rows(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row positions of fold k's training and validation split."""
        fold = self.index["fold"].to_numpy()
        return np.flatnonzero((fold > 0) & (fold != k)), np.flatnonzero(fold == k)


def _digest(images: np.ndarray, index: pd.DataFrame) -> str:
    h = hashlib.sha256()
    h.update(repr((images.shape, str(images.dtype))).encode())
    flat = images.reshape(len(images), -1) if len(images) else images
    for start in range(0, len(flat), 4096):
        h.update(np.ascontiguousarray(flat[start:start + 4096]).tobytes())
    h.update(",".join(index.columns).encode())
    h.update(pd.util.hash_pandas_object(index.astype(str), index=False).to_numpy().tobytes())
    return h.hexdigest()


def validate_index(index: pd.DataFrame, n_images: int) -> pd.DataFrame:
    """Check the required columns and values; returns the index with canonical dtypes."""
    missing = set(REQUIRED_COLUMNS) - set(index.columns)
    if missing:
        raise StoreError(f"index lacks required columns {sorted(missing)}")
    if len(index) != n_images:
        raise StoreError(f"index has {len(index)} rows but there are {n_images} images")
    index = index.reset_index(drop=True).copy()
    for col, dtype in REQUIRED_COLUMNS.items():
        index[col] = index[col].astype(dtype)
    dup = index["sample_id"][index["sample_id"].duplicated()]
    if len(dup):
        raise StoreError(f"duplicate sample_id values, e.g. {dup.iloc[:5].tolist()}")
    bad = ~index["label"].isin(VALID_LABELS)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise StoreError(f"row {row} ({index['sample_id'][row]}): label {index['label'][row]} not in {sorted(VALID_LABELS)}")
    return index


def summarize(index: pd.DataFrame) -> dict[str, Any]:
    names = {ATYPICAL: "atypical", NORMAL: "normal", UNLABELLED: "unlabelled"}
    return {
        "n": int(len(index)),
        "per_class": {names[int(k)]: int(v) for k, v in index["label"].value_counts().sort_index().items()},
        "per_domain": {str(k): int(v) for k, v in index["domain"].value_counts().sort_index().items()},
        "per_fold": {str(k): int(v) for k, v in index["fold"].value_counts().sort_index().items()},
        "n_groups": int(index["group"].nunique()),
    }


def write_store(out: str | Path, images: np.ndarray, index: pd.DataFrame, *, name: str, adapter: str,
                provenance: dict[str, Any] | None = None, split: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None) -> Store:
    """Write a complete store atomically; `images` may itself be a memmap in a temp folder."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise StoreError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    index = validate_index(index, len(images))
    out = Path(out)
    with staging_dir(out) as tmp:
        np.save(tmp / IMAGES, images)
        index.to_parquet(tmp / INDEX, index=False)
        return _finish(tmp, out, name=name, adapter=adapter, provenance=provenance, split=split, extra=extra)


def _finish(tmp: Path, out: Path, **meta) -> Store:
    images = np.load(tmp / IMAGES, mmap_mode="r")
    index = pd.read_parquet(tmp / INDEX)
    manifest = {
        "name": meta["name"],
        "adapter": meta["adapter"],
        "image_size": list(images.shape[1:3]),
        **summarize(index),
        "split": meta.get("split") or {},
        "provenance": meta.get("provenance") or {},
        **(meta.get("extra") or {}),
        "digest": _digest(images, index),
    }
    del images
    _write_json_atomic(tmp / MANIFEST, manifest)
    replace_dir(tmp, out)
    return open_store(out)


def _write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))


class StoreWriter:
    """Streams images into a store without holding them all in memory (for WSI pools).

    Use as a context manager: `add()` each crop with its row, the store appears on exit
    only if no exception escaped.
    """

    def __init__(self, out: str | Path, capacity: int, size: tuple[int, int], *, name: str, adapter: str,
                 provenance: dict[str, Any] | None = None):
        self.out, self.capacity, self.size = Path(out), capacity, size
        self.meta = dict(name=name, adapter=adapter, provenance=provenance)
        self.rows: list[dict[str, Any]] = []
        self.store: Store | None = None

    def __enter__(self) -> "StoreWriter":
        self._staging = staging_dir(self.out)
        self.tmp = self._staging.__enter__()
        self._buf = np.lib.format.open_memmap(self.tmp / ".buffer.npy", mode="w+", dtype=np.uint8,
                                              shape=(max(self.capacity, 1), *self.size, 3))
        return self

    def add(self, image: np.ndarray, row: dict[str, Any]) -> None:
        if len(self.rows) >= self.capacity:
            raise StoreError(f"more images than the announced capacity {self.capacity}")
        if image.shape != (*self.size, 3) or image.dtype != np.uint8:
            raise StoreError(f"{row.get('sample_id')}: expected uint8 {(*self.size, 3)}, got {image.dtype} {image.shape}")
        self._buf[len(self.rows)] = image
        self.rows.append(row)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                n = len(self.rows)
                self._buf.flush()
                images = np.lib.format.open_memmap(self.tmp / IMAGES, mode="w+", dtype=np.uint8, shape=(n, *self.size, 3))
                for s in range(0, n, 2048):
                    e = min(s + 2048, n)
                    images[s:e] = self._buf[s:e]
                images.flush()
                del images, self._buf
                (self.tmp / ".buffer.npy").unlink()
                index = validate_index(pd.DataFrame(self.rows), n)
                index.to_parquet(self.tmp / INDEX, index=False)
                split = self.meta.get("split")
                self.store = _finish(self.tmp, self.out, name=self.meta["name"], adapter=self.meta["adapter"],
                                     provenance=self.meta["provenance"], split=split)
        finally:
            self._staging.__exit__(exc_type, exc, tb)
        return False


def open_store(path: str | Path) -> Store:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        hint = " (an interrupted write leaves no manifest; run prepare_data again)" if path.is_dir() else ""
        raise StoreError(f"{path} is not a complete dataset store: no {MANIFEST}{hint}")
    manifest = json.loads((path / MANIFEST).read_text())
    images = np.load(path / IMAGES, mmap_mode="r")
    index = pd.read_parquet(path / INDEX)
    if len(index) != len(images):
        raise StoreError(f"{path}: {len(index)} index rows but {len(images)} images")
    return Store(path=path, images=images, index=index, manifest=manifest)


def update_manifest(store: Store, **fields: Any) -> Store:
    """Add fields to a store's manifest (e.g. a sample-grid path); the digest is unchanged."""
    manifest = {**store.manifest, **fields}
    _write_json_atomic(store.path / MANIFEST, manifest)
    return open_store(store.path)
