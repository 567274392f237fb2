"""One CV store from several stores already made (any adapters), e.g. AMi-Br + another source.

Public sets share figures (AMi-Br's MIDOG21 crops are MIDOG 2025 crops), so concatenating
them would put one figure, or one slide, on both sides of a fold. Here:

- every crop keeps its row (`source`, `domain`, the source's own columns); `sample_id` and
  `group` get the parent store's name as prefix (`amibr:MIDOG21_7`), so ids and slides of
  different sources never collide; `parent_store`, `parent_sample_id`, `parent_group` keep
  where it came from;
- duplicates across stores (`data_tools.overlap`: exact pixels, near-duplicates, same slide
  location) are linked into sets; a set keeps its copies from the earliest listed store
  that has a labelled one, the rest are dropped. Every pair found is one row of the
  duplicates table (the step logs it as duplicates.csv);
- copies whose labels disagree are an error naming them, or with on_conflict="drop" every
  copy of that figure is dropped;
- a slide recognised in two stores (a duplicate pair links its groups, or crops name the
  same `slide_file`) is one group, so no slide lands in two folds;
- folds are assigned afresh (`data_tools.folds`); the manifest's provenance records each
  parent's digest, the ids dropped and the groups joined.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from data_tools.adapters.base import SLIDE_FILE
from data_tools.atomic import staging_dir
from data_tools.constants import ATYPICAL, LABEL_NAMES, NORMAL
from data_tools.errors import ConfigError, UserError
from data_tools.folds import assign_folds
from data_tools.ingest import prepare_out
from data_tools.overlap import find_overlap
from data_tools.store import REQUIRED_COLUMNS, Store, open_store, write_store

SOURCE = "stores"  # prepare_data's source name for a merge
ON_CONFLICT = ("raise", "drop")
_OVERLAP_DEFAULTS = {k: p.default for k, p in inspect.signature(find_overlap).parameters.items()
                     if p.default is not p.empty}
PARENT_COLUMNS = ("parent_store", "parent_sample_id", "parent_group")
DUPLICATE_COLUMNS = ["id_a", "id_b", "store_a", "store_b", "kind", "distance", "label_a", "label_b",
                     "conflict", "kept"]


class LabelConflict(UserError, ValueError):
    """Two copies of one figure carry different labels."""


def parse_stores(text: str | Sequence[str]) -> list[Path]:
    """"a,b" or [a, b] -> the store folders: two or more, none listed twice (merge_stores opens each)."""
    parts = [str(p).strip() for p in (text.split(",") if isinstance(text, str) else text) if str(p).strip()]
    if len(parts) < 2:
        raise ConfigError(f"stores={text!r}: a merge needs two or more stores, comma-separated "
                          "(e.g. stores=stores/amibr,stores/midog25)")
    paths = [Path(p) for p in parts]
    seen: dict[Path, str] = {}
    for p in paths:
        if p.resolve() in seen:
            raise ConfigError(f"stores: {p} is listed twice ({seen[p.resolve()]} and {p}); list each store once")
        seen[p.resolve()] = str(p)
    return paths


class _Links:
    """Union-find over hashable keys: which crops are one figure, which groups one slide."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def join(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller key (earlier store) names the set

    def sets(self, keys) -> dict:
        out: dict = {}
        for k in keys:
            out.setdefault(self.find(k), []).append(k)
        return out


def _names(stores: list[Store]) -> list[str]:
    """A short, unique prefix per parent: its manifest name (a repeated name gets _2, _3, ...)."""
    names: list[str] = []
    for s in stores:
        base, k = str(s.name), 2
        name = base
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def _combined_index(stores: list[Store], names: list[str]) -> pd.DataFrame:
    """The parents' rows in one table, ids and groups prefixed with the parent's name."""
    frames = []
    for s, name in zip(stores, names):
        ix = s.index.drop(columns=[c for c in PARENT_COLUMNS if c in s.index.columns]).copy()
        ix["parent_store"] = name
        ix["parent_sample_id"] = ix["sample_id"].astype(str)
        ix["parent_group"] = ix["group"].fillna("").astype(str)  # a missing group: one group per store
        ix["sample_id"] = name + ":" + ix["parent_sample_id"]
        ix["group"] = name + ":" + ix["parent_group"]
        frames.append(ix)
    index = pd.concat(frames, ignore_index=True)
    for col in index.columns:  # a column typed differently by two sources: its values as text
        if col not in REQUIRED_COLUMNS and index[col].dtype == object:
            kinds = {type(v) for v in index[col].dropna()}
            if len(kinds) > 1:
                index[col] = index[col].map(lambda v: v if pd.isna(v) else str(v))
    return index


