"""Adapters: each turns one kind of raw source into images + index rows (`Ingested`).

Signature: `adapter(root, on_error, **options) -> Ingested`; `data_tools.ingest` picks
one by name, assigns folds and writes the store.
"""
from data_tools.adapters.base import AdapterError, Ingested, Problems

__all__ = ["AdapterError", "Ingested", "Problems"]
