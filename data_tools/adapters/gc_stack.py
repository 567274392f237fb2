"""Evaluation-platform stacks (MIDOG 2025 Track 2): multi-page TIFFs of 128x128 RGB crops.

Pages are read by `data_tools.inputs.read_stack`, the same reader `predict` uses, so a
stack that enters a store is exactly what the platform would hand an algorithm. The
optional ground truth is the platform's JSON:
`[{"image": "stack_1.tiff", "labels": ["normal", "atypical", ...], "tumordomains": [1, ...]}]`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from data_tools.adapters.base import AdapterError, Ingested, Problems, parse_int, read_json
from data_tools.constants import ATYPICAL, NORMAL, UNLABELLED
from data_tools.images import CROP_SIZE
from data_tools.inputs import InputError, find_stacks, read_stack

PLATFORM_LABELS = {"atypical": ATYPICAL, "normal": NORMAL}


def read_ground_truth(path: str | Path) -> dict[str, dict]:
    """The platform's ground-truth JSON as {stack file name: {"labels": [...], "tumordomains": [...]}}."""
    path = Path(path)
    entries = read_json(path, "ground-truth file")
    if not isinstance(entries, list):
        raise AdapterError(f"{path}: expected a list of {{image, labels, tumordomains}} entries")
    truth = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"image", "labels"} <= set(entry):
            raise AdapterError(f"{path}: entry {i} lacks 'image' or 'labels'")
        domains = entry.get("tumordomains") or [None] * len(entry["labels"])
        if len(domains) != len(entry["labels"]):
            raise AdapterError(f"{path}: entry {i} ({entry['image']}) has {len(entry['labels'])} labels "
                               f"but {len(domains)} tumordomains")
        truth[Path(str(entry["image"])).name] = {"labels": list(entry["labels"]), "tumordomains": list(domains)}
    return truth


def gc_stack(root: str | Path, on_error: str, *, labels: str | None = None, crop_size: int = CROP_SIZE,
             seed: int = 0) -> Ingested:
    """One stack file or a folder of them; sample_id `<stem>_p<page>`, group = the stack.

    With `labels` (the platform ground-truth JSON) each page gets its label ("atypical" ->
    1, "normal" -> 0) and domain (`tumordomains`, as text); without, label -1 and domain
    "unknown". A stack that cannot be read, or whose ground truth is missing or has another
    length, is a problem (raised, or skipped whole with on_error="skip").
    """
    root = Path(root)
    size = parse_int(crop_size, "crop_size")
    try:
        paths = [root] if root.is_file() else find_stacks(root)
    except InputError as e:
        raise AdapterError(str(e)) from None
    truth = read_ground_truth(labels) if labels else None
    problems = Problems(on_error)
    images, rows = [], []
    for path in paths:
        try:
            pages = read_stack(path, size)
        except InputError as e:
            problems(path, str(e).removeprefix(f"{path}: "))
            continue
        page_labels, domains = [UNLABELLED] * len(pages), ["unknown"] * len(pages)
        if truth is not None:
            entry = truth.get(path.name)
            if entry is None:
                problems(path, f"no entry in the ground truth {labels}")
                continue
            if len(entry["labels"]) != len(pages):
                problems(path, f"{len(pages)} pages but {len(entry['labels'])} labels in {labels}")
                continue
            unknown = [v for v in entry["labels"] if str(v).lower() not in PLATFORM_LABELS]
            if unknown:
                problems(path, f"unknown label {unknown[0]!r} in {labels} (expected 'normal' or 'atypical')")
                continue
            page_labels = [PLATFORM_LABELS[str(v).lower()] for v in entry["labels"]]
            domains = ["unknown" if d is None else str(d) for d in entry["tumordomains"]]
        images.append(pages)
        rows += [{"sample_id": f"{path.stem}_p{i}", "label": page_labels[i], "domain": domains[i],
                  "group": path.stem, "source": "gc_stack", "fold": -1, "stack": path.name, "page": i}
                 for i in range(len(pages))]
    index = pd.DataFrame(rows, columns=["sample_id", "label", "domain", "group", "source", "fold", "stack", "page"])
    array = np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return Ingested(array, index, problems.frame(),
                    {"n_stacks": len(paths), "labels": str(Path(labels).resolve()) if labels else None})
