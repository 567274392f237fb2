"""Adapters on small sources the tests write: crop files, CSVs, TIFF stacks, slides, databases."""
from __future__ import annotations

import json
import sqlite3
import time
import uuid

import mlflow
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from conftest import shared_data
from data_tools.adapters.base import AdapterError
from data_tools.adapters.slides import open_slide
from data_tools.adapters.wsi import read_annotations
from data_tools.demo import make_demo
from data_tools.images import ImageError, load_crop
from data_tools.ingest import adapter_options, ingest

CROPS, _ = make_demo(40, seed=3)


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


# ---- one crop --------------------------------------------------------------------------------

@pytest.mark.parametrize("make,error", [
    (lambda p: _png(p, CROPS[0]), None),
    (lambda p: _png(p, np.dstack([CROPS[0], np.full((128, 128), 255, np.uint8)])), None),
    (lambda p: _png(p, np.dstack([CROPS[0], np.full((128, 128), 100, np.uint8)])), "transparent"),
    (lambda p: _png(p, CROPS[0][..., 0]), "mode L"),
    (lambda p: Image.fromarray(CROPS[0]).convert("P").save(p) or p, "mode P"),
    (lambda p: _png(p, CROPS[0][:100]), "size 128x100, expected 128x128"),
    (lambda p: (p.write_bytes(b"\x89PNG\r\n\x1a\n broken"), p)[1], "cannot decode"),
    (lambda p: p, "not found"),
])
def test_load_crop_accepts_rgb_and_opaque_rgba_only(tmp_path, make, error):
    path = make(tmp_path / "crop.png")
    if error is None:
        assert np.array_equal(load_crop(path), CROPS[0])
    else:
        with pytest.raises(ImageError, match=error) as e:
            load_crop(path)
        assert str(tmp_path / "crop.png") in str(e.value)


# ---- folder, midog25, amibr ---------------------------------------------------------------

def _class_folders(root, n_atyp=4, n_norm=6):
    for i in range(n_atyp):
        _png(root / "Atypical" / f"a{i}.png", CROPS[i])
    for i in range(n_norm):
        _png(root / "normal" / f"n{i}.png", CROPS[10 + i])  # any case
    (root / "normal" / "notes.txt").write_text("not an image")
    return root


def test_folder_adapter_reads_classes_and_skips_bad_files(tmp_path):
    root = _class_folders(tmp_path / "src")
    store, skipped = ingest("folder", root, tmp_path / "s", overwrite=True, folds=0)
    assert len(store) == 10 and store.manifest["per_class"] == {"normal": 6, "atypical": 4}
    row = store.index.set_index("sample_id").loc["a2"]
    assert row["label"] == 1 and row["domain"] == "src" and row["group"] == "a2"
    assert np.array_equal(store.images[store.index["sample_id"].tolist().index("n3")], CROPS[13])
    _png(root / "Atypical" / "grey.png", CROPS[5][..., 0])
    with pytest.raises(AdapterError, match="grey.png: image mode L"):
        ingest("folder", root, tmp_path / "s2", folds=0)
    assert not (tmp_path / "s2").exists()
    store, skipped = ingest("folder", root, tmp_path / "s3", folds=0, on_error="skip")
    assert len(store) == 10 and skipped["item"].str.endswith("grey.png").tolist() == [True]
    _png(root / "NORMAL" / "x.png", CROPS[0])
    with pytest.raises(AdapterError, match="two folders for one class"):
        ingest("folder", root, tmp_path / "s4", folds=0, on_error="skip")


MIDOG25_COLUMNS = ["image_id", "filename", "coordinateX", "coordinateY", "Tumor", "Scanner", "Origin", "Species",
                   "expert1", "expert2", "expert3", "majority"]


def _midog25_source(root):
    rows = []
    for i in range(8):
        rows.append([f"{i + 1}.png", f"{300 + i % 3}.tiff", 100 * i, 50 * i, "human melanoma" if i % 2 else "canine lymphoma",
                     "Hamammatsu XR" if i < 3 else "Aperio CS2", "lab", "Human", "NMF", "NMF", "", "AMF" if i % 4 == 0 else "NMF"])
        _png(root / "images" / f"{i + 1}.png", CROPS[i])
    pd.DataFrame(rows, columns=MIDOG25_COLUMNS).to_csv(root / "MIDOG25.csv", index=False)
    return root


