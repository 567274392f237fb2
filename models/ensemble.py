"""The fold models of a train_cv run as one classifier: the mean probability over folds.

Used by `evaluate`, the registered pyfunc model and the platform container, so it takes
plain uint8 crops and does its own resize + normalisation (each fold model by its spec). It
loads from checkpoint folders; finding them in MLflow is `analysis.runs`'s job.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from models.backbones import BackboneSpec
from models.checkpoint import load_checkpoint
from models.classifier import predict_logits


class FoldEnsemble:
    def __init__(self, models: Sequence[nn.Module], specs: Sequence[BackboneSpec], device: str | torch.device = "cpu"):
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.device = torch.device(device)
        self.models = [m.to(self.device).eval() for m in models]
        self.specs = list(specs)

    def __len__(self) -> int:
        return len(self.models)

    @classmethod
    def from_dirs(cls, dirs: Sequence[str | Path], device: str | torch.device = "cpu") -> "FoldEnsemble":
        """From checkpoint folders (model.safetensors + config.json), offline."""
        loaded = [load_checkpoint(d, device) for d in dirs]
        return cls([m for m, _, _ in loaded], [s for _, s, _ in loaded], device)

    @torch.inference_mode()
    def predict_proba(self, images: np.ndarray, batch_size: int = 64, tta: bool = False) -> np.ndarray:
        """float32 [N] probability of atypical for uint8 crops [N, H, W, 3]."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 crops [N, H, W, 3], got {images.dtype} {images.shape}")
        out = np.empty(len(images), np.float32)
        for s in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.array(images[s:s + batch_size]))  # a writable copy of the slice
            probs = [torch.sigmoid(predict_logits(m, spec, batch, self.device, tta)) for m, spec in
                     zip(self.models, self.specs)]
            out[s:s + len(batch)] = torch.stack(probs).mean(0).cpu().numpy()
        return out

