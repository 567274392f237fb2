"""The adapters on the real public data beside the clone (each test skips where it is absent)."""
from __future__ import annotations

import shutil
import sqlite3
import time

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from conftest import shared_data
from data_tools.adapters.wsi import read_annotations, read_classes
from data_tools.demo import make_demo
from data_tools.ingest import ingest
from data_tools.inputs import read_stack
from data_tools.overlap import find_overlap


@pytest.fixture(scope="session")
def amibr_store(tmp_path_factory):
    root = shared_data("amibr")
    store, skipped = ingest("amibr", root, tmp_path_factory.mktemp("real") / "amibr", folds=5, seed=0)
    return store, skipped


@pytest.mark.slow
def test_amibr_ingests_3720_crops_in_slide_grouped_folds(amibr_store):
    store, skipped = amibr_store
    ix = store.index
    assert len(store) == 3720 and store.manifest["per_class"] == {"normal": 2888, "atypical": 832} and len(skipped) == 0
    assert set(ix["domain"]) == {"MIDOG21", "TUPAC16"}
    assert ix.groupby("group")["fold"].nunique().max() == 1  # no slide in two folds
    assert all(set(ix.loc[ix["fold"] == k, "label"]) == {0, 1} for k in range(1, 6))
    assert int(ix["in_split_csv"].sum()) == 2894  # the rest: the benchmark's test split, grouped per dataset
    row = ix.index[ix["sample_id"] == "MIDOG21_7"][0]
    assert ix.loc[row, "group"] == "002.tiff" and ix.loc[row, "label"] == 1
    png = np.asarray(Image.open(shared_data("amibr", "Atypical", "MIDOG21_7.png")))
    assert np.array_equal(store.images[row], png)


def test_atnorm_br_ingests_746_crops_via_folder(tmp_path):
    store, _ = ingest("folder", shared_data("atnorm_br"), tmp_path / "atnorm", folds=0)
    assert len(store) == 746 and store.manifest["per_class"] == {"normal": 618, "atypical": 128}
    assert (store.index["fold"] == -1).all() and set(store.index["domain"]) == {"atnorm_br"}


@pytest.mark.slow
def test_midog25_csv_with_written_crops(tmp_path, amibr_store):
    csv = shared_data("midog25", "MIDOG25.csv")
    table = pd.read_csv(csv, dtype={"image_id": str, "filename": str})
    rng = np.random.default_rng(0)
    chosen = np.concatenate([rng.choice(np.flatnonzero(table["majority"] == "AMF"), 60, replace=False),
                             rng.choice(np.flatnonzero(table["majority"] == "NMF"), 200, replace=False),
                             np.flatnonzero(table["Scanner"] == "Hamammatsu XR")[:10]])
    chosen = np.unique(chosen)
    crops, _ = make_demo(len(chosen), seed=1)
    for crop, name in zip(crops, table["image_id"].iloc[chosen]):
        Image.fromarray(crop).save(tmp_path / name)
    # The real CSV lists 11,937 crops; only the written ones exist: the rest are skipped, each named.
    store, skipped = ingest("midog25", csv, tmp_path / "store", folds=3, on_error="skip", images=str(tmp_path))
    assert len(store) == len(chosen) and len(skipped) == len(table) - len(chosen)
    assert skipped["reason"].eq("file not found").all()
    ix = store.index.set_index("sample_id")
    rows = table.iloc[chosen].set_index(table["image_id"].iloc[chosen].str.removesuffix(".png"))
    assert (ix["label"] == rows.loc[ix.index, "majority"].map({"AMF": 1, "NMF": 0})).all()
    assert (ix["domain"] == rows.loc[ix.index, "Tumor"]).all() and (ix["group"] == rows.loc[ix.index, "filename"]).all()
    assert "Hamammatsu XR" not in set(ix["Scanner"]) and (ix["scanner_raw"] == "Hamammatsu XR").sum() >= 10
    assert ix.groupby("group")["fold"].nunique().max() == 1
    # AMi-Br's MIDOG21 crops are MIDOG 2025 crops: the overlap check finds them by location.
    overlap = find_overlap(amibr_store[0], store)
    assert len(overlap) and set(overlap["kind"]) == {"location"} and (overlap["distance"] == 0).all()


