"""Training one cross-validation fold of a classifier (the paper's protocol).

NAdam, cosine annealing with warm restarts every `restart_epochs` epochs (stepped per
batch), BCE on one logit, validation AUROC picks the best epoch (BA at 0.5 beside it).
Batches come from the store's uint8 memmap and are augmented as tensors on the device.
Beyond the paper: which weights train (`finetune`: full, LoRA, linear probe;
models/finetune.py), the loss (focal, domain-weighted focal; models/losses.py) and a
class-balanced sampler.

Resumable: after every epoch the whole training state (model, optimizer, scheduler, RNG,
history, best so far) is written atomically to `workdir/state.pt`; the best model lives in
`workdir/best/` with its validation predictions. A restart with the same inputs continues
after the last finished epoch. The data order and the augmentation of epoch e are drawn
from seeds derived from (seed, fold, e), so a resumed run on the CPU repeats the
uninterrupted one exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data_tools.atomic import atomic_file
from data_tools.errors import ConfigError
from models.metrics import binary_metrics
from data_tools.augment import PRESETS, STAIN_NORMS, augment_and_preprocess, preprocess, preset
from data_tools.batches import SAMPLERS, CropPool, concat_pools, epoch_order, iterate_batches, pool_from_store
from data_tools.constants import ATYPICAL, NORMAL
from data_tools.folds import balance_count
from data_tools.params import identity_fields, param
from data_tools.store import Store
from models.backbones import REGISTRY, BackboneSpec, resolve_backbone
from models.checkpoint import resolve_device, save_checkpoint
from models.classifier import build_classifier, predict_logits, weights_identity
from models.finetune import (FINETUNE_MODES, Finetune, apply_finetune, count_params, load_trained_state, train_mode,
                             trained_state)
from models.losses import LOSSES, classification_loss, domain_weights
from models.precision import PRECISIONS, Precision, backward_step, choose_precision

STATE, BEST, BEST_PREDICTIONS = "state.pt", "best", "best_val_predictions.csv"


@dataclass
class TrainConfig:
    """How one fold is trained. `train_cv`'s config extends this class, so the loop receives it."""
    backbone: str = param("convnext | lunit | lunit_s16 | a timm model name")
    backbone_set: str = param("what the names mean: paper (the paper's networks) | demo (small members, 48 px)",
                              choices=tuple(REGISTRY))
    epochs: int = param("epochs per fold")
    batch_size: int = param("training batch size")
    lr: float | None = param("learning rate (none: the backbone's default)")
    seed: int = param("seed of the initialisation, data order and augmentation")
    restart_epochs: int = param("cosine annealing restarts every this many epochs")
    pretrained: str = param("hub | none | a local weights file")
    device: str = param("auto | cpu | cuda", identity=False)
    n_synthetic: int | None = param("synthetic atypical crops per fold (balance: as many as balance the classes)",
                                     none="balance")
    augment: str = param("paper | flips | strong | none (data_tools.augment.PRESETS)", choices=tuple(PRESETS))
    finetune: str = param("full | lora (peft adapters + head) | linear (frozen backbone, trained head)",
                          choices=FINETUNE_MODES)
    lora_rank: int = param("LoRA rank (finetune=lora)")
    lora_alpha: float = param("LoRA alpha (finetune=lora)")
    lora_dropout: float = param("LoRA dropout (finetune=lora)")
    lora_targets: str = param("comma-separated module names in the blocks that get LoRA adapters")
    loss: str = param("bce | focal | domain_focal (focal, each crop weighted by the inverse frequency of its domain "
                      "in the fold's training split)", choices=LOSSES)
    focal_gamma: float = param("focal loss gamma (loss=focal, domain_focal)")
    pos_weight: float | None = param("weight of the atypical class in the loss (none: 1)")
    sampler: str = param("shuffle | balanced (each batch draws both classes equally, with replacement)",
                         choices=SAMPLERS)
    stain_norm: str = param("none | macenko: every crop's stain mapped onto Macenko's reference before the model, "
                            "in training and, stored with the model, in inference", choices=STAIN_NORMS)
    compile: bool = param("torch.compile the model: faster steps after a one-off compile of a minute or more "
                          "(scripts/bench_gpu.py measures both)", identity=False)
    # an identity field: fp16, bf16 and fp32 round differently, so one seed trains (slightly) different weights;
    # the folds of one experiment agree on what was asked (`auto` resolves per machine, as device=auto does)
    precision: str = param("auto (bf16 on a GPU with native bf16, else fp16 with a gradient scaler; fp32 on a CPU) "
                           "| fp32 | fp16 | bf16", choices=PRECISIONS)

    EVAL_BATCH_SIZE: ClassVar[int] = 128
    PREFETCH: ClassVar[int] = 2  # batches gathered ahead by a background thread

    def spec(self) -> BackboneSpec:
        """The backbone, with the preprocessing it is trained with (and a checkpoint keeps)."""
        return dataclasses.replace(resolve_backbone(self.backbone, self.backbone_set), stain_norm=self.stain_norm)

    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else self.spec().default_lr

    def precision_on(self, device: torch.device) -> Precision:
        return choose_precision(self.precision, device)

    def finetune_spec(self) -> Finetune:
        return Finetune(self.finetune, self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)

    def parameter_counts(self) -> tuple[int, int]:
        """(parameters, trainable parameters) of the fold model, counted on the meta device (no memory)."""
        with torch.device("meta"):
            return count_params(apply_finetune(build_classifier(self.spec()), self.finetune_spec()))


