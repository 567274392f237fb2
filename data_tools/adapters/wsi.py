"""Crops cut from whole-slide images around annotated mitotic figures: the unlabelled pool.

Two annotation formats: SlideRunner SQLite databases (MITOS_WSI_CMC, MITOS_WSI_CCMCT,
TUPAC) and the MIDOG++ COCO-style JSON. Crops (default 128 px) are centred on each
annotation at level 0 and streamed into a scratch store (pools hold ~56,000 crops), slide
by slide, each slide opened once. A crop that reaches past the slide edge is padded white
(edge="pad", the default, flagged in column `padded`) or skipped (edge="skip"). A slide
file that cannot be found or opened is one problem covering all its annotations.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from data_tools.adapters.base import (CENTER_X, CENTER_Y, SLIDE_FILE, AdapterError, Ingested, Problems, parse_int,
                                      read_csv, read_json)
from data_tools.adapters.crops import MIDOG25_LABELS
from data_tools.adapters.slides import READERS, SlideError, crop_centred, open_slide
from data_tools.constants import UNLABELLED
from data_tools.images import CROP_SIZE
from data_tools.store import StoreWriter

EDGES = ("pad", "skip")


# ---- SlideRunner ---------------------------------------------------------------------------

def _connect(db: Path) -> sqlite3.Connection:
    if not db.is_file():
        raise AdapterError(f"{db}: SlideRunner database not found")
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        conn.execute("SELECT uid FROM Classes LIMIT 1")
        return conn
    except sqlite3.DatabaseError as e:
        raise AdapterError(f"{db}: not a SlideRunner database ({e})") from None


def read_classes(db: str | Path) -> pd.DataFrame:
    """The annotation classes of a SlideRunner database: uid, name."""
    with _connect(Path(db)) as conn:
        return pd.read_sql_query("SELECT uid, name FROM Classes ORDER BY uid", conn)


def read_annotations(db: str | Path) -> pd.DataFrame:
    """One row per annotation: uid, slide, filename, directory, slide_key, class (agreedClass),
    deleted, type, and the centre (mean of its coordinates: a spot, a circle's two corners).

    `slide_key` names the slide file: `<directory>/<filename>` where the database sets a
    directory (TUPAC's 656 slides share 67 file names across 73 directories), else the name.
    """
    db = Path(db)
    query = """
        SELECT a.uid AS uid, a.slide AS slide, s.filename AS filename, s.directory AS directory,
               a.agreedClass AS class, COALESCE(a.deleted, 0) AS deleted, a.type AS type,
               AVG(c.coordinateX) AS center_x, AVG(c.coordinateY) AS center_y, COUNT(c.uid) AS n_coordinates
        FROM Annotations a
        JOIN Slides s ON s.uid = a.slide
        LEFT JOIN Annotations_coordinates c ON c.annoId = a.uid
        GROUP BY a.uid ORDER BY s.directory, s.filename, a.uid"""
    with _connect(db) as conn:
        try:
            table = pd.read_sql_query(query, conn)
        except sqlite3.DatabaseError as e:
            raise AdapterError(f"{db}: unexpected schema ({e})") from None
    directory = table["directory"].fillna("").astype(str).str.strip("/")
    table["slide_key"] = [f"{d}/{f}" if d else str(f) for d, f in zip(directory, table["filename"])]
    return table


def resolve_class(classes: pd.DataFrame, wanted: str | int, where: str | Path) -> int:
    """A class uid from its name (case-insensitive) or its uid."""
    text = str(wanted).strip()
    if text.lstrip("-").isdigit() and int(text) in set(classes["uid"]):
        return int(text)
    match = classes[classes["name"].astype(str).str.lower() == text.lower()]
    if len(match) == 1:
        return int(match["uid"].iloc[0])
    listed = ", ".join(f"{u}={n!r}" for u, n in zip(classes["uid"], classes["name"]))
    raise AdapterError(f"{where}: no class {wanted!r}; the database has {listed}")


def _find_db(root: Path) -> Path:
    if root.is_file():
        return root
    found = sorted(root.glob("*.sqlite")) if root.is_dir() else []
    if len(found) != 1:
        raise AdapterError(f"{root}: expected a SlideRunner .sqlite file (or a folder with exactly one), "
                           f"found {[p.name for p in found]}")
    return found[0]


def sliderunner(root: str | Path, on_error: str, *, scratch: Path, slides: str | None = None,
                mitosis_class: str = "Mitotic figure", label: int = UNLABELLED, domain: str | None = None,
                crop_size: int = CROP_SIZE, edge: str = "pad", reader: str = "auto", seed: int = 0) -> Ingested:
    """Crops around the non-deleted annotations of one class in a SlideRunner database.

    `root` is the .sqlite file; slide files are looked up under `slides` (default: the
    database's folder) as `<Slides.directory>/<Slides.filename>`, else by that path's end
    or (where the name is unique in the database) by file name in any sub-folder.
    `mitosis_class` is a class name or uid (MITOS_WSI_* call it "Mitotic figure", TUPAC
    "Mitosis"). label -1 (the unlabelled pool) by default; group = slide; domain = the
    `domain` option or the database's name.
    """
    db = _find_db(Path(root))
    class_id = resolve_class(read_classes(db), mitosis_class, db)
    annotations = read_annotations(db)
    chosen = annotations[(annotations["class"] == class_id)]
    n_deleted = int((chosen["deleted"] != 0).sum())
    chosen = chosen[chosen["deleted"] == 0]
    chosen = chosen[chosen["n_coordinates"] > 0]
    jobs = pd.DataFrame({
        "sample_id": [f"{db.stem}_{u}" for u in chosen["uid"]],
        "label": parse_int(label, "label"), "domain": domain or db.stem,
        "group": chosen["slide_key"].to_numpy(), "source": "sliderunner", "fold": -1,
        SLIDE_FILE: chosen["slide_key"].to_numpy(), CENTER_X: chosen["center_x"].to_numpy(),
        CENTER_Y: chosen["center_y"].to_numpy(), "annotation_uid": chosen["uid"].to_numpy(),
        "annotation_type": chosen["type"].to_numpy(),
    })
    slides_table = annotations.drop_duplicates("slide")
    unique_names = set(slides_table["filename"].astype(str).drop_duplicates(keep=False))
    slide_root = Path(slides) if slides else db.parent
    got = _cut(jobs, _slide_finder(slide_root, unique_names), Problems(on_error), scratch, crop_size, edge, reader,
               name=db.stem, adapter="sliderunner")
    got.provenance.update(database=str(db.resolve()), slides=str(slide_root.resolve()),
                          mitosis_class=str(mitosis_class), class_id=class_id, n_deleted_skipped=n_deleted)
    return got


# ---- MIDOG++ -------------------------------------------------------------------------------

def read_midogpp(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The images (id, file_name, tumor_type, ...) and annotations (bbox [x1, y1, x2, y2],
    category_id, image_id, id) of the MIDOG++ JSON."""
    path = Path(path)
    data = read_json(path, "MIDOG++ annotation file")
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise AdapterError(f"{path}: expected the MIDOG++ JSON with 'images' and 'annotations'")
    images, annotations = pd.DataFrame(data["images"]), pd.DataFrame(data["annotations"])
    for table, cols, what in ((images, ("id", "file_name", "tumor_type"), "images"),
                              (annotations, ("id", "image_id", "bbox", "category_id"), "annotations")):
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise AdapterError(f"{path}: {what} lack fields {missing}")
    return images, annotations


def midogpp(root: str | Path, on_error: str, *, scratch: Path, slides: str | None = None, labels: str | None = None,
            category: int = 1, crop_size: int = CROP_SIZE, edge: str = "pad", reader: str = "auto",
            seed: int = 0) -> Ingested:
    """Crops around the MIDOG++ mitotic figures (`category_id` 1), centred on the bbox.

    `root` is MIDOG++.json (or its folder); slides `<file_name>` under `slides` (default:
    the JSON's folder). domain = tumor_type, group = the slide. Label -1, unless `labels`
    names the MIDOG 2025 Track 2 CSV: its rows sit at these bbox centres (same slide file,
    within 2 px), so each matched crop gets AMF -> 1 / NMF -> 0 and its `midog25_image_id`;
    this rebuilds the MIDOG 2025 training crops from the public slides.
    """
    path = Path(root)
    path = path / "MIDOG++.json" if path.is_dir() else path
    images, annotations = read_midogpp(path)
    files = images.set_index("id")
    chosen = annotations[annotations["category_id"] == parse_int(category, "category")]
    unknown = chosen[~chosen["image_id"].isin(files.index)]
    if len(unknown):
        raise AdapterError(f"{path}: annotation {unknown['id'].iloc[0]} refers to unknown image_id "
                           f"{unknown['image_id'].iloc[0]}")
    box = np.array(chosen["bbox"].tolist(), dtype=float).reshape(-1, 4)
    slide_files = files.loc[chosen["image_id"], "file_name"].astype(str).to_numpy()
    jobs = pd.DataFrame({
        "sample_id": [f"midogpp_{i}" for i in chosen["id"]], "label": UNLABELLED,
        "domain": files.loc[chosen["image_id"], "tumor_type"].astype(str).to_numpy(), "group": slide_files,
        "source": "midogpp", "fold": -1, SLIDE_FILE: slide_files,
        CENTER_X: (box[:, 0] + box[:, 2]) / 2, CENTER_Y: (box[:, 1] + box[:, 3]) / 2,
        "annotation_id": chosen["id"].to_numpy(), "image_id": chosen["image_id"].to_numpy(),
    }).sort_values([SLIDE_FILE, "annotation_id"], kind="stable").reset_index(drop=True)
    n_matched = None
    if labels:
        jobs, n_matched = _attach_midog25_labels(jobs, Path(labels))
    slide_root = Path(slides) if slides else path.parent
    got = _cut(jobs, _slide_finder(slide_root, set(images["file_name"].astype(str))), Problems(on_error), scratch,
               crop_size, edge, reader,
               name="midogpp", adapter="midogpp")
    got.provenance.update(annotations=str(path.resolve()), slides=str(slide_root.resolve()), category=int(category),
                          labels=str(Path(labels).resolve()) if labels else None, n_labels_matched=n_matched)
    return got


def _attach_midog25_labels(jobs: pd.DataFrame, csv: Path, tolerance: float = 2.0) -> tuple[pd.DataFrame, int]:
    """Label each crop from the MIDOG 2025 row at the same slide and centre (within `tolerance` px)."""
    meta = read_csv(csv, ["image_id", "filename", "coordinateX", "coordinateY", "majority"],
                    text=["image_id", "filename"])
    jobs = jobs.assign(midog25_image_id="", majority="")
    for slide, rows in meta.groupby("filename"):
        at = np.flatnonzero(jobs[SLIDE_FILE].to_numpy() == slide)
        if not len(at):
            continue
        ours = jobs.loc[at, [CENTER_X, CENTER_Y]].to_numpy(float)
        theirs = rows[["coordinateX", "coordinateY"]].to_numpy(float)
        dist = np.hypot(*(ours[:, None, :] - theirs[None, :, :]).transpose(2, 0, 1))
        nearest = dist.argmin(1)
        hit = dist[np.arange(len(at)), nearest] <= tolerance
        jobs.loc[at[hit], "midog25_image_id"] = rows["image_id"].to_numpy()[nearest[hit]]
        jobs.loc[at[hit], "majority"] = rows["majority"].to_numpy()[nearest[hit]]
    jobs["label"] = jobs["majority"].map(MIDOG25_LABELS).fillna(UNLABELLED).astype("int64")
    return jobs, int((jobs["midog25_image_id"] != "").sum())


# ---- shared: find slides, cut crops ----------------------------------------------------------

def _slide_finder(root: Path, unique_names: set[str]):
    """slide key (a relative path) -> its file under `root`: the path itself, else a file
    whose path ends with it, else (for names unique in the annotations) a file of that name."""
    index: list[Path] | None = None

    def find(key: str) -> Path | None:
        nonlocal index
        if (root / key).is_file():
            return root / key
        if index is None:
            index = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        tail = "/" + key.strip("/")
        hit = next((p for p in index if p.as_posix().endswith(tail)), None)
        name = Path(key).name
        if hit is None and name in unique_names:
            hit = next((p for p in index if p.name == name), None)
        return hit

    return find


def _cut(jobs: pd.DataFrame, find, problems: Problems, scratch: Path, crop_size: int | str, edge: str, reader: str,
         *, name: str, adapter: str) -> Ingested:
    """Cut every job's crop into a scratch store, slide by slide; returns it as `Ingested`."""
    size = parse_int(crop_size, "crop_size")
    if edge not in EDGES:
        raise AdapterError(f"option edge must be one of {EDGES}, got {edge!r}")
    if reader not in READERS:
        raise AdapterError(f"option reader must be one of {READERS}, got {reader!r}")
    if not len(jobs):
        raise AdapterError(f"{name}: no annotations of the chosen class")
    n_padded = 0
    with StoreWriter(Path(scratch) / f"{adapter}-crops", len(jobs), (size, size), name=name, adapter=adapter) as writer:
        bar = tqdm(total=len(jobs), desc=f"cut {adapter} crops", unit="crop", mininterval=1.0, disable=len(jobs) < 500)
        for slide_file, rows in jobs.groupby(SLIDE_FILE, sort=False):
            path = find(str(slide_file))
            try:
                if path is None:
                    raise SlideError(f"{slide_file}: slide file not found")
                slide = open_slide(path, reader)
            except SlideError as e:
                problems(slide_file, f"{str(e).split(': ', 1)[-1]} ({len(rows)} annotations left out)")
                bar.update(len(rows))
                continue
            try:
                for row in rows.to_dict("records"):
                    crop, inside = crop_centred(slide, row[CENTER_X], row[CENTER_Y], size)
                    bar.update(1)
                    if not inside and edge == "skip":
                        problems(row["sample_id"], f"crop at ({row[CENTER_X]:.0f}, {row[CENTER_Y]:.0f}) "
                                                   f"reaches past the edge of {slide_file}")
                        continue
                    n_padded += not inside
                    writer.add(crop, {**row, "padded": not inside})
            finally:
                slide.close()
        bar.close()
        if not writer.rows:
            raise AdapterError(f"{name}: no crop could be cut (no slide found under the slides folder?)")
    store = writer.store
    return Ingested(store.images, store.index, problems.frame(),
                    {"crop_size": size, "edge": edge, "n_padded": n_padded, "reader": reader})
