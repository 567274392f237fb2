"""One typed config per step: its fields are the step's command line, its logged params and its
profile keys, so adding a parameter is one field (with its help) plus one value per profile.

A step declares a dataclass (deriving from `StepConfig`, and from the library config it feeds,
e.g. `models.training.TrainConfig`); `from_cli` builds the argument parser from its fields,
fills what was not given from the profile (`pipelines/profiles.py`, the only place for
defaults) and casts every value to the field's type. Field metadata, set with
`data_tools.params.param` (which the library configs use too):

- `help`: the --help text and the parameter tables in docs/parameters.md;
- `identity: False`: may differ between jobs of one experiment without changing its results
  (device, paths, the folds asked for): not in the experiment key, not logged on a shared parent;
- `required: True`: no default, must be given;
- `none`: the word that means None for an optional field (default "none"; "balance" for
  n_synthetic).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

from data_tools.params import identity_fields, param, parse_flag
from pipelines.profiles import PROFILES, defaults

C = TypeVar("C", bound="StepConfig")


@dataclass
class StepConfig:
    """What every step takes: the profile that fills in whatever is not given."""
    profile: str = param("demo | paper | a YAML profile file (base: demo + per-step overrides)", identity=False)

    STEP: ClassVar[str] = ""
    # profile sections whose values fill this config, later ones winning (tune: train_cv, then tune)
    SECTIONS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def sections(cls) -> tuple[str, ...]:
        return cls.SECTIONS or (cls.STEP,)


def _cast(value: Any, kind: Any, f: dataclasses.Field) -> Any:
    """A profile or command-line value as the field's type (`X | None` from the field's none word)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or str(value).strip().lower() in ("", "none", f.metadata.get("none", "none")):
            return None
        kind = next(a for a in args if a is not type(None))
    if kind is bool:
        return parse_flag(value, f.name)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{f.name} must be {getattr(kind, '__name__', kind)}, got {value!r}") from None


def build(cls: type[C], profile: str = "demo", **given: Any) -> C:
    """The config of `cls` under `profile`, with every given value that is set (not None, not "") winning."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    merged = defaults(profile, cls.sections())
    unknown = sorted(set(merged) - set(fields))
    if unknown:
        raise ValueError(f"profile {profile!r}: {cls.STEP} has no parameter(s) {unknown}; it knows {sorted(fields)}")
    bad = sorted(set(given) - set(fields))
    if bad:
        raise TypeError(f"{cls.STEP} has no parameter(s) {bad}")
    merged.update({k: v for k, v in given.items() if v is not None and v != ""})
    merged["profile"] = profile
    missing = [n for n, f in fields.items() if n not in merged and not f.metadata.get("required")]
    if missing:
        raise ValueError(f"profile {profile!r} has no default for {cls.STEP} parameter(s) {missing}")
    required = [n for n, f in fields.items() if f.metadata.get("required") and merged.get(n) in (None, "")]
    if required:
        raise ValueError(f"{cls.STEP} needs " + " and ".join(f"--{n} ({fields[n].metadata['help']})"
                                                         for n in required))
    types_ = typing.get_type_hints(cls)
    values = {n: _cast(merged[n], types_[n], f) for n, f in fields.items()}
    for n, f in fields.items():
        if "choices" in f.metadata and values[n] not in f.metadata["choices"]:
            raise ValueError(f"{n} must be one of {', '.join(f.metadata['choices'])}; got {values[n]!r}")
    return cls(**values)


def parser(cls: type[StepConfig], doc: str | None = None) -> argparse.ArgumentParser:
    """`--<field>` for every field (profile first), each defaulting to "" (= take the profile's value);
    the help names the built-in profiles' values."""
    p = argparse.ArgumentParser(prog=f"python -m pipelines.{cls.STEP}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    builtin = {name: defaults(name, cls.sections()) for name in PROFILES}
    fields = sorted(dataclasses.fields(cls), key=lambda f: f.name != "profile")
    for f in fields:
        values = ", ".join(f"{name}: {shown(section[f.name], f)}" for name, section in builtin.items()
                           if f.name in section)
        help_ = f.metadata.get("help", "") + (f" [{values}]" if values else "")
        p.add_argument(f"--{f.name}", default="demo" if f.name == "profile" else "", help=help_.replace("%", "%%"))
    return p


def shown(value: Any, f: dataclasses.Field) -> str:
    """A profile value as a user types it: None as the field's none word, flags as true/false, "" as -."""
    if value is None:
        return f.metadata.get("none", "none")
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else "-"


def from_cli(cls: type[C], argv: list[str] | None = None, doc: str | None = None,
             fill: Callable[[dict[str, str]], Any] | None = None) -> C:
    """Parse the command line (an unknown option is an error) and build the config; `fill` may set
    values the user left out (train_cv's from_study) before the profile fills the rest."""
    p = parser(cls, doc)
    args = vars(p.parse_args(argv))
    if fill:
        fill(args)
    try:
        return build(cls, args.pop("profile"), **args)
    except ValueError as e:
        p.error(str(e))


def as_params(cfg: StepConfig, include: type | None = None, identity_only: bool = False) -> dict[str, str]:
    """Fields as MLflow params (None as the field's none word); `include`: only that class's fields."""
    out = {}
    for f in dataclasses.fields(include or cfg):
        if identity_only and not f.metadata.get("identity", True):
            continue
        value = getattr(cfg, f.name)
        out[f.name] = f.metadata.get("none", "") if value is None else str(value).lower() if isinstance(
            value, bool) else str(value)
    return out


def identity(cfg: Any) -> dict[str, Any]:
    """The values of the fields that define what is computed (for experiment keys)."""
    return {name: getattr(cfg, name) for name in identity_fields(cfg)}


def config_class(step: str) -> type[StepConfig]:
    """The config class of a step module (`pipelines.<step>.CONFIG`)."""
    return importlib.import_module(f"pipelines.{step}").CONFIG
