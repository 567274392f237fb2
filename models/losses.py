"""Classification losses on one logit: BCE (the paper's), focal (Lin et al. 2017) and the
MIDOG 2025 winner's domain-weighted focal loss, where each crop counts with the inverse
frequency of its domain in the fold's training split, so that every domain weighs the same.

The focal term is written with logsigmoid rather than reusing torchvision.ops.sigmoid_focal_loss:
that one raises (1 - p)**gamma on a saturated sigmoid, whose gradient is NaN for gamma < 1
once a logit passes about 17.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from data_tools.errors import ConfigError

LOSSES = ("bce", "focal", "domain_focal")


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "bce", *,
                        focal_gamma: float = 2.0, pos_weight: float | None = None,
                        sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of the per-crop loss, times `pos_weight` on positives and
    `sample_weights` per crop where given (`domain_focal` requires them: `domain_weights`)."""
    if kind not in LOSSES:
        raise ConfigError(f"loss must be one of {LOSSES}, got {kind!r}")
    if kind == "domain_focal" and sample_weights is None:
        raise ValueError("domain_focal needs sample_weights (models.losses.domain_weights of the crops' domains)")
    if kind == "bce":
        pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
        if sample_weights is None:  # torch's own mean: the paper's loss, bit for bit as before losses were options
            return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pw)
        per_crop = F.binary_cross_entropy_with_logits(logits, targets, reduction="none", pos_weight=pw)
    else:
        per_crop = focal_loss(logits, targets, focal_gamma)
        if pos_weight is not None:
            per_crop = per_crop * (1 + (pos_weight - 1) * targets)
    if sample_weights is not None:
        per_crop = per_crop * sample_weights.to(per_crop.dtype)
    return per_crop.mean()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per crop: -(1 - p_t)^gamma log p_t, with p_t the probability given to the true class
    (targets in [0, 1]; gamma = 0 is BCE). log(1 - p_t) comes from logsigmoid, never from 1 - sigmoid."""
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    # 1 - p_t = t * sigmoid(-z) + (1 - t) * sigmoid(z), in log space
    log_miss = torch.logaddexp(torch.log(targets) + F.logsigmoid(-logits),
                               torch.log1p(-targets) + F.logsigmoid(logits))
    return torch.exp(gamma * log_miss) * ce


def domain_weights(domains: np.ndarray) -> np.ndarray:
    """float32 per crop: 1 / (its domain's share of `domains`), scaled to mean 1 over the array
    (the training split), so the loss keeps the scale of the unweighted one."""
    _, inverse, counts = np.unique(np.asarray(domains), return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse.reshape(-1)]
    return (w / w.mean()).astype(np.float32)
