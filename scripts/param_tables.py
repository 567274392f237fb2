"""Write the parameter tables of docs/parameters.md from the step configs and the profiles.

    .venv/bin/python scripts/param_tables.py          # rewrites the section in docs/parameters.md
    .venv/bin/python scripts/param_tables.py --check  # exit 1 if docs/parameters.md is out of date

The section lies between the two marker lines below; tests/test_config.py runs --check's logic.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "parameters.md"  # the page whose tables this writes
sys.path.insert(0, str(ROOT))

from analysis import keys  # noqa: E402
from pipelines.config import build, config_class, shown  # noqa: E402
from pipelines.profiles import PROFILES  # noqa: E402

BEGIN, END = "<!-- parameter tables: scripts/param_tables.py -->", "<!-- end of parameter tables -->"
STEPS = (keys.MAIN, keys.PREPARE_DATA, keys.GENERATOR_PRETRAIN, keys.GENERATOR_FINETUNE, keys.SYNTHESIZE,
         keys.TRAIN_CV, keys.EVALUATE, keys.REPORT, keys.TUNE, keys.PREDICT, keys.SLURM)


def _cell(text: str) -> str:
    return "-" if text == "-" else f"`{text}`"


def _rows(cls) -> list[dataclasses.Field]:
    """A step's parameters; a step that extends another's config (tune) lists its own and those it overrides."""
    fields = [f for f in dataclasses.fields(cls) if f.name != "profile"]
    if len(cls.sections()) == 1:
        return fields
    own = set(cls.__dataclass_fields__) - set(cls.__bases__[0].__dataclass_fields__)
    overridden = {k for p in PROFILES.values() for k in p.get(cls.STEP, {})}
    return [f for f in fields if f.name in own | overridden]


def step_table(step: str) -> str:
    cls = config_class(step)
    given = {f.name: "<given>" for f in dataclasses.fields(cls) if f.metadata.get("required")}
    configs = {p: build(cls, p, **given) for p in PROFILES}
    note = " (not a step: the profile section of the jobs `main -P executor=slurm` submits)" if step == keys.SLURM else ""
    lines = [f"**`{step}`**{note}" + (f" (and every `{cls.sections()[0]}` parameter)" if len(cls.sections()) > 1 else ""),
             "", "| parameter | " + " | ".join(configs) + " | what |", "|---|" + "---|" * len(configs) + "---|"]
    for f in _rows(cls):
        required = f.metadata.get("required")
        values = ["(required)" if required else _cell(shown(getattr(c, f.name), f)) for c in configs.values()]
        what = f.metadata.get("help", "").replace("|", "\\|")
        lines.append(f"| `{f.name}` | " + " | ".join(values) + f" | {what} |")
    return "\n".join(lines)


def render() -> str:
    return "\n\n".join([BEGIN] + [step_table(s) for s in STEPS] + [END])


def current(page: str) -> str:
    """The page's tables as they stand, marker lines included."""
    start, end = page.index(BEGIN), page.index(END) + len(END)
    return page[start:end]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    text = PAGE.read_text()
    if args.check:
        ok = current(text) == render()
        print(f"the parameter tables of {PAGE.relative_to(ROOT)} are "
              + ("up to date" if ok else "out of date: run scripts/param_tables.py"))
        return 0 if ok else 1
    PAGE.write_text(text.replace(current(text), render()))
    print(f"wrote the parameter tables of {len(STEPS)} steps into {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