@dataclass
class EpochMetrics:
    """What one epoch measured; the step module logs it under its MLflow key names."""
    train_loss: float
    val_loss: float
    val_auroc: float
    val_ba: float
    lr: float


@dataclass
class FoldResult:
    fold: int
    best_val_auroc: float
    best_val_ba: float
    best_epoch: int
    val_predictions: pd.DataFrame  # sample_id, label, prob, domain at the best epoch
    checkpoint: Path  # folder: model.safetensors + config.json
    history: list[EpochMetrics] = field(default_factory=list)  # epoch 1 first
    n_train_real: int = 0
    n_train_synthetic: int = 0
    n_val: int = 0
    precision: str = ""  # what training computed in (models.precision): fp32 | fp16 | bf16


def set_determinism() -> None:
    """Deterministic kernels (warn where an op has none) so the same seed gives the same run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _derived_seed(*parts: int) -> int:
    return int(np.random.default_rng([int(p) for p in parts]).integers(2 ** 62))


def synthetic_rows(synthetic: Store, n: int, seed: int, k: int) -> np.ndarray:
    """`n` of the synthetic store's atypical rows, a fixed random choice per (seed, fold)."""
    atypical = np.flatnonzero(synthetic.index["label"].to_numpy() == ATYPICAL)
    chosen = np.random.default_rng([seed, k, 0x5E]).permutation(atypical)[:n]
    return np.sort(chosen)


def fold_pools(cfg: TrainConfig, store: Store, k: int, synthetic: Store | None) -> tuple[CropPool, CropPool, int]:
    """Fold k's training pool (real + synthetic atypical crops) and its real-only validation pool.
    `synthetic` must have passed data_tools.provenance.check_synthetic_for_fold (train_cv checks every
    fold's before training any)."""
    if k not in store.folds:
        raise ConfigError(f"fold {k} is not a fold of store {store.path} (folds {store.folds})")
    train_rows, val_rows = store.fold_rows(k)
    labels = store.index["label"].to_numpy()
    for split, rows in (("training", train_rows), ("validation", val_rows)):
        have = set(labels[rows].tolist())
        if not {ATYPICAL, NORMAL} <= have:
            raise ConfigError(f"store {store.path}: fold {k}'s {split} split lacks a class (has labels {sorted(have)})")
    train = pool_from_store(store, train_rows)
    n_syn = 0
    if synthetic is not None:
        wanted = cfg.n_synthetic if cfg.n_synthetic is not None else balance_count(store, k)
        rows = synthetic_rows(synthetic, wanted, cfg.seed, k)  # at most what the store has
        n_syn = len(rows)
        if n_syn < wanted:
            tqdm.write(f"fold {k}: {wanted} synthetic atypical crops wanted, the store has {n_syn}; using all")
        if n_syn:
            train = concat_pools(train, pool_from_store(synthetic, rows))
    return train, pool_from_store(store, val_rows), n_syn