def test_platform_stack_gives_16_rgb_crops(tmp_path):
    stack = shared_data("gc_interface", "stack_5.tiff")
    pages = read_stack(stack)
    assert pages.shape == (16, 128, 128, 3) and pages.dtype == np.uint8
    store, _ = ingest("gc_stack", stack.parent, tmp_path / "gc", folds=0)
    assert store.index["sample_id"].tolist() == [f"stack_5_p{i}" for i in range(16)]
    assert np.array_equal(store.images, pages)


def test_real_sliderunner_schema_is_read(tmp_path):
    real = shared_data("sliderunner", "TUPAC.sqlite")
    assert read_classes(real).to_dict("records") == [{"uid": 1, "name": "Mitosis"}]
    annotations = read_annotations(real)
    assert len(annotations) == 1552 and annotations["slide_key"].nunique() == annotations["slide"].nunique()
    db = tmp_path / "TUPAC.sqlite"
    shutil.copy(real, db)
    key = annotations["slide_key"].value_counts().index[0]  # the slide with most figures
    on_slide = annotations[annotations["slide_key"] == key]
    with sqlite3.connect(db) as conn:  # mark three of its figures deleted (the triggers call SlideRunner's functions)
        conn.create_function("pycurrent_time", 0, time.time)
        conn.executemany("UPDATE Annotations SET deleted = 1 WHERE uid = ?", [(int(u),) for u in on_slide["uid"][:3]])
    slide = np.full((int(on_slide["center_y"].max()) + 80, int(on_slide["center_x"].max()) + 80, 3), 230, np.uint8)
    (tmp_path / "slides" / key).parent.mkdir(parents=True)
    tifffile.imwrite(tmp_path / "slides" / key, slide, tile=(256, 256), photometric="rgb", compression="zlib")
    store, skipped = ingest("sliderunner", db, tmp_path / "pool", folds=0, on_error="skip",
                            slides=str(tmp_path / "slides"), mitosis_class="mitosis")
    assert len(store) == len(on_slide) - 3 and (store.index["group"] == key).all()
    assert (store.index["label"] == -1).all() and store.manifest["provenance"]["n_deleted_skipped"] == 3
    assert len(skipped) == annotations["slide_key"].nunique() - 1  # one row per slide file not found
    assert (np.asarray(store.images)[:, 60:68, 60:68] == 230).all()


@pytest.mark.slow  # parses the whole MIDOG++ annotation file: ~8 s
def test_real_midogpp_annotations_carry_midog25_labels(tmp_path):
    json_path = shared_data("midogpp", "MIDOG++.json")
    csv = shared_data("midog25", "MIDOG25.csv")
    tifffile.imwrite(tmp_path / "014.tiff", np.full((300, 300, 3), 200, np.uint8), tile=(128, 128), photometric="rgb")
    store, skipped = ingest("midogpp", json_path, tmp_path / "pool", folds=0, on_error="skip",
                            slides=str(tmp_path), labels=str(csv))
    table = pd.read_csv(csv)
    on_slide = table[table["filename"] == "014.tiff"]
    assert len(store) == len(on_slide) and (store.index["domain"] == "human breast cancer").all()
    labelled = store.index[store.index["label"] >= 0]
    assert len(labelled) >= 0.95 * len(on_slide)
    expected = on_slide.set_index("image_id")["majority"].map({"AMF": 1, "NMF": 0})
    assert (labelled["label"].to_numpy() == expected.loc[labelled["midog25_image_id"]].to_numpy()).all()
    assert len(skipped) == table["filename"].nunique() - 1  # one row per slide file not found