def _pairs(stores: list[Store], names: list[str], offsets: list[int], **overlap) -> pd.DataFrame:
    """Every duplicate pair across two stores, with row positions in the combined index."""
    frames = []
    for i in range(len(stores)):
        for j in range(i + 1, len(stores)):
            found = find_overlap(stores[i], stores[j], **overlap)
            if not len(found):
                continue
            pos_a = pd.Series(np.arange(len(stores[i])) + offsets[i], index=stores[i].index["sample_id"].astype(str))
            pos_b = pd.Series(np.arange(len(stores[j])) + offsets[j], index=stores[j].index["sample_id"].astype(str))
            frames.append(found.assign(row_a=pos_a.loc[found["id_a"].astype(str)].to_numpy(),
                                       row_b=pos_b.loc[found["id_b"].astype(str)].to_numpy(),
                                       store_a=names[i], store_b=names[j]))
    if not frames:
        return pd.DataFrame(columns=["row_a", "row_b", "store_a", "store_b", "kind", "distance"])
    return pd.concat(frames, ignore_index=True)


def _label(v: int) -> str:
    return LABEL_NAMES.get(int(v), str(v))


def _resolve(index: pd.DataFrame, pairs: pd.DataFrame,
             store_of: np.ndarray) -> tuple[dict[int, list[int]], list[list[int]]]:
    """{row: the rows kept of its figure} for every row of a pair, and the figures (their rows)
    whose labelled copies disagree: nothing of those is kept."""
    links = _Links()
    for a, b in zip(pairs["row_a"], pairs["row_b"]):
        links.join(int(a), int(b))
    labels = index["label"].to_numpy()
    rows = sorted({int(r) for r in pairs["row_a"]} | {int(r) for r in pairs["row_b"]})
    kept, conflicts = {}, []
    for root, members in links.sets(rows).items():
        labelled = [r for r in members if labels[r] in (ATYPICAL, NORMAL)]
        if len({labels[r] for r in labelled}) > 1:
            conflicts.append(sorted(members))
            kept[root] = []
            continue
        candidates = labelled or members  # a labelled copy wins over an unlabelled one
        first = min(store_of[r] for r in candidates)
        kept[root] = sorted(r for r in candidates if store_of[r] == first)
    return {r: kept[links.find(r)] for r in rows}, conflicts


def _conflict_message(index: pd.DataFrame, pairs: pd.DataFrame, conflicts: list[list[int]]) -> str:
    ids, labels = index["sample_id"].to_numpy(), index["label"].to_numpy()
    members = conflicts[0]
    named = " and ".join(f"{ids[r]} ({_label(labels[r])})" for r in members if labels[r] in (ATYPICAL, NORMAL))
    kinds = sorted(set(pairs.loc[pairs["row_a"].isin(members), "kind"]))
    more = f"; {len(conflicts) - 1} more figure(s) like it" if len(conflicts) > 1 else ""
    return (f"label conflict: {named} are copies of one figure ({'/'.join(kinds)} match){more}; fix the label "
            "in a parent store, or give on_conflict=drop to drop every copy of such figures (listed in duplicates.csv)")


def _join_groups(index: pd.DataFrame, pairs: pd.DataFrame) -> tuple[pd.Series, dict[str, list[str]]]:
    """Each row's group after joining the groups of one slide; {joined name: its parent groups}."""
    links = _Links()
    groups = index["group"].astype(str).to_numpy()
    order = {g: k for k, g in enumerate(dict.fromkeys(groups))}  # first seen (earliest store) names a set
    for a, b in zip(pairs["row_a"], pairs["row_b"]):
        links.join(order[groups[int(a)]], order[groups[int(b)]])
    if SLIDE_FILE in index.columns:
        slides = index[SLIDE_FILE]
        named = slides.notna() & (slides.astype(str).str.strip() != "")
        for _, on_slide in pd.Series(groups[named.to_numpy()]).groupby(slides[named].astype(str).to_numpy()):
            first = order[on_slide.iloc[0]]
            for g in set(on_slide):
                links.join(first, order[g])
    by_id = list(order)
    name = {g: by_id[links.find(order[g])] for g in order}
    joined: dict[str, list[str]] = {}
    for g, n in name.items():
        joined.setdefault(n, []).append(g)
    return pd.Series([name[g] for g in groups]), {n: sorted(m) for n, m in joined.items() if len(m) > 1}


def duplicate_table(index: pd.DataFrame, pairs: pd.DataFrame, kept: dict[int, list[int]],
                    conflicted: set[int]) -> pd.DataFrame:
    """One row per pair found: both ids (merged names), their stores and labels, how they
    matched, whether the labels conflict, and the copies kept of that figure (';'-joined)."""
    ids, labels = index["sample_id"].to_numpy(), index["label"].to_numpy()
    a, b = pairs["row_a"].astype(int).to_numpy(), pairs["row_b"].astype(int).to_numpy()
    table = pd.DataFrame({
        "id_a": ids[a], "id_b": ids[b], "store_a": pairs["store_a"].to_numpy(), "store_b": pairs["store_b"].to_numpy(),
        "kind": pairs["kind"].to_numpy(), "distance": pairs["distance"].astype(float).to_numpy(),
        "label_a": [_label(v) for v in labels[a]], "label_b": [_label(v) for v in labels[b]],
        "conflict": [int(r) in conflicted for r in a],
        "kept": [";".join(ids[kept[int(r)]]) for r in a]})
    return table[DUPLICATE_COLUMNS]


