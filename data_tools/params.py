"""Config fields with their help and the one boolean vocabulary: shared by the library configs
(`models.training.TrainConfig`, `models.generator_training.FitConfig`) and the step configs that
extend them (`pipelines/config.py` builds command lines, logged params and profile keys from them)."""
from __future__ import annotations

import dataclasses
from typing import Any

TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def param(help: str, *, identity: bool = True, required: bool = False, none: str | None = None,
          choices: tuple[str, ...] | None = None) -> Any:
    """A config field without a default (defaults live in the profiles).

    identity=False: may differ between jobs of one experiment without changing its results
    (device, paths, the folds asked for); required: must be given; none: the word for None;
    choices: the only values accepted."""
    meta = {"help": help, "identity": identity, "required": required}
    if none is not None:
        meta["none"] = none
    if choices is not None:
        meta["choices"] = tuple(choices)
    return dataclasses.field(metadata=meta)


def identity_fields(cls_or_obj: Any) -> list[str]:
    """The names of the fields that define what is computed (keys, fingerprints)."""
    return [f.name for f in dataclasses.fields(cls_or_obj) if f.metadata.get("identity", True)]


def parse_flag(value: Any, name: str = "flag") -> bool:
    """true/yes/on/1 or false/no/off/0; any other word is an error, never False."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{name} must be one of {', '.join(TRUE_WORDS + FALSE_WORDS)}; got {value!r}")