def test_midog25_adapter_labels_domains_groups_scanner(tmp_path):
    root = _midog25_source(tmp_path / "release")
    store, skipped = ingest("midog25", root, tmp_path / "s", overwrite=True, folds=0)
    ix = store.index.set_index("sample_id")
    assert len(store) == 8 and len(skipped) == 0
    assert ix.loc["1", "label"] == 1 and ix.loc["2", "label"] == 0 and ix.loc["5", "label"] == 1
    assert ix.loc["2", "domain"] == "human melanoma" and ix.loc["3", "group"] == "302.tiff"
    assert ix.loc["1", "Scanner"] == "Hamamatsu XR" and ix.loc["1", "scanner_raw"] == "Hamammatsu XR"
    assert ix.loc["7", "center_x"] == 600 and ix.loc["7", "slide_file"] == "300.tiff"
    assert np.array_equal(store.images[list(ix.index).index("4")], CROPS[3])


@pytest.mark.parametrize("break_it,message", [
    (lambda t, r: t.assign(majority=["XMF"] + t["majority"].tolist()[1:]), "MIDOG25.csv line 2 (1.png): unknown label 'XMF'"),
    (lambda t, r: t.assign(image_id=["1.png", "1.png"] + t["image_id"].tolist()[2:]), "line 3 (1.png): duplicate id '1'"),
    (lambda t, r: (r / "images" / "3.png").unlink() or t, "3.png: file not found"),
    (lambda t, r: _png(r / "images" / "4.png", CROPS[0][:, :64]) and t, "4.png: size 64x128"),
    (lambda t, r: _png(r / "images" / "5.png", CROPS[0][..., 1]) and t, "5.png: image mode L"),
])
def test_midog25_bad_rows_raise_or_skip(tmp_path, break_it, message):
    root = _midog25_source(tmp_path / "release")
    table = break_it(pd.read_csv(root / "MIDOG25.csv", dtype=str, keep_default_na=False), root)
    table.to_csv(root / "MIDOG25.csv", index=False)
    with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ingest("midog25", root, tmp_path / "s", overwrite=True, folds=0)
    store, skipped = ingest("midog25", root, tmp_path / "s", overwrite=True, folds=0, on_error="skip")
    assert len(store) == 7 and len(skipped) == 1 and message.split(": ")[-1] in skipped["reason"].iloc[0]


def test_midog25_missing_columns_are_named(tmp_path):
    root = _midog25_source(tmp_path / "release")
    pd.read_csv(root / "MIDOG25.csv").drop(columns=["majority", "Tumor"]).to_csv(root / "MIDOG25.csv", index=False)
    with pytest.raises(AdapterError, match=r"missing columns \['Tumor', 'majority'\]"):
        ingest("midog25", root, tmp_path / "s", overwrite=True, folds=0, on_error="skip")


def test_amibr_unlisted_crops_and_folder_conflicts(tmp_path):
    root = tmp_path / "amibr"
    rows = []
    for i in range(6):
        cls = "Atypical" if i < 2 else "Normal"
        _png(root / cls / f"MIDOG21_{i}.png", CROPS[i])
        rows.append([i, f"{i % 3:03d}.tiff", "MIDOG21", i, cls, f"MIDOG21_{i}.png", 10 * i, 20 * i])
    _png(root / "Normal" / "TUPAC16_99.png", CROPS[20])  # a PNG the split CSV does not list
    cols = ["Unnamed: 0", "slide", "dataset", "uid", "final_label", "dataset_uid", "x", "y"]
    pd.DataFrame(rows, columns=cols).to_csv(root / "amibr_train_split.csv", index=False)
    store, _ = ingest("amibr", root, tmp_path / "s", overwrite=True, folds=0)
    ix = store.index.set_index("sample_id")
    assert len(store) == 7 and "Unnamed: 0" not in ix.columns
    assert ix.loc["MIDOG21_1", "label"] == 1 and ix.loc["MIDOG21_4", "group"] == "001.tiff"
    assert ix.loc["TUPAC16_99", "group"] == "unknown:unlisted" and not ix.loc["TUPAC16_99", "in_split_csv"]
    assert len(ingest("amibr", root, tmp_path / "s", overwrite=True, folds=0, unlisted="drop")[0]) == 6
    rows[3][4] = "Atypical"  # the CSV now disagrees with the folder the PNG is in
    pd.DataFrame(rows, columns=cols).to_csv(root / "amibr_train_split.csv", index=False)
    with pytest.raises(AdapterError, match="line 5 .*CSV says Atypical but the file is in Normal/"):
        ingest("amibr", root, tmp_path / "s", overwrite=True, folds=0)


