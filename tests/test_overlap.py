"""The overlap check finds shared crops (exact, re-encoded, jittered, same location) and nothing else."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from PIL import Image

from data_tools.demo import make_demo
from data_tools.overlap import find_overlap
from data_tools.store import write_store


def _index(ids, **extra):
    return pd.DataFrame({"sample_id": ids, "label": 0, "domain": "d", "group": ids, "source": "t", "fold": -1, **extra})


def _jpeg(image, quality=75):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def test_finds_exact_reencoded_and_jittered_copies_only(tmp_path, demo_store):
    a = demo_store
    rng = np.random.default_rng(0)
    picks = rng.choice(len(a), 30, replace=False)
    copies = [a.images[i] for i in picks[:10]]
    copies += [_jpeg(np.asarray(a.images[i])) for i in picks[10:20]]
    copies += [np.clip(a.images[i].astype(int) + rng.integers(-2, 3, a.images[i].shape), 0, 255).astype(np.uint8)
               for i in picks[20:]]
    unrelated, _ = make_demo(120, seed=99)  # same generator, other seed: similar looking, not the same
    images = np.concatenate([np.stack(copies), unrelated])
    ids = [f"copy{k}" for k in range(30)] + [f"other{k}" for k in range(len(unrelated))]
    b = write_store(tmp_path / "b", images, _index(ids), name="b", adapter="test")
    found = find_overlap(a, b)
    truth = {(a.index["sample_id"].iloc[i], f"copy{k}") for k, i in enumerate(picks)}
    assert set(zip(found["id_a"], found["id_b"])) == truth
    kinds = dict(zip(found["id_b"], found["kind"]))
    assert all(kinds[f"copy{k}"] == "exact" for k in range(10))
    assert all(kinds[f"copy{k}"] == "near" for k in range(10, 30))
    assert found.loc[found["kind"] == "near", "distance"].max() < 3.0


def test_location_match_catches_a_recropped_figure(tmp_path):
    images, _ = make_demo(4, seed=5)
    loc_a = dict(slide_file=["001.tiff", "001.tiff", "002.tiff", ""], center_x=[100.0, 500, 100, 100], center_y=[50.0, 50, 50, 50])
    a = write_store(tmp_path / "a", images, _index(["a0", "a1", "a2", "a3"], **loc_a), name="a", adapter="test")
    shifted = np.roll(images[::-1], 20, axis=2)  # other pixels, so only the location can tell
    loc_b = dict(slide_file=["001.tiff", "001.tiff", "003.tiff", ""], center_x=[103.0, 900, 100, 100], center_y=[54.0, 50, 50, 50])
    b = write_store(tmp_path / "b", shifted, _index(["b0", "b1", "b2", "b3"], **loc_b), name="b", adapter="test")
    found = find_overlap(a, b)
    assert found[["id_a", "id_b", "kind"]].values.tolist() == [["a0", "b0", "location"]]
    assert found["distance"].iloc[0] == 5.0
