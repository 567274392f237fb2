"""Crops to predict on: platform TIFF stacks, a folder of crop images, or a dataset store.

The MIDOG 2025 Track 2 platform mounts one multi-page TIFF per job under
`/input/images/stacked-histopathology-roi-cropouts/`, each page an RGB 128x128 crop, and
scores a list with one entry per page in page order. Its evaluation is all-or-nothing
per job, so every problem here is an `InputError` naming the file (and page) rather
than a skipped crop: a partial answer would be scored as wrong.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools.errors import UserError
from data_tools.images import CROP_SIZE, IMAGE_SUFFIXES, TIFF_SUFFIXES, ImageError, load_crop, read_tiff
from data_tools.store import MANIFEST, open_store

PLATFORM_INPUT = "/input/images/stacked-histopathology-roi-cropouts"
PLATFORM_OUTPUT = "/output/multiple-mitotic-figure-classification.json"


class InputError(UserError, ValueError):
    """An input cannot be predicted on; the message names the file (and page)."""


@dataclass
class Crops:
    """Images [N, H, W, 3] uint8 with one id per crop, and where each crop came from."""
    images: np.ndarray
    ids: list[str]
    files: list[str] = field(default_factory=list)  # per crop: the stack or image file (or store)
    kind: str = "crops"  # "stacks" | "crops" | "store"

    def __len__(self) -> int:
        return len(self.ids)


def natural_key(path: Path | str) -> list:
    """'stack_2' sorts before 'stack_10' (a Path by its name, a str as it is)."""
    text = path.name if isinstance(path, Path) else path
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def read_stack(path: str | Path, size: int | None = CROP_SIZE) -> np.ndarray:
    """All pages of a platform stack as uint8 RGB [P, size, size, 3], in page order (checked
    complete: a truncated stack is an error, never fewer answers)."""
    try:
        pages = read_tiff(Path(path), str(path), size)
    except ImageError as e:
        raise InputError(str(e)) from None
    if len({p.shape for p in pages}) > 1:
        raise InputError(f"{path}: pages differ in size {sorted({p.shape for p in pages})}")
    return np.stack(pages)


def find_stacks(folder: str | Path) -> list[Path]:
    """The `*.tif`/`*.tiff` files of a folder, in natural name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: input folder not found")
    stacks = sorted((p for p in folder.iterdir() if p.suffix.lower() in TIFF_SUFFIXES and p.is_file()), key=natural_key)
    if not stacks:
        raise InputError(f"{folder}: no .tif/.tiff stack in the input folder")
    return stacks


def load_stacks(paths: list[Path], size: int | None = CROP_SIZE) -> Crops:
    """Every page of every stack, stack by stack; ids '<file name>#<page>'."""
    images, ids, files = [], [], []
    for path in paths:
        pages = read_stack(path, size)
        images.append(pages)
        ids += [f"{path.name}#{i}" for i in range(len(pages))]
        files += [str(path)] * len(pages)
    if len({im.shape[1:] for im in images}) > 1:
        raise InputError(f"stacks differ in page size: {sorted({im.shape[1:] for im in images})}")
    return Crops(np.concatenate(images), ids, files, kind="stacks")


def load_folder(folder: str | Path, size: int | None = CROP_SIZE) -> Crops:
    """The crop images under a folder (recursively, natural order); ids are relative paths."""
    folder = Path(folder)
    paths = sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: natural_key(p.relative_to(folder).as_posix()))
    if not paths:
        raise InputError(f"{folder}: no crop images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    images = []
    for p in paths:
        try:
            images.append(load_crop(p, size))
        except ImageError as e:
            raise InputError(str(e)) from None
    if len({im.shape for im in images}) > 1:
        raise InputError(f"{folder}: crops differ in size; give crops of one size")
    return Crops(np.stack(images), [str(p.relative_to(folder)) for p in paths], [str(p) for p in paths], kind="crops")


def load_inputs(path: str | Path, size: int | None = CROP_SIZE) -> Crops:
    """Whatever `path` is: a store folder, one stack file, a folder of stacks, or a folder of crops.

    A folder holding any .tif/.tiff at its top level is read as platform stacks.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        store = open_store(path)
        if len(store) == 0:
            raise InputError(f"{path}: the store holds no images")
        return Crops(np.asarray(store.images), store.index["sample_id"].astype(str).tolist(), [str(path)] * len(store),
                     kind="store")
    if path.is_file():
        if path.suffix.lower() in TIFF_SUFFIXES:
            return load_stacks([path], size)
        raise InputError(f"{path}: not a .tif/.tiff stack; give a stack, a folder or a store")
    if not path.is_dir():
        raise InputError(f"{path}: input not found")
    top = [p for p in path.iterdir() if p.is_file()]
    if any(p.suffix.lower() in TIFF_SUFFIXES for p in top):
        others = sorted(p.name for p in top if p.suffix.lower() in IMAGE_SUFFIXES
                        and p.suffix.lower() not in TIFF_SUFFIXES)
        if others:  # half an answer would be scored as a wrong one
            raise InputError(f"{path}: holds platform stacks and {len(others)} crop image(s) (e.g. {others[:3]}); "
                             f"give stacks and crops in separate folders")
        return load_stacks(find_stacks(path), size)
    return load_folder(path, size)
