"""One store from several (prepare_data source=stores, data_tools.merge): shared figures kept once and
listed, a slide in two sources one group, conflicting labels refused; on tiny demo stores and on the
real AMi-Br with a MIDOG 2025 store made from its own MIDOG21 crops."""
from __future__ import annotations

import os

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import shared_data
from data_tools.errors import UserError
from data_tools.ingest import ingest
from data_tools.merge import LabelConflict, merge_stores
from data_tools.store import open_store, write_store

N_EXACT, N_NEAR = 4, 4


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory):
    """(a, b): two demo stores; b's first 8 crops are a's crops 10..17 (4 exact, 4 with +-2 noise),
    same labels, so b's slides holding them are a's slides too."""
    root = tmp_path_factory.mktemp("merge")
    a, _ = ingest("demo", None, root / "a", folds=0, seed=0, size=80)
    other, _ = ingest("demo", None, root / "other", folds=0, seed=1, size=60)
    images, index = np.array(other.images), other.index.copy()
    rng = np.random.default_rng(0)
    for k in range(N_EXACT + N_NEAR):
        copy = np.asarray(a.images[10 + k])
        if k >= N_EXACT:
            copy = np.clip(copy.astype(int) + rng.integers(-2, 3, copy.shape), 0, 255).astype(np.uint8)
        images[k], index.loc[k, "label"] = copy, a.index["label"].iloc[10 + k]
    b = write_store(root / "b", images, index, name="b", adapter="demo")
    return a, b


def test_merge_keeps_one_copy_lists_duplicates_and_joins_slides(tracking, tmp_path, demo_pair):
    from pipelines.prepare_data import main
    a, b = demo_pair
    store = main(["--source", "stores", "--stores", f"{a.path},{b.path}", "--out", str(tmp_path / "m"),
                  "--folds", "3"])
    ix = store.index
    copies = [f"b:{s}" for s in b.index["sample_id"].iloc[:N_EXACT + N_NEAR]]
    originals = [f"a:{s}" for s in a.index["sample_id"].iloc[10:10 + N_EXACT + N_NEAR]]
    assert len(store) == len(a) + len(b) - len(copies) and not set(copies) & set(ix["sample_id"])
    # every row kept its columns; ids and slides carry their store's name
    assert (ix["source"] == "demo").all() and {"scanner", "morphology", "parent_sample_id"} <= set(ix.columns)
    row = ix.set_index("sample_id").loc[f"b:{b.index['sample_id'].iloc[20]}"]
    assert row["domain"] == b.index["domain"].iloc[20] and row["parent_group"] == b.index["group"].iloc[20]
    # the run lists the pairs (duplicates.csv) and the manifest what was dropped and from where
    run = mlflow.search_runs(output_format="list")[0]
    dup = pd.read_csv(mlflow.MlflowClient().download_artifacts(run.info.run_id, "duplicates.csv", str(tmp_path)))
    assert sorted(zip(dup["id_a"], dup["id_b"])) == sorted(zip(originals, copies))
    assert dup["kind"].tolist().count("exact") == N_EXACT and dup["kind"].tolist().count("near") == N_NEAR
    assert (dup["kept"] == dup["id_a"]).all() and not dup["conflict"].any()
    assert run.data.metrics["n_duplicates"] == len(copies) and run.data.metrics["n_label_conflicts"] == 0
    prov = store.manifest["provenance"]
    assert [p["digest"] for p in prov["parents"]] == [a.digest, b.digest]
    assert sorted(prov["dropped"]["duplicate"]) == sorted(copies) and prov["dropped"]["label_conflict"] == []
    assert run.data.tags["parent1_digest"] == a.digest and run.data.tags["parent2_digest"] == b.digest
    # a slide of b that held a copy is one group with the slide of a the original came from ...
    joined = 0
    for orig, copy in zip(a.index["group"].iloc[10:18], b.index["group"].iloc[:8]):
        ga = set(ix.loc[(ix["parent_store"] == "a") & (ix["parent_group"] == orig), "group"])
        gb = set(ix.loc[(ix["parent_store"] == "b") & (ix["parent_group"] == copy), "group"])  # its crops left
        assert len(ga) == 1 and gb <= ga
        joined += bool(gb)
    assert joined >= 4
    # ... the others stay apart per source (both demo stores name their slides slide_00..), and no slide is in two folds
    merged = ix.groupby(["parent_store", "parent_group"])["group"].first()
    # (a slide name of b whose crops were all copies has no row left: only names with crops in both count)
    same_name = {g for g in set(a.index["group"]) & set(b.index["group"])
                 if ("a", g) in merged and ("b", g) in merged}
    assert same_name and any(merged["a", g] != merged["b", g] for g in same_name)
    assert ix.groupby("group")["fold"].nunique().max() == 1 and set(ix["fold"]) == {1, 2, 3}


