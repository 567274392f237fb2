"""A backbone with a one-logit head, with its pretrained weights from the hub, a local
file, or none, and never a silent random init when weights were asked for."""
from __future__ import annotations

import hashlib
import importlib
import logging
import socket
from pathlib import Path
from urllib.parse import urlsplit

import timm
import torch
from torch import nn

from data_tools.augment import preprocess
from data_tools.errors import UserError
from models.backbones import BackboneSpec
from models.precision import Precision, choose_precision
from models.tta import views

log = logging.getLogger(__name__)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedWeightsError(UserError, RuntimeError):
    """Pretrained weights were asked for and could not be loaded."""


def build_classifier(spec: BackboneSpec, pretrained: str = "none") -> nn.Module:
    """The timm model of `spec` with one output logit per image.

    `pretrained`: "none" (random init), "hub" (the spec's Hugging Face weights, cached by
    huggingface_hub), or the path of a weights file (.safetensors, .pth, .bin, .npz).
    """
    return _with_head(spec, _backbone(spec, pretrained))


def _backbone(spec: BackboneSpec, pretrained: str) -> nn.Module:
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


# model-card arguments that are classes, named in the registry so that a spec stays JSON
_NAMED_LAYERS = {"swiglu_packed": lambda: timm.layers.SwiGLUPacked}


def _create(spec: BackboneSpec, **kwargs) -> nn.Module:
    model_kwargs = dict(spec.model_kwargs)
    if model_kwargs.get("mlp_layer") in _NAMED_LAYERS:
        model_kwargs["mlp_layer"] = _NAMED_LAYERS[model_kwargs["mlp_layer"]]()
    if spec.pool:  # our own head below: timm returns the unpooled tokens
        model_kwargs["global_pool"] = ""
    return timm.create_model(spec.timm_name, num_classes=0 if spec.pool else 1, **model_kwargs, **kwargs)


class ClsMeanHead(nn.Module):
    """Virchow2's embedding, [class token, mean of the patch tokens], projected to one logit."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(2 * backbone.num_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)
        patches = tokens[:, self.backbone.num_prefix_tokens:]  # after the class and register tokens
        return self.head(torch.cat([tokens[:, 0], patches.mean(1)], dim=-1))


POOLS = {"": None, "cls+mean": ClsMeanHead}


def _with_head(spec: BackboneSpec, backbone: nn.Module) -> nn.Module:
    if spec.pool not in POOLS:
        raise PretrainedWeightsError(f"{spec.name}: unknown pooling {spec.pool!r} (known: {sorted(POOLS)})")
    return POOLS[spec.pool](backbone) if POOLS[spec.pool] else backbone


def _how_to(spec: BackboneSpec) -> str:
    hub = (spec.hub_id or "").removeprefix("hf-hub:")
    get = (f"Download it on a machine with internet (`huggingface-cli download {hub} model.safetensors`) "
           f"and pass pretrained=<path to the file>, " if hub else
           f"No hub weights are registered for {spec.name} ({spec.timm_name}); "
           f"pass pretrained=<path to a weights file>, ")
    return get + "or pass pretrained=none to train from a random init on purpose."


def hub_weights_file(spec: BackboneSpec) -> Path:
    """The local path of the spec's hub weights: the cache first (no network), else a download;
    an unreachable hub fails at once (no minute of retries) and never becomes a random init."""
    if not spec.hub_id:
        raise PretrainedWeightsError(f"pretrained=hub: {_how_to(spec)}")
    from huggingface_hub import constants, hf_hub_download

    repo = spec.hub_id.removeprefix("hf-hub:")
    for filename in WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo, filename, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: try the hub below
            pass
    errors = [_unreachable(constants.ENDPOINT, constants.HF_HUB_OFFLINE)]
    if errors[0] is None:
        errors = []
        for filename in WEIGHT_FILES:
            try:
                return Path(hf_hub_download(repo, filename, endpoint=constants.ENDPOINT))
            except Exception as e:  # noqa: BLE001 - missing file, gated repo: all end in the same advice
                errors.append(f"{filename}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    gated = (f"{repo} is a gated repository: accept its licence at https://huggingface.co/{repo} with your "
             f"account, then set HF_TOKEN (or run `huggingface-cli login`) and run again. " if spec.gated else "")
    raise PretrainedWeightsError(f"could not get the weights of {spec.name} from the Hugging Face hub ({repo}): "
                                 f"{'; '.join(errors)}. {gated}{_how_to(spec)}")


def _unreachable(endpoint: str, offline: bool) -> str | None:
    """Why the hub cannot be reached (one quick connection attempt), or None."""
    if offline:
        return "HF_HUB_OFFLINE is set and the weights are not in the local cache"
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as e:
        return f"cannot reach {endpoint} ({e}) and the weights are not in the local cache"
    return None


def weights_identity(spec: BackboneSpec, pretrained: str) -> dict[str, str]:
    """What identifies the weights a model starts from: the hub repository or the file, with the
    file's SHA-256 (a LoRA or linear-probe checkpoint stores this instead of the frozen backbone)."""
    if pretrained in (None, "", "none"):
        return {"source": "none"}
    path = hub_weights_file(spec) if pretrained == "hub" else Path(pretrained).expanduser().resolve()
    found = {"source": "hub", "hub_id": spec.hub_id} if pretrained == "hub" else {"source": "file", "path": str(path)}
    return {**found, "name": path.name, "sha256": file_sha256(path)}


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a (possibly multi-GB) weights file, computed once per process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


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


def predict_logits(model: nn.Module, spec: BackboneSpec, images: torch.Tensor, device: torch.device,
                   tta: str | bool = "none", precision: Precision | None = None) -> torch.Tensor:
    """[N] logits of uint8 [N, H, W, 3] crops: resize + normalise, channels_last on a GPU, in `precision`
    (default: the device's, models.precision: bf16 or fp16 on a GPU, fp32 on a CPU); with `tta`
    (none | flips | d4, models.tta), the mean logit over its views."""
    x = preprocess(images, spec.input_size, spec.mean, spec.std, device, spec.stain_norm)
    cuda = device.type == "cuda"
    out = []
    with (precision or choose_precision("auto", device)).autocast():
        for view in views(tta):
            v = view(x)
            out.append(model(v.contiguous(memory_format=torch.channels_last) if cuda else v).reshape(-1).float())
    return torch.stack(out).mean(0)
