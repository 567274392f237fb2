"""Sources that already come as crop files: MIDOG 2025 Track 2, AMi-Br, class folders.

Each adapter builds a table (one row per crop: the file to decode, how to name the row in
messages, the index columns and the source's own metadata), checks labels and ids, then
decodes the files in parallel. With on_error="skip" every bad row is dropped and listed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from data_tools.adapters.base import (CENTER_X, CENTER_Y, SLIDE_FILE, AdapterError, Ingested, Problems,
                                      flag_duplicates, parse_int, read_csv)
from data_tools.constants import ATYPICAL, NORMAL
from data_tools.images import CROP_SIZE, IMAGE_SUFFIXES, load_crops

MIDOG25_LABELS = {"AMF": ATYPICAL, "NMF": NORMAL}
CLASS_FOLDERS = {"atypical": ATYPICAL, "normal": NORMAL}
# Known misspellings in released metadata -> the canonical name (the original is kept too).
SCANNER_SPELLING = {"Hamammatsu XR": "Hamamatsu XR"}


def _decode(table: pd.DataFrame, problems: Problems, crop_size: int, source: str, provenance: dict) -> Ingested:
    """Decode `table.path` for rows whose labels and ids passed; drop what fails; build the index.

    `table` holds `item` (the row's name in messages), `path`, `raw_label`, `label` (NaN if
    unknown), optionally `problem` (a known reason to reject the row), and index columns.
    """
    known = table["problem"].notna().to_numpy() if "problem" in table else np.zeros(len(table), bool)
    bad_label = table["label"].isna().to_numpy()
    for pos in np.flatnonzero(known | bad_label):
        reason = table["problem"].iloc[pos] if known[pos] else f"unknown label {table['raw_label'].iloc[pos]!r}"
        problems(table["item"].iloc[pos], reason)
    keep = ~(known | bad_label) & flag_duplicates(table["sample_id"], table["item"], problems)
    table = table[keep].drop(columns=["problem"], errors="ignore").reset_index(drop=True)
    images, errors = load_crops(table["path"].tolist(), crop_size)
    ok = np.array([e is None for e in errors], dtype=bool)
    for pos in np.flatnonzero(~ok):
        problems(table["path"].iloc[pos], errors[pos])
    index = table[ok].drop(columns=["item", "path", "raw_label"]).reset_index(drop=True)
    index = index.assign(label=index["label"].astype("int64"), source=source, fold=-1)
    front = ["sample_id", "label", "domain", "group", "source", "fold"]
    index = index[front + [c for c in index.columns if c not in front]]
    return Ingested(images[ok] if not ok.all() else images, index, problems.frame(),
                    {**provenance, "crop_size": crop_size})


def _class_dirs(root: Path) -> dict[int, Path]:
    """The Atypical/Normal sub-folders of `root`, matched case-insensitively."""
    found: dict[int, Path] = {}
    for p in sorted(root.iterdir()):
        if p.is_dir() and p.name.lower() in CLASS_FOLDERS:
            label = CLASS_FOLDERS[p.name.lower()]
            if label in found:
                raise AdapterError(f"{root}: two folders for one class, {found[label].name}/ and {p.name}/; merge them")
            found[label] = p
    return found


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _find_csv(root: Path, csv: str | None, default: str | None = None) -> Path:
    if csv:
        path = Path(csv)
        return path if path.is_absolute() or path.exists() else root / path
    if root.is_file():
        return root
    if default and (root / default).is_file():
        return root / default
    found = sorted(root.glob("*.csv"))
    if len(found) != 1:
        raise AdapterError(f"{root}: expected one metadata CSV, found {[p.name for p in found]}; "
                           f"name it with the option csv=<file>")
    return found[0]


def midog25(root: str | Path, on_error: str, *, csv: str | None = None, images: str | None = None,
            crop_size: int = CROP_SIZE, seed: int = 0) -> Ingested:
    """MIDOG 2025 Track 2 release: a CSV (image_id, filename, Tumor, Scanner, ..., majority)
    plus a folder of crops named by image_id. AMF -> 1, NMF -> 0; domain = Tumor; group =
    filename (the slide); `Scanner` normalised (`Hamammatsu XR`), the original in `scanner_raw`.

    `root` is the release folder or the CSV itself; `images` defaults to the folder (root,
    root/images or a sub-folder) holding the first listed crop.
    """
    root = Path(root)
    csv_path = _find_csv(root if root.is_dir() else root.parent, csv or (str(root) if root.is_file() else None))
    meta = read_csv(csv_path, ["image_id", "filename", "Tumor", "majority"], text=["image_id", "filename"])
    image_dir = Path(images) if images else _guess_image_dir(csv_path.parent, meta["image_id"])
    problems = Problems(on_error)
    table = meta.assign(
        item=[f"{csv_path.name} line {i + 2} ({name})" for i, name in enumerate(meta["image_id"])],
        path=[image_dir / name for name in meta["image_id"]],
        sample_id=[Path(name).stem for name in meta["image_id"]],
        raw_label=meta["majority"],
        label=meta["majority"].map(MIDOG25_LABELS),
        domain=meta["Tumor"].astype(str),
        group=meta["filename"].astype(str),
    )
    if "Scanner" in table.columns:
        table["scanner_raw"] = table["Scanner"]
        table["Scanner"] = table["Scanner"].replace(SCANNER_SPELLING)
    table[SLIDE_FILE] = table["filename"]
    if {"coordinateX", "coordinateY"} <= set(table.columns):
        table[CENTER_X] = pd.to_numeric(table["coordinateX"], errors="coerce")
        table[CENTER_Y] = pd.to_numeric(table["coordinateY"], errors="coerce")
    return _decode(table, problems, parse_int(crop_size, "crop_size"), "midog25",
                   {"csv": str(csv_path.resolve()), "images": str(image_dir.resolve())})


def _guess_image_dir(base: Path, names: pd.Series) -> Path:
    if not len(names):
        return base
    first = names.iloc[0]
    candidates = [base / "images", base] + sorted(p for p in base.iterdir() if p.is_dir())
    return next((d for d in candidates if (d / first).is_file()), base)


def amibr(root: str | Path, on_error: str, *, csv: str | None = None, unlisted: str = "pool",
          crop_size: int = CROP_SIZE, seed: int = 0) -> Ingested:
    """AMi-Br: `Atypical/` and `Normal/` PNGs plus `amibr_train_split.csv` (slide, dataset,
    final_label, dataset_uid = PNG name, x, y, expert votes). group = slide, domain = dataset.

    The CSV lists 2,894 of the 3,720 PNGs (the benchmark's training split). The other 826
    (its test split; for MIDOG21 they come from slides the CSV does not list) have no slide:
    with unlisted="pool" they are kept with `slide` empty, `in_split_csv` False and one
    group per dataset (`<dataset>:unlisted`), so CV never splits a known slide; with
    unlisted="drop" only the CSV's rows are kept.
    """
    root = Path(root)
    if unlisted not in ("pool", "drop"):
        raise AdapterError(f"option unlisted must be 'pool' or 'drop', got {unlisted!r}")
    dirs = _class_dirs(root) if root.is_dir() else {}
    if set(dirs) != {ATYPICAL, NORMAL}:
        raise AdapterError(f"{root}: expected class folders Atypical/ and Normal/")
    csv_path = _find_csv(root, csv, default="amibr_train_split.csv")
    meta = read_csv(csv_path, ["slide", "dataset", "final_label", "dataset_uid"], text=["slide", "dataset_uid"])
    labels = meta["final_label"].astype(str).str.lower().map(CLASS_FOLDERS)
    listed = meta.assign(
        item=[f"{csv_path.name} line {i + 2} ({name})" for i, name in enumerate(meta["dataset_uid"])],
        path=[dirs.get(lab, root) / name for lab, name in zip(labels.fillna(-9), meta["dataset_uid"])],
        sample_id=[Path(name).stem for name in meta["dataset_uid"]],
        raw_label=meta["final_label"], label=labels, domain=meta["dataset"].astype(str),
        group=meta["slide"].astype(str), in_split_csv=True,
        **{SLIDE_FILE: meta["slide"].astype(str)},
    )
    for col, src in ((CENTER_X, "x"), (CENTER_Y, "y")):
        if src in listed.columns:
            listed[col] = pd.to_numeric(listed[src], errors="coerce")
    listed["problem"] = _folder_conflicts(listed, dirs)
    names = set(meta["dataset_uid"])
    extra = [(lab, p) for lab, d in dirs.items() for p in _image_files(d) if p.name not in names]
    datasets = set(listed["domain"])
    if unlisted == "pool" and extra:
        ds = [p.name.split("_")[0] if p.name.split("_")[0] in datasets else "unknown" for _, p in extra]
        rows = pd.DataFrame({
            "item": [str(p) for _, p in extra], "path": [p for _, p in extra],
            "sample_id": [p.stem for _, p in extra], "raw_label": [p.parent.name for _, p in extra],
            "label": [lab for lab, _ in extra], "domain": ds, "group": [f"{d}:unlisted" for d in ds],
            "in_split_csv": False, "slide": "", "dataset": ds, "final_label": [p.parent.name for _, p in extra],
            "dataset_uid": [p.name for _, p in extra],
        })
        listed = pd.concat([listed, rows], ignore_index=True)
    return _decode(listed, Problems(on_error), parse_int(crop_size, "crop_size"), "amibr",
                   {"csv": str(csv_path.resolve()), "unlisted": unlisted,
                    "n_unlisted": len(extra), "n_listed": int(len(meta))})


def _folder_conflicts(table: pd.DataFrame, dirs: dict[int, Path]) -> list[str | None]:
    """A CSV label whose PNG sits in the other class folder is a conflict, not a missing file."""
    reasons: list[str | None] = []
    for path, label, raw in zip(table["path"], table["label"], table["raw_label"]):
        other = None if pd.isna(label) or path.is_file() else dirs[NORMAL if label == ATYPICAL else ATYPICAL] / path.name
        reasons.append(f"CSV says {raw} but the file is in {other.parent.name}/" if other and other.is_file() else None)
    return reasons


def folder(root: str | Path, on_error: str, *, domain: str | None = None, crop_size: int = CROP_SIZE,
           seed: int = 0) -> Ingested:
    """Class sub-folders `Atypical/` and `Normal/` (any case), e.g. AtNorM-Br.

    There is no slide information: each crop is its own group (folds then split crops, not
    slides; use such a store as a test set). domain = the `domain` option or the folder name.
    """
    root = Path(root)
    if not root.is_dir():
        raise AdapterError(f"{root}: not a folder")
    dirs = _class_dirs(root)
    problems = Problems(on_error)
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.name.startswith(".") and p.name.lower() not in CLASS_FOLDERS:
            problems(p, "unknown class folder (expected Atypical/ or Normal/); its images are left out")
    if not dirs:
        raise AdapterError(f"{root}: no class folders Atypical/ or Normal/")
    files = [(lab, p) for lab, d in sorted(dirs.items(), reverse=True) for p in _image_files(d)]
    table = pd.DataFrame({
        "item": [str(p) for _, p in files], "path": [p for _, p in files],
        "sample_id": [p.stem for _, p in files], "raw_label": [p.parent.name for _, p in files],
        "label": [lab for lab, _ in files], "domain": domain or root.name,
        "file": [str(p.relative_to(root)) for _, p in files],
    })
    table["group"] = table["sample_id"]
    return _decode(table, problems, parse_int(crop_size, "crop_size"), "folder", {"root": str(root.resolve())})
