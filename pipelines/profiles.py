"""Profiles: the defaults of every step, in one place.

`demo` runs the whole workflow on 2 CPU cores in minutes; `paper` holds the protocol of
`reference/paper.txt` for a GPU. A profile may also be a YAML file of one's own:
`base: demo` (or `paper`) plus, per step, the values that differ (`train_cv: {epochs: 2}`).
A parameter given by the user (not None, not "") wins over the profile. Step modules own
how their values are used; this file only holds them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "demo": {
        "prepare_data": {"source": "demo", "size": 1500, "folds": 5, "seed": 0, "on_error": "raise"},
        "train_cv": {"backbone": "convnext", "regime": "real_only", "folds": "all", "epochs": 4, "batch_size": 32,
                     "lr": None, "seed": 0, "pretrained": "none", "device": "auto"},
        "evaluate": {"threshold": "0.5"},
        "tune": {"n_trials": 4, "n_workers": 1, "lr_min": 1e-4, "lr_max": 3e-3, "folds": "1,2", "epochs": 2},
        "report": {"select_by": "test_auroc", "n_boot": 1000, "register": "true"},
        "predict": {"tta": "false", "batch_size": 64, "device": "auto"},  # model/input/output: the platform's
    },
    "paper": {
        "prepare_data": {"source": "midog25", "folds": 5, "seed": 42, "on_error": "skip"},
        "train_cv": {"backbone": "convnext", "regime": "real_only", "folds": "all", "epochs": 25, "batch_size": 16,
                     "lr": None, "seed": 42, "pretrained": "hub", "device": "auto"},
        "evaluate": {"threshold": "0.5"},
        "tune": {"n_trials": 20, "n_workers": 1, "lr_min": 1e-6, "lr_max": 1e-3, "folds": "all", "epochs": 10},
        "report": {"select_by": "test_auroc", "n_boot": 2000, "register": "true"},
        "predict": {"tta": "false", "batch_size": 64, "device": "auto"},  # model/input/output: the platform's
    },
}


def _load(profile: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """(built-in base name, step defaults) of a built-in profile or a profile file."""
    if profile in PROFILES:
        return profile, PROFILES[profile]
    path = Path(profile)
    if not path.is_file():
        raise ValueError(f"unknown profile {profile!r}: neither one of {sorted(PROFILES)} nor a YAML file")
    spec = yaml.safe_load(path.read_text()) or {}
    base = spec.pop("base", "demo")
    if base not in PROFILES:
        raise ValueError(f"{path}: base must be one of {sorted(PROFILES)}, got {base!r}")
    steps = {step: {**PROFILES[base].get(step, {}), **(spec.get(step) or {})} for step in {*PROFILES[base], *spec}}
    return base, steps


def base_profile(profile: str) -> str:
    """The built-in profile (demo | paper) a profile builds on: what library code is told."""
    return _load(profile)[0]


def resolve(step: str, profile: str, given: dict[str, Any]) -> dict[str, Any]:
    """The profile's defaults for `step`, overridden by every given value that is set."""
    merged = dict(_load(profile)[1].get(step, {}))
    merged.update({k: v for k, v in given.items() if v is not None and v != ""})
    return merged