def test_unknown_option_is_named_with_the_valid_ones(tmp_path):
    assert set(adapter_options("sliderunner")) >= {"slides", "mitosis_class", "label", "edge", "crop_size"}
    with pytest.raises(ValueError, match="no option \\['slide'\\].*'slides'"):
        ingest("sliderunner", tmp_path / "x.sqlite", tmp_path / "s", overwrite=True, slide="typo")


# ---- platform stacks -------------------------------------------------------------------------

def test_gc_stack_with_ground_truth(tmp_path):
    tifffile.imwrite(tmp_path / "stack_1.tiff", CROPS[:3], photometric="rgb")
    tifffile.imwrite(tmp_path / "stack_2.tiff", CROPS[3:5], photometric="rgb")
    truth = [{"image": "stack_1.tiff", "labels": ["normal", "atypical", "normal"], "tumordomains": [1, 1, 1]},
             {"image": "stack_2.tiff", "labels": ["atypical", "normal"], "tumordomains": [4, 4]}]
    (tmp_path / "gt.json").write_text(json.dumps(truth))
    store, _ = ingest("gc_stack", tmp_path, tmp_path / "s", overwrite=True, folds=0, labels=str(tmp_path / "gt.json"))
    assert store.index["sample_id"].tolist() == ["stack_1_p0", "stack_1_p1", "stack_1_p2", "stack_2_p0", "stack_2_p1"]
    assert store.index["label"].tolist() == [0, 1, 0, 1, 0] and store.index["domain"].tolist() == ["1"] * 3 + ["4"] * 2
    assert np.array_equal(store.images, CROPS[:5])
    unlabelled, _ = ingest("gc_stack", tmp_path / "stack_2.tiff", tmp_path / "u", folds=0)
    assert unlabelled.index["label"].tolist() == [-1, -1]
    tifffile.imwrite(tmp_path / "stack_3.tiff", CROPS[:2, ..., 0])  # greyscale pages
    with pytest.raises(AdapterError, match="stack_3.tiff page 0: greyscale"):
        ingest("gc_stack", tmp_path, tmp_path / "s", overwrite=True, folds=0)
    (tmp_path / "stack_3.tiff").unlink()
    (tmp_path / "gt.json").write_text(json.dumps(truth[:1]))
    with pytest.raises(AdapterError, match="stack_2.tiff: no entry in the ground truth"):
        ingest("gc_stack", tmp_path, tmp_path / "s", overwrite=True, folds=0, labels=str(tmp_path / "gt.json"))
    store, skipped = ingest("gc_stack", tmp_path, tmp_path / "s", overwrite=True,
                            folds=0, labels=str(tmp_path / "gt.json"),
                            on_error="skip")
    assert len(store) == 3 and skipped["item"].str.endswith("stack_2.tiff").all()


# ---- whole-slide images ------------------------------------------------------------------------

SLIDE = np.random.default_rng(7).integers(0, 256, (700, 900, 3), dtype=np.uint8)


