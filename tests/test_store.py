"""The dataset store contract, folds and the demo data."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from data_tools.demo import make_demo
from data_tools.folds import FoldError, assign_folds
from data_tools.store import StoreError, StoreWriter, open_store, write_store


def _index(n, **over):
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "label": [i % 2 for i in range(n)],
                       "domain": "d", "group": [f"g{i % 4}" for i in range(n)], "source": "t", "fold": -1})
    return df.assign(**over)


def test_store_roundtrip_and_digest(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    s = write_store(tmp_path / "a", imgs, _index(8), name="a", adapter="test")
    assert isinstance(s.images, np.memmap) and np.array_equal(s.images, imgs)
    assert s.manifest["per_class"] == {"normal": 4, "atypical": 4}
    same = write_store(tmp_path / "b", imgs, _index(8), name="b", adapter="test")
    assert same.digest == s.digest
    imgs2 = imgs.copy(); imgs2[3, 0, 0, 0] ^= 1
    assert write_store(tmp_path / "c", imgs2, _index(8), name="c", adapter="test").digest != s.digest
    relabelled = _index(8); relabelled.loc[0, "label"] = 1
    assert write_store(tmp_path / "d", imgs, relabelled, name="d", adapter="test").digest != s.digest


@pytest.mark.parametrize("bad,msg", [
    (lambda d: d.drop(columns=["group"]), "required columns"),
    (lambda d: d.assign(label=[5] + [0] * 7), "label 5"),
    (lambda d: d.assign(sample_id=["x"] * 8), "duplicate sample_id"),
])
def test_store_rejects_bad_index(tmp_path, bad, msg):
    imgs = np.zeros((8, 4, 4, 3), np.uint8)
    with pytest.raises(StoreError, match=msg):
        write_store(tmp_path / "s", imgs, bad(_index(8)), name="s", adapter="test")
    assert not (tmp_path / "s").exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_killed_write_leaves_no_store(tmp_path):
    """SIGKILL during a streaming ingest: no folder at `out` that opens as a store."""
    code = f"""
import numpy as np, os, signal
from data_tools.store import StoreWriter
with StoreWriter({str(tmp_path / 'pool')!r}, 10, (8, 8), name='p', adapter='t') as w:
    for i in range(5):
        w.add(np.zeros((8, 8, 3), np.uint8), dict(sample_id=str(i), label=-1, domain='d', group='g', source='s', fold=-1))
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd())
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "pool").exists()
    with pytest.raises(StoreError, match="not a complete dataset store"):
        open_store(tmp_path / "pool")


def test_streaming_writer_truncates_to_what_was_added(tmp_path):
    with StoreWriter(tmp_path / "w", 10, (8, 8), name="w", adapter="t") as w:
        for i in range(3):
            w.add(np.full((8, 8, 3), i, np.uint8), dict(sample_id=str(i), label=-1, domain="d", group="g", source="s", fold=-1))
    s = open_store(tmp_path / "w")
    assert s.images.shape == (3, 8, 8, 3) and s.images[2].max() == 2
    assert s.manifest["per_class"] == {"unlabelled": 3}


@pytest.mark.slow
def test_folds_are_grouped_and_stratified():
    _, index = make_demo(n=400, seed=1)
    index, spec = assign_folds(index, 5, seed=3)
    assert spec["k"] == 5 and spec["seed"] == 3
    assert index.groupby("group")["fold"].nunique().max() == 1
    for k in range(1, 6):
        assert set(index.loc[index.fold == k, "label"]) == {0, 1}
    again, _ = assign_folds(index, 5, seed=3)
    assert (again["fold"] == index["fold"]).all()


def test_folds_refuse_a_fold_without_a_class():
    df = _index(20, label=[1] * 2 + [0] * 18, group=[f"g{i}" for i in range(20)])
    with pytest.raises(FoldError, match="no atypical"):
        assign_folds(df, 5, seed=0)


@pytest.mark.slow
def test_demo_is_deterministic_and_imbalanced():
    a, ia = make_demo(n=300, seed=7)
    b, ib = make_demo(n=300, seed=7)
    assert np.array_equal(a, b) and ia.equals(ib)
    c, _ = make_demo(n=50, seed=7)
    assert np.array_equal(a[:50], c)  # image i depends only on (seed, i)
    assert 0.08 < ia.label.mean() < 0.25
    assert ia.domain.nunique() == 4 and ia.group.nunique() > 10
    # domains differ in colour the way stains do
    means = {d: a[ia.domain == d].reshape(-1, 3).mean(0) for d in ia.domain.unique()}
    spread = np.ptp(np.stack(list(means.values())), axis=0).max()
    assert spread > 5


def test_demo_store_manifest(demo_store):
    m = demo_store.manifest
    assert m["n"] == 600 and m["image_size"] == [128, 128] and m["split"]["k"] == 5
    assert json.loads((demo_store.path / "manifest.json").read_text())["digest"] == demo_store.digest