def test_a_conflicting_label_is_refused_or_both_copies_dropped(tracking, tmp_path, demo_pair):
    from pipelines.prepare_data import main
    a, b = demo_pair
    index = b.index.copy()
    index.loc[0, "label"] = 1 - index.loc[0, "label"]
    flipped = write_store(tmp_path / "flipped", np.asarray(b.images), index, name="b", adapter="demo")
    pair = (f"a:{a.index['sample_id'].iloc[10]}", f"b:{b.index['sample_id'].iloc[0]}")
    with pytest.raises(SystemExit, match=rf"^prepare_data: label conflict: {pair[0]} \(\w+\) and {pair[1]} \(\w+\) "
                                         r"are copies of one figure \(exact match\);[^\n]*on_conflict=drop"):
        main(["--source", "stores", "--stores", f"{a.path},{flipped.path}", "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()
    store, dup = merge_stores([a.path, flipped.path], tmp_path / "m", folds=3, on_conflict="drop")
    assert not set(pair) & set(store.index["sample_id"]) and len(store) == len(a) + len(b) - 7 - 2  # 7 copies, 1 pair
    assert dup.loc[dup["conflict"], ["id_a", "id_b"]].values.tolist() == [list(pair)]
    assert sorted(store.manifest["provenance"]["dropped"]["label_conflict"]) == sorted(pair)


def test_merge_refuses_one_store_and_other_crop_sizes(tmp_path, demo_pair):
    a, _ = demo_pair
    with pytest.raises(UserError, match="needs two or more stores"):
        merge_stores(str(a.path), tmp_path / "m")
    small = write_store(tmp_path / "small", np.asarray(a.images[:4, :64, :64]), a.index.iloc[:4], name="s", adapter="t")
    with pytest.raises(UserError, match=r"different crop sizes.*128x128.*64x64"):
        merge_stores([a.path, small.path], tmp_path / "m")


# ---- real data: AMi-Br and a MIDOG 2025 store of AMi-Br's own MIDOG21 crops -----------------------------

def _amibr_subset(root, amibr, csv: pd.DataFrame) -> None:
    """An AMi-Br-shaped folder holding only `csv`'s rows (links to the real PNGs, nothing copied)."""
    for cls in ("Atypical", "Normal"):
        (root / cls).mkdir(parents=True)
    for name, label in zip(csv["dataset_uid"], csv["final_label"]):
        os.symlink(amibr / label / name, root / label / name)
    csv.to_csv(root / "amibr_train_split.csv", index=False)


def _slides(split: pd.DataFrame, dataset: str, n: int, min_crops: int) -> pd.Index:
    """The `n` smallest slides of `dataset` with at least `min_crops` crops, 3 of each class."""
    rows = split[split["dataset"] == dataset]
    count = rows.groupby("slide")["final_label"].agg(n="size", a=lambda s: int((s == "Atypical").sum()))
    return count[(count["a"] >= 3) & (count["n"] - count["a"] >= 3) & (count["n"] >= min_crops)] \
        .sort_values(["n", "a"]).index[:n]


def test_amibr_with_its_midog21_crops_from_midog25(tmp_path):
    """The issue's case: AMi-Br's MIDOG21 crops are MIDOG 2025 crops. A subset keeps it cheap: 5 MIDOG21
    slides (AMi-Br holds half of each one's crops, the MIDOG 2025 store all of them) and 2 TUPAC16 slides."""
    amibr, midog_csv = shared_data("amibr"), shared_data("midog25", "MIDOG25.csv")
    split = pd.read_csv(amibr / "amibr_train_split.csv", dtype={"slide": str})
    split = split.drop(columns=[c for c in split.columns if c.startswith("Unnamed")])
    on_slides = split[split["slide"].isin(_slides(split, "MIDOG21", 5, 10)) & (split["dataset"] == "MIDOG21")]
    half = on_slides[on_slides.groupby("slide").cumcount() % 2 == 0]
    tupac = split[split["slide"].isin(_slides(split, "TUPAC16", 2, 0)) & (split["dataset"] == "TUPAC16")]
    _amibr_subset(tmp_path / "amibr", amibr, pd.concat([half, tupac]))
    # the MIDOG 2025 release's rows of these figures, their images AMi-Br's PNGs under the release's names
    table = pd.read_csv(midog_csv, dtype={"image_id": str, "filename": str})
    rows = table.merge(on_slides[["slide", "x", "y", "dataset_uid", "final_label"]],
                       left_on=["filename", "coordinateX", "coordinateY"], right_on=["slide", "x", "y"])
    assert len(rows) == len(on_slides)  # every MIDOG21 crop of AMi-Br is a MIDOG 2025 row
    (tmp_path / "m25").mkdir()
    for image_id, name, label in zip(rows["image_id"], rows["dataset_uid"], rows["final_label"]):
        os.symlink(amibr / label / name, tmp_path / "m25" / image_id)
    rows[table.columns].to_csv(tmp_path / "m25" / "MIDOG25.csv", index=False)
    a, _ = ingest("amibr", tmp_path / "amibr", tmp_path / "s_amibr", folds=0)
    m, _ = ingest("midog25", tmp_path / "m25" / "MIDOG25.csv", tmp_path / "s_midog25", folds=0,
                  images=str(tmp_path / "m25"))

    store, dup = merge_stores([a.path, m.path], tmp_path / "merged", folds=3, seed=0)
    shared = rows[rows["dataset_uid"].isin(half["dataset_uid"])]
    expected = {(f"s_amibr:{u.removesuffix('.png')}", f"s_midog25:{i.removesuffix('.png')}")
                for u, i in zip(shared["dataset_uid"], shared["image_id"])}
    assert set(zip(dup["id_a"], dup["id_b"])) == expected  # the shared crops, by pixels and by location
    assert set(dup["kind"]) == {"exact", "location"} and (dup["distance"] == 0).all()
    ix = store.index
    assert len(store) == len(a) + len(m) - len(shared)  # one copy of each: AMi-Br's (listed first)
    assert set(ix["sample_id"]) >= {p[0] for p in expected} and not {p[1] for p in expected} & set(ix["sample_id"])
    # the other half of each MIDOG21 slide comes from the MIDOG 2025 store, in the same group as AMi-Br's half
    assert (ix["parent_store"] == "s_midog25").sum() == len(on_slides) - len(half)
    assert ix.groupby("slide_file")["group"].nunique().max() == 1
    assert ix[ix["fold"] > 0].groupby("slide_file")["fold"].nunique().max() == 1  # no slide in two folds
    assert set(ix["source"]) == {"amibr", "midog25"} and ix["Scanner"].notna().any() and ix["slide"].notna().any()

    # a label that disagrees between the two copies of one figure is refused, naming both
    flipped = rows[rows["dataset_uid"].isin(shared["dataset_uid"].iloc[:3])].copy()
    flipped.loc[flipped.index[0], "majority"] = {"AMF": "NMF", "NMF": "AMF"}[flipped["majority"].iloc[0]]
    flipped[table.columns].to_csv(tmp_path / "m25" / "MIDOG25.csv", index=False)
    m2, _ = ingest("midog25", tmp_path / "m25" / "MIDOG25.csv", tmp_path / "s_flipped", folds=0,
                   images=str(tmp_path / "m25"))
    amibr_id = f"s_amibr:{flipped['dataset_uid'].iloc[0].removesuffix('.png')}"
    midog_id = f"s_flipped:{flipped['image_id'].iloc[0].removesuffix('.png')}"
    with pytest.raises(LabelConflict, match=rf"^label conflict: {amibr_id} \(\w+\) and {midog_id} \(\w+\)"):
        merge_stores([a.path, m2.path], tmp_path / "refused", folds=3)
    assert not (tmp_path / "refused").exists() and open_store(a.path).digest == a.digest