def _fingerprint(cfg: TrainConfig, store: Store, k: int, synthetic: Store | None, n_syn: int) -> str:
    """What this fold's training state depends on: TrainConfig's identity fields and the data."""
    fields = {name: getattr(cfg, name) for name in identity_fields(TrainConfig)}
    blob = json.dumps({"cfg": fields, "lr": cfg.learning_rate(), "data": store.digest, "fold": k,
                       "synthetic": synthetic.digest if synthetic is not None else None, "n_syn": n_syn},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_atomic(obj, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def _load_state(path: Path, fingerprint: str) -> dict | None:
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers: no pickle
    if state.get("fingerprint") != fingerprint:
        raise RuntimeError(f"{path} holds the state of a different training (fingerprint {state.get('fingerprint')} "
                           f"!= {fingerprint}); delete {path.parent} to start this one afresh")
    return state


@torch.inference_mode()
def predict_pool(model: torch.nn.Module, spec: BackboneSpec, pool: CropPool, device: torch.device,
                 batch_size: int = 128, precision: Precision | None = None) -> tuple[np.ndarray, float]:
    """(probabilities [N], mean BCE loss) of the pool's crops, resize + normalise only; `precision`:
    the training's (default: the device's, models.precision)."""
    model.eval()
    out = []
    for images, _, _ in iterate_batches(pool, batch_size, prefetch=1, pin=device.type == "cuda"):
        out.append(predict_logits(model, spec, images, device, precision=precision).float().cpu())
    z = torch.cat(out)
    loss = F.binary_cross_entropy_with_logits(z, torch.from_numpy(pool.labels)).item()
    return torch.sigmoid(z).numpy(), loss


def _domain_loss_weights(pool: CropPool, n_syn: int) -> torch.Tensor:
    """Per crop: the inverse frequency of its domain among the real crops (mean 1); the synthetic
    crops (last in the pool) weigh 1, not as one more domain that would outweigh every real one."""
    n_real = len(pool) - n_syn
    w = np.ones(len(pool), np.float32)
    w[:n_real] = domain_weights(pool.domains[:n_real])
    return torch.from_numpy(w)


def epoch_length(n: int, batch_size: int) -> int:
    """Crops an epoch trains on: all n, but for a last batch of one crop, which is dropped (BatchNorm
    cannot train on one value per channel, and a step on one crop is noise); that crop is in the next
    epoch's order. The scheduler counts the same steps."""
    return n - 1 if n > 1 and n % batch_size == 1 else n


def _train_epoch(model, opt, sched, precision: Precision, scaler: torch.amp.GradScaler, pool: CropPool,
                 spec: BackboneSpec, cfg: TrainConfig, device: torch.device, k: int, epoch: int,
                 weights: torch.Tensor | None) -> float:
    """One epoch; `weights`: per-crop loss weights of the pool (domain_focal), else None; `precision`:
    the fold's (chosen once in train_fold); `scaler`: fp16's loss scaling (a pass-through for fp32, bf16)."""
    train_mode(model, cfg.finetune_spec())
    aug = preset(cfg.augment)
    order = epoch_order(cfg.sampler, pool.labels, np.random.default_rng([cfg.seed, k, epoch]))
    order = order[:epoch_length(len(order), cfg.batch_size)]
    gen = torch.Generator().manual_seed(_derived_seed(cfg.seed, k, epoch, 1))
    cuda = device.type == "cuda"
    total = torch.zeros((), device=device)
    n_batches = math.ceil(len(order) / cfg.batch_size)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        if aug is None:
            return preprocess(images, spec.input_size, spec.mean, spec.std, device, spec.stain_norm)
        return augment_and_preprocess(images, spec.input_size, spec.mean, spec.std, device, gen, aug,
                                      stain_norm=spec.stain_norm)

    bar = tqdm(iterate_batches(pool, cfg.batch_size, order, prefetch=cfg.PREFETCH, pin=cuda), total=n_batches,
               desc=f"fold {k} epoch {epoch}/{cfg.epochs}", leave=False, mininterval=2.0)
    for images, labels, positions in bar:
        x = prepare(images)  # in the step's thread: a second thread would fight the model's threads on a CPU
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels.to(device, non_blocking=True)
        with precision.autocast():
            z = model(x).reshape(-1)
        w = weights[positions].to(device, non_blocking=True) if weights is not None else None
        loss = classification_loss(z.float(), y, cfg.loss, focal_gamma=cfg.focal_gamma, pos_weight=cfg.pos_weight,
                                   sample_weights=w)
        backward_step(loss, opt, scaler)
        sched.step()
        total += loss.detach() * len(y)
    return float(total.item()) / len(order)


def train_fold(cfg: TrainConfig, store: Store, k: int, synthetic: Store | None = None,
               workdir: str | Path = ".train_work",
               on_epoch: Callable[[int, EpochMetrics], None] | None = None) -> FoldResult:
    """Train fold k (resuming from `workdir` when it holds this training's state).

    `on_epoch(epoch, metrics)` runs after every epoch (1-based); whatever it raises (e.g.
    optuna.TrialPruned) propagates.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec, device = cfg.spec(), resolve_device(cfg.device)
    precision = cfg.precision_on(device)
    train_pool, val_pool, n_syn = fold_pools(cfg, store, k, synthetic)
    fingerprint = _fingerprint(cfg, store, k, synthetic, n_syn)
    state = _load_state(workdir / STATE, fingerprint)
    if state and state.get("finished"):
        return _result(k, state, workdir, train_pool, val_pool, n_syn)

    set_determinism()
    torch.manual_seed(_derived_seed(cfg.seed, k))
    ft = cfg.finetune_spec()
    # a resumed full fine-tuning gets every weight from the state; a frozen backbone is rebuilt from its weights
    whole_state = ft.mode == "full" or cfg.pretrained in ("", "none")
    model = apply_finetune(build_classifier(spec, "none" if state and whole_state else cfg.pretrained), ft).to(device)
    base = weights_identity(spec, cfg.pretrained) if ft.mode != "full" else None
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.NAdam([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate())
    weights = _domain_loss_weights(train_pool, n_syn) if cfg.loss == "domain_focal" else None
    steps = math.ceil(epoch_length(len(train_pool), cfg.batch_size) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=max(1, cfg.restart_epochs * steps))
    scaler = precision.scaler()
    history: list[dict[str, float]] = []
    best = {"auroc": -math.inf, "ba": math.nan, "epoch": 0}
    start = 1
    if state:
        if whole_state:
            model.load_state_dict(state["model"])
        else:
            load_trained_state(model, state["model"], str(workdir / STATE))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # empty for a disabled scaler
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        history, best, start = state["history"], state["best"], state["epoch"] + 1
        tqdm.write(f"fold {k}: resuming after epoch {state['epoch']} from {workdir / STATE}")

    val_y = val_pool.labels.astype(np.int64)
    forward = torch.compile(model) if cfg.compile else model  # shares the weights: save and resume use `model`
    for epoch in range(start, cfg.epochs + 1):
        lr = opt.param_groups[0]["lr"]
        t0 = time.perf_counter()
        train_loss = _train_epoch(forward, opt, sched, precision, scaler, train_pool, spec, cfg, device, k, epoch,
                                  weights)
        probs, val_loss = predict_pool(forward, spec, val_pool, device, cfg.EVAL_BATCH_SIZE, precision)
        m = binary_metrics(val_y, probs, 0.5)
        metrics = EpochMetrics(train_loss, val_loss, m["auroc"], m["ba"], lr)
        tqdm.write(f"fold {k} epoch {epoch}/{cfg.epochs}: train_loss {train_loss:.4f} val_loss {val_loss:.4f} "
                   f"val_auroc {m['auroc']:.4f} val_ba {m['ba']:.4f} ({time.perf_counter() - t0:.1f} s)")
        if m["auroc"] > best["auroc"]:
            best = {"auroc": m["auroc"], "ba": m["ba"], "epoch": epoch}
            save_checkpoint(model, spec, workdir / BEST, extra={
                "backbone_set": cfg.backbone_set, "backbone": cfg.backbone, "fold": k, "epoch": epoch, "seed": cfg.seed,
                "val_auroc": m["auroc"], "val_ba": m["ba"], "data_digest": store.digest}, finetune=ft, base=base)
            preds = val_pool.frame().assign(prob=probs.astype(np.float64))[["sample_id", "label", "prob", "domain"]]
            with atomic_file(workdir / BEST_PREDICTIONS) as tmp:
                preds.to_csv(tmp, index=False)
        history.append(dataclasses.asdict(metrics))
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        _save_atomic({"fingerprint": fingerprint, "epoch": epoch,
                      "model": model.state_dict() if whole_state else trained_state(model),
                      "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                      "torch_rng": torch.get_rng_state(), "history": history, "best": best,
                      "precision": precision.name}, workdir / STATE)

    if best["epoch"] == 0:
        raise RuntimeError(f"fold {k}: no epoch was trained (epochs={cfg.epochs})")
    # finished: keep the history and the best model, drop the large training state
    state = {"fingerprint": fingerprint, "epoch": cfg.epochs, "finished": True, "history": history, "best": best,
             "precision": precision.name}
    _save_atomic(state, workdir / STATE)
    return _result(k, state, workdir, train_pool, val_pool, n_syn)


def _result(k: int, state: dict, workdir: Path, train_pool: CropPool, val_pool: CropPool, n_syn: int) -> FoldResult:
    best = state["best"]
    return FoldResult(fold=k, best_val_auroc=float(best["auroc"]), best_val_ba=float(best["ba"]),
                      best_epoch=int(best["epoch"]),
                      val_predictions=pd.read_csv(workdir / BEST_PREDICTIONS, dtype={"sample_id": str}),
                      checkpoint=workdir / BEST, history=[EpochMetrics(**h) for h in state["history"]], n_train_real=len(train_pool) - n_syn,
                      n_train_synthetic=n_syn, n_val=len(val_pool), precision=state.get("precision", ""))
