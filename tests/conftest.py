"""Shared fixtures: a private MLflow tracking store per test, demo stores, the real data path."""
from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Path into ../shared/data, skipping the test cleanly where the real data is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not present at {path}")
    return path


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A fresh sqlite tracking store + artifact root for one test; yields the URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment("test")
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory):
    """A small demo store (600 crops, 5 folds) shared by the tests of a session; read-only."""
    from data_tools.ingest import ingest
    out = tmp_path_factory.mktemp("stores") / "demo600"
    store, _ = ingest("demo", None, out, folds=5, seed=0, size=600)
    return store
