"""Digests that prove which real samples a generator saw (the fold-isolation check)."""
from __future__ import annotations

import hashlib
from typing import Iterable


def ids_digest(sample_ids: Iterable[str]) -> str:
    """Order-free sha256 of a set of sample ids."""
    return hashlib.sha256("\n".join(sorted(map(str, sample_ids))).encode()).hexdigest()
