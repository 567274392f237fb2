"""The backbone registry: what a backbone name means in a profile.

Each entry knows its timm architecture (with the model card's arguments), input size,
normalisation, pooling, where its pretrained weights live and its default learning rate. In
the `paper` set the names are the paper's networks and the pathology foundation models of
MIDOG 2025's leaderboard (UNI2-h, Virchow2, H-optimus-0, DINOv3); in `demo` `convnext` and
`lunit` resolve to small members of the same families at a reduced input size, so that the
tables keep the paper's rows on a laptop. Any other name is taken as a timm model name and
passes through with timm's own config.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from data_tools.constants import HOPTIMUS_MEAN, HOPTIMUS_STD, IMAGENET_MEAN, IMAGENET_STD, LUNIT_MEAN, LUNIT_STD
from data_tools.errors import ConfigError


@dataclass(frozen=True)
class BackboneSpec:
    name: str  # the user-facing name (a table row), e.g. "convnext"
    timm_name: str  # architecture for timm.create_model (offline; never a hub id)
    input_size: int  # crops are resized to input_size x input_size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hub_id: str | None  # Hugging Face repo of the pretrained weights ("hf-hub:" prefix optional)
    default_lr: float
    family: str  # "convnext" | "vit" | "timm"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    display: str = ""  # what the tables call the architecture and its weights, e.g. "UNI2-h"
    gated: bool = False  # the hub repository asks each user to accept its licence (HF_TOKEN needed)
    pool: str = ""  # "" = timm's own head; "cls+mean" = [class token, mean of patch tokens] (Virchow2)
    stain_norm: str = "none"  # preprocessing the model was trained with: none | macenko (data_tools.augment)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BackboneSpec":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        kwargs = d.get("model_kwargs") or {}
        d["model_kwargs"] = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        return cls(**d)


def _vit(name: str, timm_name: str, size: int, hub_id: str | None, lr: float, display: str = "",
         **kwargs) -> BackboneSpec:
    # the [CLS] token, projected to one logit, is the ViT's head
    return BackboneSpec(name, timm_name, size, LUNIT_MEAN, LUNIT_STD, hub_id, lr, "vit",
                        {"img_size": size, "global_pool": "token", **kwargs}, display=display)


PAPER: dict[str, BackboneSpec] = {
    "convnext": BackboneSpec("convnext", "convnext_small.fb_in1k", 128, IMAGENET_MEAN, IMAGENET_STD,
                             "timm/convnext_small.fb_in1k", 1e-4, "convnext", display="ConvNeXt-Small"),
    "lunit": _vit("lunit", "vit_small_patch8_224", 224, "hf-hub:1aurent/vit_small_patch8_224.lunit_dino", 1e-5,
                  display="Lunit SSL"),
    "lunit_s16": _vit("lunit_s16", "vit_small_patch16_224", 224, "hf-hub:1aurent/vit_small_patch16_224.lunit_dino",
                      1e-5, display="Lunit SSL ViT-S/16"),
}

# Small members of the two families, trained from scratch on 2 CPU cores in the demo
# (no hub weights exist for these shapes: pretrained must be `none` or a local file).
# ConvNeXt: Atto-shaped (depths 2-2-4-2, narrower), with BatchNorm and global max pooling.
# Measured on the demo crops from a random init, the LayerNorm / average-pooled original
# stays near AUROC 0.6 after 300 steps, this variant reaches about 0.8 (with ImageNet
# weights the original trains fine: that is the paper profile).
# ViT: ViT-Tiny wide (192, 3 heads) but 2 blocks, 8 px patches (36 tokens).
# Both see the crops at 48 px: measured on 1500 demo crops, 4 epochs, 5 folds, 48 px is
# faster and no worse than 64 px (ConvNeXt CV AUROC 0.78 in 74 s vs 0.76 in 95 s; ViT
# 0.68 in 49 s vs 0.68 in 91 s).
DEMO: dict[str, BackboneSpec] = {
    "convnext": BackboneSpec("convnext", "convnext_atto", 48, IMAGENET_MEAN, IMAGENET_STD, None, 2e-3, "convnext",
                             {"dims": (24, 48, 96, 192), "depths": (2, 2, 4, 2), "norm_layer": "batchnorm2d",
                              "conv_mlp": True, "global_pool": "max"}, display="ConvNeXt-Atto-shaped"),
    "lunit": _vit("lunit", "vit_tiny_patch16_224", 48, None, 3e-4, "ViT-Tiny-width/8", patch_size=8, depth=2),
    "lunit_s16": _vit("lunit_s16", "vit_tiny_patch16_224", 48, None, 3e-4, "ViT-Tiny-width/16",
                      patch_size=16, depth=2),
}

# Pathology foundation models, as their model cards create them with timm (arguments that are
# classes are named: models.classifier resolves them). All are gated on the hub.
_CARD_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
FOUNDATION: dict[str, BackboneSpec] = {
    # UNI2-h: ViT-H/14 with 8 register tokens, SwiGLU; class token
    "uni2": BackboneSpec("uni2", "vit_giant_patch14_224", 224, IMAGENET_MEAN, IMAGENET_STD, "hf-hub:MahmoodLab/UNI2-h",
                         5e-5, "vit", {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                                       "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                                       "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True,
                                       **_CARD_SWIGLU}, display="UNI2-h", gated=True),
    # Virchow2: ViT-H/14 with 4 register tokens, SwiGLU; the embedding is [class token, mean of patch tokens]
    "virchow2": BackboneSpec("virchow2", "vit_huge_patch14_224", 224, IMAGENET_MEAN, IMAGENET_STD,
                             "hf-hub:paige-ai/Virchow2", 5e-5, "vit",
                             {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4,
                              "dynamic_img_size": True, **_CARD_SWIGLU},
                             display="Virchow2", gated=True, pool="cls+mean"),
    # H-optimus-0: ViT-g/14 (DINOv2 with 4 registers), its own normalisation; class token
    "hoptimus0": BackboneSpec("hoptimus0", "vit_giant_patch14_reg4_dinov2", 224, HOPTIMUS_MEAN, HOPTIMUS_STD,
                              "hf-hub:bioptimus/H-optimus-0", 5e-5, "vit",
                              {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "global_pool": "token"},
                              display="H-optimus-0", gated=True),
    # DINOv3 ViT-H+/16 (the MIDOG 2025 Track 2 winner's backbone) and its small member for laptops
    "dinov3": BackboneSpec("dinov3", "vit_huge_plus_patch16_dinov3", 224, IMAGENET_MEAN, IMAGENET_STD,
                           "hf-hub:timm/vit_huge_plus_patch16_dinov3.lvd1689m", 5e-5, "vit", {"img_size": 224},
                           display="DINOv3 ViT-H+/16", gated=True),
    "dinov3_s": BackboneSpec("dinov3_s", "vit_small_patch16_dinov3", 224, IMAGENET_MEAN, IMAGENET_STD,
                             "hf-hub:timm/vit_small_patch16_dinov3.lvd1689m", 5e-5, "vit", {"img_size": 224},
                             display="DINOv3 ViT-S/16", gated=True),
}
PAPER.update(FOUNDATION)
REGISTRY = {"paper": PAPER, "demo": DEMO}


def resolve_backbone(name: str, backbone_set: str) -> BackboneSpec:
    """The spec of `name` in the backbone set (`paper` | `demo`, a config's `backbone_set`); an
    unknown name is looked up in timm."""
    if backbone_set not in REGISTRY:
        raise ConfigError(f"unknown backbone set {backbone_set!r}; choose one of {sorted(REGISTRY)}")
    for table in (REGISTRY[backbone_set], PAPER):
        if name in table:
            return table[name]
    return _timm_passthrough(name)


def _timm_passthrough(name: str) -> BackboneSpec:
    import timm

    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    if cfg is None:
        raise ConfigError(f"unknown backbone {name!r}: not one of {sorted(PAPER)} and not a timm model name "
                         f"(see timm.list_models())")
    hub = cfg.hf_hub_id
    if hub and hub.endswith("/"):
        hub += name  # timm's shorthand "timm/" means timm/<model.tag>
    family = "vit" if name.startswith(("vit_", "deit")) else "convnext" if name.startswith("convnext") else "timm"
    return BackboneSpec(name, name, int(cfg.input_size[-1]), tuple(cfg.mean), tuple(cfg.std), hub, 1e-4, family,
                        display=name)
