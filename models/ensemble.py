"""The fold models of a train_cv run as one classifier: the mean probability over folds.

Used by `evaluate`, the registered pyfunc model and the platform container, so it takes
plain uint8 crops and does its own resize + normalisation (each fold model by its spec).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from analysis import keys
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

    @classmethod
    def from_train_run(cls, run_id: str, device: str | torch.device = "cpu",
                       dst: str | Path | None = None) -> "FoldEnsemble":
        """From the `checkpoint` artifacts of the finished fold runs of a train_cv parent run."""
        import mlflow

        folds = finished_fold_runs(run_id)
        if not folds:
            raise LookupError(f"train_cv run {run_id} has no finished fold runs with a {keys.CHECKPOINT_DIR} artifact")
        root = Path(dst or tempfile.mkdtemp(prefix="ensemble-"))
        dirs = [mlflow.artifacts.download_artifacts(run_id=child, artifact_path=keys.CHECKPOINT_DIR,
                                                    dst_path=str(root / f"fold{k}"))
                for k, child in sorted(folds.items())]
        return cls.from_dirs(dirs, device)

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


def finished_fold_runs(parent_run_id: str) -> dict[int, str]:
    """{fold k: run id} of the newest FINISHED nested fold run per fold of a train_cv parent."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`{keys.PARENT_RUN}` = '{parent_run_id}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1000)
    found: dict[int, str] = {}
    for r in runs:
        k = r.data.tags.get(keys.FOLD, "")
        if k.isdigit() and int(k) not in found:
            found[int(k)] = r.info.run_id
    return found
