"""Profiles: the defaults of every step, in one place.

`demo` runs the whole workflow on 2 CPU cores in minutes; `paper` holds the protocol of
`reference/paper.txt` for a GPU. A parameter given by the user (not None, not "") wins
over the profile. Step modules own how their values are used; this file only holds them.
"""
from __future__ import annotations

from typing import Any

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "demo": {
        "prepare_data": {"source": "demo", "size": 1500, "folds": 5, "seed": 0, "on_error": "raise"},
        "train_cv": {"backbone": "convnext", "regime": "real_only", "folds": "all", "epochs": 4, "batch_size": 32,
                     "lr": None, "seed": 0, "pretrained": "none", "device": "auto"},
        "evaluate": {"threshold": "0.5"},
        "tune": {"n_trials": 4, "n_workers": 1, "lr_min": 1e-4, "lr_max": 3e-3, "folds": "1,2", "epochs": 2},
    },
    "paper": {
        "prepare_data": {"source": "midog25", "folds": 5, "seed": 42, "on_error": "skip"},
        "train_cv": {"backbone": "convnext", "regime": "real_only", "folds": "all", "epochs": 25, "batch_size": 16,
                     "lr": None, "seed": 42, "pretrained": "hub", "device": "auto"},
        "evaluate": {"threshold": "0.5"},
        "tune": {"n_trials": 20, "n_workers": 1, "lr_min": 1e-6, "lr_max": 1e-3, "folds": "all", "epochs": 10},
    },
}


def resolve(step: str, profile: str, given: dict[str, Any]) -> dict[str, Any]:
    """The profile's defaults for `step`, overridden by every given value that is set."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    merged = dict(PROFILES[profile].get(step, {}))
    merged.update({k: v for k, v in given.items() if v is not None and v != ""})
    return merged
