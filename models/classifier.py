"""A backbone with a one-logit head, with its pretrained weights from the hub, a local
file, or none, and never a silent random init when weights were asked for."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import timm
import torch
from torch import nn

from data_tools.augment import preprocess
from data_tools.errors import UserError
from models.backbones import BackboneSpec

log = logging.getLogger(__name__)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedWeightsError(UserError, RuntimeError):
    """Pretrained weights were asked for and could not be loaded."""


def build_classifier(spec: BackboneSpec, pretrained: str = "none") -> nn.Module:
    """The timm model of `spec` with one output logit per image.

    `pretrained`: "none" (random init), "hub" (the spec's Hugging Face weights, cached by
    huggingface_hub), or the path of a weights file (.safetensors, .pth, .bin, .npz).
    """
    if pretrained in (None, "", "none"):
        return _create(spec)
    path = hub_weights_file(spec) if pretrained == "hub" else Path(pretrained).expanduser()
    if not path.is_file():
        raise PretrainedWeightsError(f"weights file {path} does not exist. {_how_to(spec)}")
    overlay = {"file": str(path), "custom_load": path.suffix == ".npz"}
    try:
        model = _create(spec, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as e:  # noqa: BLE001 - any failure to load is reported with the way out
        raise PretrainedWeightsError(f"could not load {path} into {spec.timm_name}: {e}. {_how_to(spec)}") from e
    if not overlay["custom_load"]:
        _check_every_weight_loaded(model, path)
    log.info("loaded pretrained weights for %s from %s", spec.name, path)
    return model


def _create(spec: BackboneSpec, **kwargs) -> nn.Module:
    return timm.create_model(spec.timm_name, num_classes=1, **spec.model_kwargs, **kwargs)


def _how_to(spec: BackboneSpec) -> str:
    hub = (spec.hub_id or "").removeprefix("hf-hub:")
    get = (f"Download it on a machine with internet (`huggingface-cli download {hub} model.safetensors`) "
           f"and pass pretrained=<path to the file>, " if hub else
           f"No hub weights are registered for {spec.name} ({spec.timm_name}); "
           f"pass pretrained=<path to a weights file>, ")
    return get + "or pass pretrained=none to train from a random init on purpose."


def hub_weights_file(spec: BackboneSpec) -> Path:
    """The local path of the spec's hub weights, downloading them if needed."""
    if not spec.hub_id:
        raise PretrainedWeightsError(f"pretrained=hub: {_how_to(spec)}")
    from huggingface_hub import hf_hub_download

    repo = spec.hub_id.removeprefix("hf-hub:")
    errors = []
    for filename in WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo, filename))
        except Exception as e:  # noqa: BLE001 - offline, missing file, gated repo: all end in the same advice
            errors.append(f"{filename}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise PretrainedWeightsError(f"could not get the weights of {spec.name} from the Hugging Face hub ({repo}): "
                                 f"{'; '.join(errors)}. {_how_to(spec)}")


def _check_every_weight_loaded(model: nn.Module, path: Path) -> None:
    """timm loads non-strictly when the head changes size; make sure the file really held
    every backbone parameter (after timm's own key conversion for the architecture)."""
    state = timm.models.load_state_dict(str(path))
    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except TypeError:
            state = filter_fn(state)
    head = model.pretrained_cfg.get("classifier") or "head"
    heads = (head,) if isinstance(head, str) else tuple(head)
    missing = [n for n, _ in model.named_parameters()
               if n not in state and not any(n == h or n.startswith(h + ".") for h in heads)]
    if missing:
        raise PretrainedWeightsError(f"{path} lacks {len(missing)} of the {type(model).__name__}'s weights "
                                     f"(e.g. {missing[:3]}): is it a checkpoint of this architecture?")


FLIPS = ((), (-1,), (-2,), (-2, -1))  # test-time augmentation: identity, h-flip, v-flip, both


def predict_logits(model: nn.Module, spec: BackboneSpec, images: torch.Tensor, device: torch.device,
                   tta: bool = False) -> torch.Tensor:
    """[N] logits of uint8 [N, H, W, 3] crops: resize + normalise, bf16 + channels_last on a GPU;
    with `tta`, the mean logit over the four flips."""
    x = preprocess(images, spec.input_size, spec.mean, spec.std, device)
    cuda = device.type == "cuda"
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    out = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        for dims in (FLIPS if tta else FLIPS[:1]):
            out.append(model(x.flip(dims) if dims else x).reshape(-1).float())
    return torch.stack(out).mean(0)