def _pyramid(path, image=SLIDE):
    """A small pyramidal tiled TIFF: level 0 plus two sub-resolutions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, tile=(256, 256), compression="zlib", photometric="rgb", subifds=2)
        for k in (2, 4):
            tw.write(image[::k, ::k], tile=(256, 256), compression="zlib", photometric="rgb", subfiletype=1)
    return path


def _expected(cx, cy, size=128, image=SLIDE):
    out = np.full((size, size, 3), 255, np.uint8)
    x, y = cx - size // 2, cy - size // 2
    h, w = image.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size, w), min(y + size, h)
    out[y0 - y:y1 - y, x0 - x:x1 - x] = image[y0:y1, x0:x1]
    return out


@pytest.mark.parametrize("reader", ["openslide", "tifffile"])
def test_slide_readers_cut_exact_pixels_and_pad_white(tmp_path, reader):
    slide = open_slide(_pyramid(tmp_path / "a.tif"), reader)
    assert slide.dimensions == (900, 700)
    for x, y in [(10, 20), (300, 255), (850, 650), (-40, -30)]:
        assert np.array_equal(slide.read(x, y, 128), _expected(x + 64, y + 64)), (x, y)
    slide.close()
    tifffile.imwrite(tmp_path / "striped.tif", SLIDE, photometric="rgb")  # OpenSlide refuses; tifffile reads
    auto = open_slide(tmp_path / "striped.tif", "auto")
    assert np.array_equal(auto.read(700, 600, 128), _expected(764, 664))


def _sliderunner_db(path, schema_sql):
    """A database in the real SlideRunner schema (triggers and all) with a few annotations."""
    conn = sqlite3.connect(path)
    conn.create_function("pycurrent_time", 0, time.time)
    conn.create_function("generate_uuid", 0, lambda: str(uuid.uuid4()))
    conn.create_function("randcolor", 0, lambda: "#123456")
    for sql in schema_sql:
        conn.execute(sql)
    conn.executemany("INSERT INTO Classes (uid, name) VALUES (?, ?)", [(1, "Mitotic figure"), (2, "Mitotic figure look-alike")])
    conn.executemany("INSERT INTO Slides (uid, filename, directory) VALUES (?, ?, ?)",
                     [(1, "a.tif", "cmc"), (2, "gone.svs", None)])
    annotations = [  # uid, slide, type, class, deleted, coordinates
        (1, 1, 1, 1, 0, [(100, 120)]), (2, 1, 1, 1, 0, [(450, 300)]), (3, 1, 5, 1, 0, [(600, 400), (640, 440)]),
        (4, 1, 1, 1, 1, [(200, 200)]), (5, 1, 1, 2, 0, [(300, 300)]), (6, 1, 1, 1, 0, [(880, 690)]),
        (7, 2, 1, 1, 0, [(50, 50)]),
    ]
    for uid, slide, kind, cls, deleted, coords in annotations:
        conn.execute("INSERT INTO Annotations (uid, slide, type, agreedClass, deleted) VALUES (?, ?, ?, ?, ?)",
                     (uid, slide, kind, cls, deleted))
        conn.executemany("INSERT INTO Annotations_coordinates (coordinateX, coordinateY, slide, annoId, orderIdx) "
                         "VALUES (?, ?, ?, ?, ?)", [(x, y, slide, uid, k) for k, (x, y) in enumerate(coords)])
        conn.execute("INSERT INTO Annotations_label (person, class, annoId) VALUES (1, ?, ?)", (cls, uid))
    conn.commit()
    conn.close()
    return path


@pytest.fixture(scope="module")
def sliderunner_schema():
    real = shared_data("sliderunner", "TUPAC.sqlite")
    with sqlite3.connect(f"file:{real}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name != 'sqlite_sequence' "
                            "ORDER BY type = 'trigger'").fetchall()
    return [r[0] for r in rows]


def test_sliderunner_crops_centred_on_live_annotations(tmp_path, sliderunner_schema):
    db = _sliderunner_db(tmp_path / "MITOS_WSI_CMC.sqlite", sliderunner_schema)
    _pyramid(tmp_path / "slides" / "cmc" / "a.tif")
    assert len(read_annotations(db)) == 7
    with pytest.raises(AdapterError, match="gone.svs: slide file not found"):
        ingest("sliderunner", db, tmp_path / "s", overwrite=True, folds=0, slides=str(tmp_path / "slides"))
    store, skipped = ingest("sliderunner", db, tmp_path / "s", overwrite=True, folds=0, slides=str(tmp_path / "slides"),
                            on_error="skip")
    ix = store.index
    assert ix["annotation_uid"].tolist() == [1, 2, 3, 6]  # not deleted 4, not look-alike 5, not slide 2
    assert (ix["label"] == -1).all() and (ix["group"] == "cmc/a.tif").all() and (ix["domain"] == "MITOS_WSI_CMC").all()
    for k, (cx, cy) in enumerate([(100, 120), (450, 300), (620, 420), (880, 690)]):
        assert np.array_equal(store.images[k], _expected(cx, cy)), k
    assert ix["padded"].tolist() == [False, False, False, True]
    assert skipped["item"].tolist() == ["gone.svs"] and "1 annotations" in skipped["reason"].iloc[0]
    assert store.manifest["provenance"]["n_deleted_skipped"] == 1
    by_id, _ = ingest("sliderunner", db, tmp_path / "s", overwrite=True,
                      folds=0, slides=str(tmp_path / "slides"), on_error="skip",
                      mitosis_class="2", edge="skip", label="0")
    assert by_id.index["annotation_uid"].tolist() == [5] and by_id.index["label"].tolist() == [0]
    edge, skipped = ingest("sliderunner", db, tmp_path / "s", overwrite=True, folds=0, slides=str(tmp_path / "slides"),
                           on_error="skip", edge="skip")
    assert len(edge) == 3 and "reaches past the edge" in skipped["reason"].iloc[-1]
    with pytest.raises(AdapterError, match="no class 'Mitosis'.*1='Mitotic figure'"):
        ingest("sliderunner", db, tmp_path / "s", overwrite=True, folds=0, mitosis_class="Mitosis")


def test_midogpp_crops_with_midog25_labels(tmp_path):
    images = [{"id": 1, "file_name": "001.tiff", "tumor_type": "human breast cancer"},
              {"id": 2, "file_name": "002.tiff", "tumor_type": "canine lymphoma"}]
    annotations = [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [75, 95, 125, 145]},
                   {"id": 11, "image_id": 1, "category_id": 2, "bbox": [300, 300, 350, 350]},
                   {"id": 12, "image_id": 1, "category_id": 1, "bbox": [400, 200, 450, 250]},
                   {"id": 13, "image_id": 2, "category_id": 1, "bbox": [10, 10, 60, 60]}]
    (tmp_path / "MIDOG++.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    _pyramid(tmp_path / "001.tiff")
    _pyramid(tmp_path / "002.tiff", SLIDE[::-1].copy())
    rows = [["1.png", "001.tiff", 100, 120, "AMF"], ["2.png", "001.tiff", 900, 900, "NMF"],
            ["3.png", "002.tiff", 35, 35, "NMF"]]
    pd.DataFrame(rows, columns=["image_id", "filename", "coordinateX", "coordinateY", "majority"]).to_csv(
        tmp_path / "MIDOG25.csv", index=False)
    store, _ = ingest("midogpp", tmp_path, tmp_path / "s", overwrite=True,
                      folds=0, labels=str(tmp_path / "MIDOG25.csv"))
    ix = store.index.set_index("sample_id")
    assert list(ix.index) == ["midogpp_10", "midogpp_12", "midogpp_13"]
    assert ix["label"].tolist() == [1, -1, 0] and ix["midog25_image_id"].tolist() == ["1.png", "", "3.png"]
    assert ix.loc["midogpp_13", "domain"] == "canine lymphoma" and ix.loc["midogpp_12", "group"] == "001.tiff"
    assert np.array_equal(store.images[1], _expected(425, 225))
    assert store.manifest["provenance"]["n_labels_matched"] == 2


# ---- the prepare_data step -----------------------------------------------------------------------

def test_prepare_data_logs_grids_and_skipped_items(tracking, tmp_path):
    from pipelines.prepare_data import main
    root = _class_folders(tmp_path / "src")
    _png(root / "normal" / "tiny.png", CROPS[0][:32, :32])
    store = main(["--source", "folder", "--root", str(root), "--out", str(tmp_path / "st"), "--folds", "0",
                  "--on_error", "skip", "--domain", "lab X"])
    run = mlflow.search_runs(output_format="list")[0]
    assert run.data.metrics["n_skipped"] == 1 and run.data.metrics["n_images"] == 10
    assert run.data.params["domain"] == "lab X" and run.data.tags["step"] == "prepare_data"
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(run.info.run_id, "grids")}
    assert names == {"grids/class_atypical.png", "grids/class_normal.png", "grids/domain_lab_X.png"}
    skipped = pd.read_csv(client.download_artifacts(run.info.run_id, "skipped.csv", str(tmp_path)))
    assert skipped["item"].str.endswith("tiny.png").tolist() == [True]
    assert (store.path / "grids" / "class_atypical.png").is_file()
