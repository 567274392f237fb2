"""Test-time augmentation: the views of a crop a classifier is run on, whose logits are averaged.

Mitotic figures have no orientation, so every symmetry of the square is a valid view:
`flips` = identity, h-flip, v-flip, both (the paper's TTA); `d4` = the 8 dihedral transforms
(4 rotations by 90 degrees, each with and without an h-flip), of which `flips` is a subgroup.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from data_tools.errors import ConfigError

if TYPE_CHECKING:  # the views use tensor methods only: configs import the modes without torch
    import torch

TTA_MODES = ("none", "flips", "d4")
View = Callable[["torch.Tensor"], "torch.Tensor"]  # [N, C, H, W] -> [N, C, H, W] (square H = W for rotations)


def _flip(dims: tuple[int, ...]) -> View:
    return lambda x: x.flip(dims) if dims else x


def _dihedral(k: int, mirror: bool) -> View:
    return lambda x: (x.flip(-1) if mirror else x).rot90(k, dims=(-2, -1))


VIEWS: dict[str, tuple[View, ...]] = {
    "none": (_flip(()),),
    "flips": tuple(_flip(d) for d in ((), (-1,), (-2,), (-2, -1))),
    "d4": tuple(_dihedral(k, mirror) for mirror in (False, True) for k in range(4)),
}


def tta_mode(tta: str | bool | None) -> str:
    """The TTA mode named; the old booleans still work (True = flips, False/None = none)."""
    if tta is None or isinstance(tta, bool):
        return "flips" if tta else "none"
    mode = str(tta).strip().lower()
    if mode not in TTA_MODES:
        raise ConfigError(f"tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")
    return mode


def views(tta: str | bool | None) -> tuple[View, ...]:
    return VIEWS[tta_mode(tta)]