def merge_stores(paths: Sequence[str | Path], out: str | Path, *, folds: int = 5, seed: int = 0,
                 split: str = "group", split_by: str = "domain", min_domain_size: int = 0,
                 on_conflict: str = "raise", overwrite: bool = False, name: str | None = None,
                 on_duplicates: Callable[[pd.DataFrame], None] | None = None,
                 **overlap) -> tuple[Store, pd.DataFrame]:
    """Build the store at `out` from the stores at `paths` (see the module doc); returns it with
    the duplicates table. `on_duplicates` gets that table (empty if none) before a label conflict is refused,
    so the pairs are kept (e.g. logged) even then. `overlap`: find_overlap's thresholds."""
    if on_conflict not in ON_CONFLICT:
        raise ConfigError(f"on_conflict must be one of {ON_CONFLICT}, got {on_conflict!r}")
    paths = parse_stores(paths)
    out = Path(out)
    if any(p.resolve() == out.resolve() for p in paths):
        raise ConfigError(f"out={out} is one of the stores to merge; write the merged store elsewhere")
    prepare_out(out, overwrite)
    stores = [open_store(p) for p in paths]
    sizes = {s.images.shape[1:] for s in stores}
    if len(sizes) > 1:
        raise ConfigError("stores of different crop sizes cannot be merged: " + ", ".join(
            f"{p} {s.images.shape[1]}x{s.images.shape[2]}" for p, s in zip(paths, stores)))
    names = _names(stores)
    index = _combined_index(stores, names)
    offsets = list(np.cumsum([0] + [len(s) for s in stores[:-1]]))
    store_of = np.repeat(np.arange(len(stores)), [len(s) for s in stores])
    pairs = _pairs(stores, names, offsets, **overlap)
    kept, conflicts = _resolve(index, pairs, store_of)
    conflicted = {r for members in conflicts for r in members}
    duplicates = duplicate_table(index, pairs, kept, conflicted)
    if on_duplicates is not None:  # even when empty: "none found" is a finding too
        on_duplicates(duplicates)
    if conflicts and on_conflict == "raise":
        raise LabelConflict(_conflict_message(index, pairs, conflicts))
    index["group"], joined = _join_groups(index, pairs)  # dropped copies' links count too: same slide
    dropped_dup = sorted(r for r, rows in kept.items() if r not in rows and r not in conflicted)
    keep = np.ones(len(index), bool)
    keep[dropped_dup] = False
    keep[sorted(conflicted)] = False
    ids = index["sample_id"].to_numpy()
    index = index[keep].reset_index(drop=True)
    index, spec = assign_folds(index, int(folds), int(seed), split, split_by, int(min_domain_size))
    cv = index[index["fold"] > 0]
    split_groups = int((cv.groupby("group")["fold"].nunique() > 1).sum())
    if split_groups:  # leave-one-domain-out splits by domain, not by slide
        print(f"{out.name}: {split_groups} slide group(s) lie in two folds (split={split} by {split_by}: a slide "
              "whose crops have two domains); split by a column that keeps a slide's crops together to avoid it",
              file=sys.stderr)
    provenance = {
        "source": SOURCE, "on_conflict": on_conflict, "overlap": {**_OVERLAP_DEFAULTS, **overlap},
        "parents": [{"name": n, "path": str(p.resolve()), "digest": s.digest, "adapter": s.manifest.get("adapter"),
                     "n": len(s), "n_kept": int(keep[store_of == i].sum())}
                    for i, (n, p, s) in enumerate(zip(names, paths, stores))],
        "n_duplicate_pairs": int(len(duplicates)),
        "dropped": {"duplicate": ids[dropped_dup].tolist(), "label_conflict": ids[sorted(conflicted)].tolist()},
        "joined_groups": joined, "groups_in_two_folds": split_groups,
    }
    with staging_dir(out, "scratch") as scratch:
        images = np.lib.format.open_memmap(scratch / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(int(keep.sum()), *stores[0].images.shape[1:]))
        at = 0
        for i, s in enumerate(stores):
            rows = np.flatnonzero(keep[store_of == i])
            for start in range(0, len(rows), 2048):
                chunk = rows[start:start + 2048]
                images[at:at + len(chunk)] = s.images[chunk]
                at += len(chunk)
        images.flush()
        store = write_store(out, images, index, name=name or out.name, adapter=SOURCE, provenance=provenance,
                            split=spec)
        del images
    return store, duplicates
