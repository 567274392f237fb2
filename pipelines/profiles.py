"""Profiles: the defaults of every step, in one place.

`demo` runs the whole workflow on 2 CPU cores in minutes; `paper` holds the protocol of
"Is Synthetic Image Augmentation Useful for Imbalanced Classification Problems?" (Benito-Del-Valle
et al., MIDOG 2025) for a GPU. A profile may also be a YAML file of one's own: `base: demo` (or
`paper`) plus, per step, the values that differ (`train_cv: {epochs: 2}`). The keys of a step's
section are the fields of its config (`pipelines/config.py`); a parameter given by the user
(not None, not "") wins over the profile. See docs/DESIGN.md, "Step configs and profiles".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from analysis import keys
from data_tools.errors import ConfigError
from data_tools.inputs import PLATFORM_INPUT, PLATFORM_OUTPUT

# the paper's slide-grouped 5-fold CV; profiles/domain.yaml leaves one domain out instead
_SPLIT = {"split": "group", "split_by": "domain", "min_domain_size": 0}
_GENERATOR_COMMON = {"device": "auto", "work_dir": ".work/generator", "num_train_timesteps": 1000}
_PREDICT = {"model": f"models:/{keys.MODEL_NAME}@{keys.SUBMISSION_ALIAS}", "input": PLATFORM_INPUT,
            "output": PLATFORM_OUTPUT, "tta": "none", "batch_size": 64, "device": "auto", "threshold": None,
            "export": ""}
_REPORT = {"experiment": "", "test_set": "", "select_by": "test_auroc", "runs": "", "register": True,
           "model_name": keys.MODEL_NAME, "ensemble": "none"}
# the paper trains every weight with BCE on shuffled batches; LoRA's values are the AMi-Br benchmark's
_RECIPE = {"finetune": "full", "lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.3,
           "lora_targets": "qkv,proj,fc1,fc2", "loss": "bce", "focal_gamma": 2.0, "pos_weight": None,
           "sampler": "shuffle", "stain_norm": "none", "compile": False, "precision": "auto"}
_MAIN = {"data": "", "source": "", "root": "", "test_data": "", "pool": "", "stores": "stores",
         "backbones": "convnext,lunit", "regimes": ",".join(keys.REGIMES), "tune_first": False, "devices": "auto",
         "executor": "process", "wait": False}
# main -P executor=slurm: where the jobs go and what each asks for (pipelines/slurm.py); fill in partition/account
_SLURM = {"partition": "", "account": "", "extra": "", "setup": "", "folder": "logs/slurm"}

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "demo": {
        # the demo's generator pool and held-out test set; steps side by side (2 cores: one thread each).
        # Sized for `make demo` in 4 min 30 s on 2 cores: measured, 1,500 CV crops / a 1,000-crop pool / 6 + 4 DiT
        # epochs took 336 s (ConvNeXt CV AUROC 78.0, test 83.7; ViT 67.9, 72.3), these take 258 s (72.9, 80.6;
        # 66.6, 65.2)
        "main": {**_MAIN, "pool_size": 700, "test_size": 500, "jobs": "2"},
        "prepare_data": {"source": "demo", "root": "", "out": "", "size": 1000, "folds": 5, "seed": 0,
                         "on_error": "raise", "overwrite": False, **_SPLIT, "stores": "",
                         "on_conflict": "raise"},
        # generator: tiny VAE/DiT, few epochs, lr 1e-3 (the paper's 1e-4 is too slow for minutes on a CPU), the
        # VAE trained on 64 px crops and not fine-tuned, 50 synthetic atypical crops per fold (balancing would
        # take 840: minutes more on 2 cores). Pretraining must not see the CV pool: a separate demo pool.
        # A generator trained for seconds makes blurry crops that are a shortcut to the label: measured, 100 per
        # fold drop the demo ViT's CV AUROC from 0.68 to 0.52, 50 to 0.61, 25 to 0.65 (ConvNeXt: 0.78 -> 0.75).
        # Pretraining has no labels (the DiT learns the null class only): label_dropout 0.
        "generator_pretrain": {**_GENERATOR_COMMON, "data": "stores/demo_pool", "arch": "tiny", "vae_epochs": 1,
                               "dit_epochs": 5, "batch_size": 8, "lr": 2e-3, "seed": 0, "vae_crop": 64,
                               "kl_weight": 1e-4, "label_dropout": 0.0, "ema_decay": 0.999, "preview_every": 0},
        "generator_finetune": {**_GENERATOR_COMMON, "data": "stores/demo", "folds": "all", "arch": "tiny",
                               "vae_epochs": 0, "dit_epochs": 3, "batch_size": 16, "lr": 2e-3, "seed": 0,
                               "vae_crop": 64, "kl_weight": 1e-4, "label_dropout": 0.1, "ema_decay": 0.999,
                               "preview_every": 0},
        "synthesize": {"n_atypical": "50", "n_normal": 0, "sampler": "dpmsolver++", "steps": 10, "guidance": 2.0,
                       "seed": 0, "batch_size": 256, "out": "stores/synthetic", "quality_max": 32,
                       "features": "descriptor", "fid_weights": "", "device": "auto"},
        # the demo backbones: small members of both families at 48 px, from scratch (no hub weights exist for them)
        "train_cv": {"data": "stores/demo", "backbone": "convnext", "backbone_set": "demo", "regime": "real_only",
                     "synth_run_id": "", "n_synthetic": None, "folds": "all", "epochs": 4, "batch_size": 32,
                     "lr": None, "seed": 0, "restart_epochs": 5, "pretrained": "none", "device": "auto",
                     "workroot": ".train_cv_work", "fold_jobs": 1, "devices": "auto", "from_study": "", **_RECIPE,
                     # flips only: 4 epochs from a random init learn less under the paper's full augmentation
                     "augment": "flips"},
        # fold_ba, not the paper's 0.5: after 4 epochs from scratch the ViT's probabilities sit below 0.5 for every
        # crop (measured: test sensitivity 0 at 0.5). Nor cv_ba: the pooled out-of-fold threshold does not transfer
        # to the fold mean, each model's own calibrated one does (measured on 4000 held-out demo crops, test BA
        # cv_ba -> fold_ba: ConvNeXt 70.7 -> 72.7, ViT 60.8 -> 64.8, specificity 60 -> 71 and 36 -> 70)
        "evaluate": {"train_run_id": "", "test_data": "stores/demo_test", "threshold": "fold_ba",
                     "allow_overlap": False, "device": "auto", "n_boot": 500, "batch_size": 128, "tta": "none"},
        # tune's trials are train_cv configs: this section overrides train_cv's values (a cheap subset of folds
        # and epochs) and adds the search's own
        "tune": {"n_trials": 4, "n_workers": 1, "storage": "optuna/journal.log", "study_name": "", "space": "lr",
                 "lr_min": 1e-4, "lr_max": 3e-3, "folds": "1,2", "epochs": 2},
        "report": {**_REPORT, "n_boot": 1000, "ensemble_size": 5},
        "predict": _PREDICT,
        # the demo on a cluster's CPUs: every job small (the whole demo takes minutes on 2 cores)
        "slurm": {**_SLURM, "default": "gpus=0 cpus=2 mem_gb=4 hours=1", "prepare_data": "", "generator_pretrain": "",
                  "generator_finetune": "", "synthesize": "", "tune": "", "train_cv": "", "evaluate": "",
                  "report": ""},
    },
    "paper": {
        "main": {**_MAIN, "pool_size": 0, "test_size": 0, "jobs": "auto"},  # one step per GPU (one GPU: one at a time)
        "prepare_data": {"source": "midog25", "root": "", "out": "", "size": None, "folds": 5, "seed": 42,
                         "on_error": "skip", "overwrite": False, **_SPLIT, "stores": "",
                         "on_conflict": "raise"},
        # generator (paper, "Synthetic Image Generation"): VAE and DDPM each 1000 epochs, batch 32, AdamW 1e-4 on
        # the unlabelled WSI pool; per fold VAE 2000 / DiT 5000 epochs, batch 8; DDPM 1000 steps. Sizes, KL weight,
        # CFG dropout/scale are not in the paper: Stable-Diffusion-sized VAE + DiT-B/2, DiT's 0.1 and 1.5.
        "generator_pretrain": {**_GENERATOR_COMMON, "data": "stores/wsi_pool", "arch": "base", "vae_epochs": 1000,
                               "dit_epochs": 1000, "batch_size": 32, "lr": 1e-4, "seed": 42, "vae_crop": 0,
                               "kl_weight": 1e-4, "label_dropout": 0.0, "ema_decay": 0.9999, "preview_every": 50},
        "generator_finetune": {**_GENERATOR_COMMON, "data": "stores/midog25", "folds": "all", "arch": "base",
                               "vae_epochs": 2000, "dit_epochs": 5000, "batch_size": 8, "lr": 1e-4, "seed": 42,
                               "vae_crop": 0, "kl_weight": 1e-4, "label_dropout": 0.1, "ema_decay": 0.9999,
                               "preview_every": 250},
        "synthesize": {"n_atypical": "balance", "n_normal": 0, "sampler": "ddpm", "steps": 1000, "guidance": 1.5,
                       "seed": 42, "batch_size": 256, "out": "stores/synthetic", "quality_max": 2000,
                       "features": "descriptor", "fid_weights": "", "device": "auto"},
        # paper: NAdam, cosine annealing with warm restarts every 5 epochs, 25 epochs, batch 16, hub weights
        "train_cv": {"data": "stores/midog25", "backbone": "convnext", "backbone_set": "paper", "regime": "real_only",
                     "synth_run_id": "", "n_synthetic": None, "folds": "all", "epochs": 25, "batch_size": 16,
                     "lr": None, "seed": 42, "restart_epochs": 5, "pretrained": "hub", "device": "auto",
                     # five folds side by side: one fold of ConvNeXt-S at 128 px, batch 16, leaves a GPU mostly idle
                     "workroot": ".train_cv_work", "augment": "paper", "fold_jobs": 5, "devices": "auto",
                     "from_study": "", **_RECIPE},
        "evaluate": {"train_run_id": "", "test_data": "", "threshold": "0.5", "allow_overlap": False, "device": "auto",
                     "n_boot": 2000, "batch_size": 128, "tta": "none"},
        "tune": {"n_trials": 20, "n_workers": 1, "storage": "optuna/journal.log", "study_name": "", "space": "lr",
                 "lr_min": 1e-6, "lr_max": 1e-3, "folds": "all", "epochs": 10},
        "report": {**_REPORT, "n_boot": 2000, "ensemble_size": 10},
        "predict": _PREDICT,
        # Not measured: no GPU was at hand when these were set. Replace them with the `slurm:` lines that
        # scripts/bench_gpu.py prints on the cluster's GPU (its projections of the paper's workload, x 1.5).
        # A train_cv task is one fold (25 epochs of ConvNeXt-S or Lunit ViT-S on ~9,500 crops + synthetic ones).
        # The generator's schedule (thousands of epochs) may outlast a cluster's time limit: its steps resume
        # from their last epoch checkpoint, so `main` run again after a timeout goes on where the job stopped.
        "slurm": {**_SLURM, "default": "gpus=0 cpus=4 mem_gb=16 hours=1",
                  "prepare_data": "gpus=0 cpus=8 mem_gb=32 hours=4",
                  "generator_pretrain": "gpus=1 cpus=8 mem_gb=64 hours=72",
                  "generator_finetune": "gpus=1 cpus=8 mem_gb=64 hours=72",
                  "synthesize": "gpus=1 cpus=8 mem_gb=32 hours=12", "tune": "gpus=1 cpus=8 mem_gb=48 hours=24",
                  "train_cv": "gpus=1 cpus=8 mem_gb=48 hours=12", "evaluate": "gpus=1 cpus=8 mem_gb=32 hours=2",
                  "report": "gpus=0 cpus=4 mem_gb=16 hours=1"},
    },
}


def _load(profile: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """(built-in base name, step defaults) of a built-in profile or a profile file."""
    if profile in PROFILES:
        return profile, PROFILES[profile]
    path = Path(profile)
    if not path.is_file():
        raise ConfigError(f"unknown profile {profile!r}: neither one of {sorted(PROFILES)} nor a YAML file")
    spec = yaml.safe_load(path.read_text()) or {}
    base = spec.pop("base", "demo")
    if base not in PROFILES:
        raise ConfigError(f"{path}: base must be one of {sorted(PROFILES)}, got {base!r}")
    steps = {step: {**PROFILES[base].get(step, {}), **(spec.get(step) or {})} for step in {*PROFILES[base], *spec}}
    return base, steps


def defaults(profile: str, sections: tuple[str, ...]) -> dict[str, Any]:
    """The profile's values for a step: its sections merged, later ones winning."""
    steps = _load(profile)[1]
    return {k: v for section in sections for k, v in steps.get(section, {}).items()}
