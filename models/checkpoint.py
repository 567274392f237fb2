"""A fold model on disk: a folder with `config.json` (the backbone spec, how it was fine-tuned,
whatever the trainer adds) and its weights, enough to rebuild it offline, written atomically.

Weights: `model.safetensors`, the whole model (LoRA merged in), where the fold trained every
weight or started from a random init; or `trained.safetensors`, only what a LoRA or linear-probe
fold trained, where the frozen rest is a pretrained backbone, which `config.json` identifies
(hub repository or file, and its SHA-256) instead of storing a second copy of it. Beside it the
same in peft's format (`adapter_config.json`, `adapter_model.safetensors`, models.finetune
.save_adapter), for `peft.PeftModel.from_pretrained` on the named base; the loader reads either.
Loading finds the base file again (the hub cache, its recorded path, or the folder named by
$MITOCLASS_WEIGHTS_DIR) and says so when it is not there.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from data_tools.atomic import atomic_dir
from data_tools.errors import UserError
from safetensors.torch import load_file, save_file
from torch import nn

from models.backbones import BackboneSpec
from models.classifier import PretrainedWeightsError, build_classifier, file_sha256, hub_weights_file
from models.finetune import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, Finetune, apply_finetune, load_adapter,
                             load_trained_state, merged, save_adapter, trained_state)

WEIGHTS, TRAINED, CONFIG = "model.safetensors", "trained.safetensors", "config.json"
FORMAT = 1
WEIGHTS_DIR_ENV = "MITOCLASS_WEIGHTS_DIR"  # where a machine keeps the base weights files of LoRA checkpoints


def resolve_device(name: str | None = "auto") -> torch.device:
    """`auto` (or empty): the GPU when there is one, else the CPU; anything else as given."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class CheckpointError(UserError, ValueError):
    """A checkpoint folder is missing, incomplete, or does not fit its architecture."""


def save_checkpoint(model: nn.Module, spec: BackboneSpec, folder: str | Path, extra: dict[str, Any] | None = None,
                    finetune: Finetune | None = None, base: dict[str, str] | None = None) -> Path:
    """Write the folder next to its final place, then rename it in (a kill leaves the old one).
    `base`: models.classifier.weights_identity of the weights training started from."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    external = (finetune is not None and finetune.mode != "full"
                and base is not None and base.get("source") != "none")
    with atomic_dir(folder) as tmp:
        if external:
            save_file(trained_state(model), str(tmp / TRAINED), metadata={"format": str(FORMAT)})
            save_adapter(model, finetune, tmp, base_name(base))
        else:
            state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in merged(model).state_dict().items()}
            save_file(state, str(tmp / WEIGHTS), metadata={"format": str(FORMAT)})
        config = {"format": FORMAT, "spec": spec.to_dict(), "extra": extra or {},
                  "finetune": finetune.to_dict() if finetune else {"mode": "full"},
                  "base": base or {"source": "none"}}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=str))
    return folder


def base_name(base: dict[str, str]) -> str:
    """What peft records as the base model: the hub repository, or the weights file's name."""
    return (base.get("hub_id") or "").removeprefix("hf-hub:") or base.get("name", "")


def _config(folder: Path) -> dict[str, Any]:
    weights = (WEIGHTS, TRAINED, ADAPTER_WEIGHTS)
    if not (folder / CONFIG).is_file() or not any((folder / w).is_file() for w in weights):
        raise CheckpointError(f"{folder} is not a checkpoint folder (needs {CONFIG} and one of {', '.join(weights)})")
    return json.loads((folder / CONFIG).read_text())


def read_config(folder: str | Path) -> tuple[BackboneSpec, dict[str, Any]]:
    config = _config(Path(folder))
    return BackboneSpec.from_dict(config["spec"]), config.get("extra", {})


def load_checkpoint(folder: str | Path,
                    device: str | torch.device = "cpu") -> tuple[nn.Module, BackboneSpec, dict[str, Any]]:
    """(model in eval mode on `device`, its spec, the extra dict); no network needed (a LoRA
    checkpoint's base weights come from the hub cache or a local file); a LoRA or linear-probe
    checkpoint from its trained.safetensors, or, without it, from peft's adapter files."""
    folder = Path(folder)
    config = _config(folder)
    spec, extra = BackboneSpec.from_dict(config["spec"]), config.get("extra", {})
    if (folder / TRAINED).is_file() or (folder / ADAPTER_WEIGHTS).is_file():
        ft = Finetune(**config["finetune"])
        base = build_classifier(spec, str(base_weights(spec, config["base"], folder, ft)))
        if (folder / TRAINED).is_file():
            model = apply_finetune(base, ft)
            try:
                load_trained_state(model, load_file(str(folder / TRAINED)), str(folder))
            except ValueError as e:
                raise CheckpointError(str(e)) from e
        else:
            try:
                model = load_adapter(base, folder)
            except (ValueError, RuntimeError, KeyError) as e:  # peft's errors for an adapter of another model
                raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} do not fit {spec.timm_name}: "
                                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        return merged(model).to(device).eval(), spec, extra
    model = build_classifier(spec, pretrained="none")
    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: weights do not fit {spec.timm_name}: {e}") from e
    return model.to(device).eval(), spec, extra


def base_weights(spec: BackboneSpec, base: dict[str, str], folder: Path, ft: Finetune) -> Path:
    """The file a LoRA / linear-probe checkpoint was trained on top of, checked by its SHA-256."""
    what = (f"{folder} holds only the {ft.mode} weights trained on top of "
            f"{base.get('hub_id') or base.get('path')} ({base.get('name')}, sha256 {base.get('sha256', '?')[:12]})")
    if base.get("source") == "hub":
        try:
            path = hub_weights_file(spec)
        except PretrainedWeightsError as e:
            raise CheckpointError(f"{what}, and those base weights are not available here: {e}") from None
    else:
        candidates = [Path(base["path"])]
        if os.environ.get(WEIGHTS_DIR_ENV):
            candidates.append(Path(os.environ[WEIGHTS_DIR_ENV]) / base["name"])
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise CheckpointError(f"{what}; that file is missing on this machine: copy it to {base['path']} or "
                                  f"into a folder named by ${WEIGHTS_DIR_ENV}")
    if file_sha256(path) != base.get("sha256"):
        raise CheckpointError(f"{what}; {path} is a different file (sha256 {file_sha256(path)[:12]})")
    return path
