"""A fold model on disk: a folder with `model.safetensors` and `config.json` (the backbone
spec and whatever the trainer adds), enough to rebuild it offline, written atomically."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from data_tools.atomic import atomic_dir
from data_tools.errors import UserError
from safetensors.torch import load_file, save_file
from torch import nn

from models.backbones import BackboneSpec
from models.classifier import build_classifier

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT = 1


def resolve_device(name: str | None = "auto") -> torch.device:
    """`auto` (or empty): the GPU when there is one, else the CPU; anything else as given."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class CheckpointError(UserError, ValueError):
    """A checkpoint folder is missing, incomplete, or does not fit its architecture."""


def save_checkpoint(model: nn.Module, spec: BackboneSpec, folder: str | Path,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write the folder next to its final place, then rename it in (a kill leaves the old one)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder) as tmp:
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": str(FORMAT)})
        config = {"format": FORMAT, "spec": spec.to_dict(), "extra": extra or {}}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=str))
    return folder


def read_config(folder: str | Path) -> tuple[BackboneSpec, dict[str, Any]]:
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"{folder} is not a checkpoint folder (needs {WEIGHTS} and {CONFIG})")
    config = json.loads((folder / CONFIG).read_text())
    return BackboneSpec.from_dict(config["spec"]), config.get("extra", {})


def load_checkpoint(folder: str | Path,
                    device: str | torch.device = "cpu") -> tuple[nn.Module, BackboneSpec, dict[str, Any]]:
    """(model in eval mode on `device`, its spec, the extra dict); no network needed."""
    spec, extra = read_config(folder)
    model = build_classifier(spec, pretrained="none")
    try:
        model.load_state_dict(load_file(str(Path(folder) / WEIGHTS)), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: weights do not fit {spec.timm_name}: {e}") from e
    return model.to(device).eval(), spec, extra
