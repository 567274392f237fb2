"""Which weights a fold trains: all of them (`full`, the paper), a LoRA adapter plus the head
(`lora`, through peft: the AMi-Br benchmark's and MIDOG 2025's recipe for foundation models),
or the head alone on a frozen backbone (`linear`, a linear probe).

A LoRA or linear-probe fold changes a few million numbers of a backbone that may hold a
billion: `trained_state` is what a checkpoint keeps of it (the trainable tensors and the
buffers), the frozen rest is identified by its weights file (models.classifier.weights_identity).
The same is also written in peft's own format (`save_adapter`: adapter_config.json and
adapter_model.safetensors), which `peft.PeftModel.from_pretrained(<the base classifier>, folder)`
loads anywhere peft runs: LoRA as peft's LoRA, a linear probe as peft's LN-tuning format over
the head (a trained copy of the whole head module), since peft has no adapter of a head alone.
For inference `merged` folds the adapter into the weights: a plain timm model again.
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from data_tools.errors import ConfigError

FINETUNE_MODES = ("full", "lora", "linear")


@dataclass(frozen=True)
class Finetune:
    """The fine-tuning fields of a step config (`TrainConfig.finetune_spec`): no defaults of its
    own, the profiles (pipelines/profiles.py) hold them."""
    mode: str
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: str  # module names inside the transformer (or ConvNeXt) blocks

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        return finetune_label(self.mode, self.lora_rank)

    def targets_pattern(self) -> str:
        """peft's target_modules as a regex: the named linear layers of the blocks, never the patch
        embedding's `proj`; `fc1` also matches SwiGLU's `fc1_g` / `fc1_x` (DINOv3)."""
        names = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        if not names:
            raise ConfigError("lora_targets is empty; give module names such as qkv,proj,fc1,fc2")
        return rf"(.*\.)?blocks\.\d+\.(.*\.)?({'|'.join(map(_word, names))})(_g|_x)?"


def finetune_label(mode: str, lora_rank: int | str) -> str:
    """What the tables add to the backbone's name."""
    return {"lora": f" + LoRA r{lora_rank}", "linear": " + linear probe"}.get(mode, "")


def _word(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ConfigError(f"lora_targets: {name!r} is not a module name")
    return name


def head_names(model: nn.Module) -> list[str]:
    """The classifier's module names (timm's pretrained_cfg["classifier"]; `head` otherwise)."""
    head = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    return [head] if isinstance(head, str) else list(head)


def apply_finetune(model: nn.Module, ft: Finetune) -> nn.Module:
    """The model with only what `ft.mode` trains left trainable (a peft model for `lora`)."""
    if ft.mode not in FINETUNE_MODES:
        raise ConfigError(f"finetune must be one of {', '.join(FINETUNE_MODES)}; got {ft.mode!r}")
    if ft.mode == "full":
        return model
    heads = head_names(model)
    if ft.mode == "linear":
        model.requires_grad_(False)
        for name in heads:
            model.get_submodule(name).requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
                        target_modules=ft.targets_pattern(), modules_to_save=heads)
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # no module matched the targets
        raise ConfigError(f"LoRA: {e} (lora_targets={ft.lora_targets!r}, model {type(model).__name__})") from None


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable ones); peft's saved copy of the head is counted once."""
    seen = {}
    for name, p in model.named_parameters():
        if ".original_module." not in name:
            seen[name] = p
    return sum(p.numel() for p in seen.values()), sum(p.numel() for p in seen.values() if p.requires_grad)


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changed: the trainable parameters and the saved buffers (e.g. BatchNorm statistics)."""
    params = dict(model.named_parameters())
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()
            if k not in params or params[k].requires_grad}


def load_trained_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Put `trained_state` back into a freshly built (and wrapped) model; every tensor must fit."""
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    expected = set(trained_state(model))
    lacking = sorted(expected - set(state))
    if unknown or lacking:
        raise ValueError(f"{where}: the saved tensors do not fit this model "
                         f"(unknown: {unknown[:3]}, missing: {lacking[:3]})")
    model.load_state_dict(state, strict=False)


def merged(model: nn.Module) -> nn.Module:
    """A plain model for inference: the LoRA adapter merged into a copy of the weights."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model


ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's file names


def save_adapter(model: nn.Module, ft: Finetune, folder: Path, base_name: str) -> None:
    """peft's files of what a LoRA or linear-probe fold trained, into `folder`; `base_name`: the
    base weights (hub repository or file name), peft's base_model_name_or_path."""
    from peft import LNTuningConfig, get_peft_model

    # save_embedding_layers=False: peft's "auto" asks the hub whether `base_name` has a config.json (no network here)
    if ft.mode == "lora":
        model.peft_config["default"].base_model_name_or_path = base_name
        model.save_pretrained(str(folder), save_embedding_layers=False)
    elif ft.mode == "linear":  # a model of the head alone, at its path: no copy of the backbone
        heads = head_names(model)
        holder = nn.Module()
        for name in heads:
            *path, last = name.split(".")
            parent = holder
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(last, copy.deepcopy(model.get_submodule(name)).cpu())
        holder.name_or_path = base_name  # what get_peft_model records as the base
        exact = "|".join(map(re.escape, heads))  # a regex is matched whole: not `backbone.head` for `head`
        get_peft_model(holder, LNTuningConfig(target_modules=exact)).save_pretrained(str(folder),
                                                                                     save_embedding_layers=False)
    else:
        raise ValueError(f"finetune={ft.mode} trains every weight: there is no adapter to save")
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty model card


def load_adapter(base: nn.Module, folder: Path) -> nn.Module:
    """The base classifier with the peft adapter of `folder` (save_adapter's files), for inference."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder)).eval()


def train_mode(model: nn.Module, ft: Finetune) -> None:
    """model.train(), except that a frozen backbone's BatchNorm layers keep their statistics."""
    model.train()
    if ft.mode == "full":
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()
