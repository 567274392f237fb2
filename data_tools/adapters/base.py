"""What every adapter shares: its result type, its error, and the on_error policy."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from data_tools.errors import UserError

# Where a crop was cut, for adapters that know it: the slide file name and the level-0
# centre in pixels. The overlap check matches stores on these (AMi-Br's MIDOG21 crops sit
# at exactly the coordinates of MIDOG 2025 rows), besides matching pixels.
SLIDE_FILE, CENTER_X, CENTER_Y = "slide_file", "center_x", "center_y"
LOCATION_COLUMNS = (SLIDE_FILE, CENTER_X, CENTER_Y)


@dataclass
class Ingested:
    """What an adapter hands back: images, their index rows, and what it skipped (and why)."""
    images: np.ndarray
    index: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["item", "reason"]))
    provenance: dict[str, Any] = field(default_factory=dict)


class AdapterError(UserError, ValueError):
    """A raw source cannot be read as asked; the message names the file or row."""


def read_json(path: str | Path, what: str) -> Any:
    """A JSON annotation file, or an AdapterError naming it (`what`: e.g. "ground-truth file")."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None


class Problems:
    """The on_error policy in one place: 'raise' stops at the first bad item with a message
    naming it; 'skip' records (item, reason) for the skipped.csv artifact and goes on."""

    def __init__(self, on_error: str):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.rows: list[tuple[str, str]] = []

    def __call__(self, item: Any, reason: str) -> None:
        if self.on_error == "raise":
            raise AdapterError(f"{item}: {reason}")
        self.rows.append((str(item), reason))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["item", "reason"])


def require_columns(table: pd.DataFrame, columns: Iterable[str], where: str | Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise AdapterError(f"{where}: missing columns {missing} (found {list(table.columns)})")


def read_csv(path: str | Path, columns: Iterable[str], text: Iterable[str] = (), **kwargs) -> pd.DataFrame:
    """Read a metadata CSV, checking its columns; `text` columns stay strings (ids like '001')."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: CSV file not found")
    try:
        table = pd.read_csv(path, dtype={c: str for c in text}, **kwargs)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not a readable CSV ({e})") from None
    require_columns(table, columns, path)
    return table.drop(columns=[c for c in table.columns if c.startswith("Unnamed:")])


def flag_duplicates(ids: pd.Series, items: pd.Series, problems: Problems) -> np.ndarray:
    """Mask of rows to keep: the first of each id; later duplicates are problems."""
    dup = ids.duplicated(keep="first").to_numpy()
    for pos in np.flatnonzero(dup):
        problems(items.iloc[pos], f"duplicate id {ids.iloc[pos]!r}")
    return ~dup


def parse_int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise AdapterError(f"option {name} must be an integer, got {value!r}") from None
