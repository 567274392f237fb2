"""The search space of `tune`: which train_cv fields a study draws, in one syntax for the profile
and the command line.

`lr=1e-5:1e-3:log,focal_gamma=0.5:3,lora_rank=4|8|16,augment=flips|strong`: `lo:hi` is a range
(`lo:hi:log` on a log scale), drawn as a float or an int by the field's type; `a|b|c` are
choices, cast to the field's type and checked against its vocabulary. A bare `lr` is tune's own
`lr_min:lr_max` on a log scale (the default space, the mission's learning-rate search). Every
mistake is one line before any trial runs.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

import optuna

from data_tools.errors import ConfigError
from models.training import TrainConfig

# the recipe's knobs; not the backbone, the regime, the seed or the weights (a study compares recipes of one model)
SEARCHABLE = ("lr", "epochs", "batch_size", "restart_epochs", "augment", "finetune", "lora_rank", "lora_alpha",
              "lora_dropout", "loss", "focal_gamma", "pos_weight", "sampler", "stain_norm")


@dataclass(frozen=True)
class Dimension:
    """One searched field: a range (`low`..`high`, `log`, drawn as int when `integer`) or `choices`."""
    name: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        return value is not None and self.low <= value <= self.high

    def text(self) -> str:
        """The dimension as a user writes it (its canonical form, stored with the study)."""
        if self.choices:
            return f"{self.name}={'|'.join(map(str, self.choices))}"
        number = (lambda v: str(int(v))) if self.integer else (lambda v: f"{v:g}")
        return f"{self.name}={number(self.low)}:{number(self.high)}" + (":log" if self.log else "")


def _field_type(name: str) -> type:
    kind = typing.get_type_hints(TrainConfig)[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def _number(text: str, kind: type, name: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"space: {name}: {text!r} is not a number") from None
    if kind is int:
        if value != int(value):
            raise ConfigError(f"space: {name} is an integer field; got {text!r}")
        return int(value)
    return value


def _range(name: str, spec: str, kind: type) -> Dimension:
    parts = spec.split(":")
    log = len(parts) == 3 and parts[2] == "log"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
        raise ConfigError(f"space: {name}={spec!r}: a range is lo:hi or lo:hi:log")
    low, high = (_number(p, kind, name) for p in parts[:2])
    if not low < high:
        raise ConfigError(f"space: {name}={spec!r} is an empty range (lo must be below hi)")
    if log and low <= 0:
        raise ConfigError(f"space: {name}={spec!r}: a log range needs lo > 0")
    return Dimension(name, float(low), float(high), log=log, integer=kind is int)


def _choices(name: str, spec: str, kind: type) -> Dimension:
    words = [w.strip() for w in spec.split("|")]
    if any(not w for w in words) or len(set(words)) != len(words):
        raise ConfigError(f"space: {name}={spec!r}: choices are distinct words a|b|c")
    if kind is str:
        vocabulary = {f.name: f for f in dataclasses.fields(TrainConfig)}[name].metadata.get("choices")
        unknown = [w for w in words if vocabulary and w not in vocabulary]
        if unknown:
            raise ConfigError(f"space: {name} has no value(s) {unknown}; it takes {'|'.join(vocabulary)}")
        return Dimension(name, choices=tuple(words))
    return Dimension(name, choices=tuple(_number(w, kind, name) for w in words))


def parse_space(text: str, lr_range: tuple[float, float]) -> list[Dimension]:
    """The dimensions of `text` (see the module's docstring), sorted by name; `lr_range`: a bare `lr`'s."""
    dims: dict[str, Dimension] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, spec = (s.strip() for s in item.partition("="))
        if name not in SEARCHABLE:
            raise ConfigError(f"space: {name!r} cannot be searched; the searchable train_cv fields: "
                              f"{', '.join(SEARCHABLE)}")
        if name in dims:
            raise ConfigError(f"space: {name} is given twice")
        kind = _field_type(name)
        if not spec and name == "lr":
            spec = f"{lr_range[0]:g}:{lr_range[1]:g}:log"
        if not spec:
            raise ConfigError(f"space: {name} needs a range lo:hi[:log] or choices a|b|c")
        if "|" in spec or (kind is str and ":" not in spec):
            dims[name] = _choices(name, spec, kind)
        elif kind is str:
            raise ConfigError(f"space: {name} takes choices (a|b|c), not a range")
        else:
            dims[name] = _range(name, spec, kind)
    if not dims:
        raise ConfigError("space is empty: name at least one field, e.g. space=lr")
    return [dims[n] for n in sorted(dims)]


def space_text(dims: list[Dimension]) -> str:
    return ",".join(d.text() for d in dims)


def baseline(dims: list[Dimension], values: dict[str, Any]) -> dict[str, Any]:
    """The baseline trial: the profile's value of each searched field that lies in the space."""
    return {d.name: values[d.name] for d in dims if d.contains(values[d.name])}


