"""Every MLflow key name in one place, so that the steps that write runs and the
analysis that reads them cannot drift apart (docs/DESIGN.md, "MLflow runs").

Params are the fields of the step configs (pipelines/config.py): the `P_*` names here are the
ones other steps read back, and a test checks that each is a field (or a derived param) of
the step that logs it."""
import re
from typing import Mapping, TypeVar

_V = TypeVar("_V")

# tags on every run
STEP = "step"
PROFILE = "profile"
DATASET_DIGEST = "dataset_digest"
CODE_VERSION = "code_version"
# tags that let the UI group and compare classifier runs
BACKBONE = "backbone"
REGIME = "regime"
FOLD = "fold"  # tag on a nested fold run, value "1".."K"
DEFAULT_EXPERIMENT = "atypical-mitosis"  # where a step started from the command line logs, unless told otherwise
WORKFLOW_RUN = "workflow_run_id"
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own tag of a nested run (mlflow.utils.mlflow_tags)
DESCRIPTION = "mlflow.note.content"  # MLflow's own tag: the run's description in the UI
EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow's experiment tag: the UI opens the "Model training" view
MODEL_TRAINING_KIND = "custom_model_development"

# regimes
REAL_ONLY = "real_only"
SYNTH_BALANCED = "synth_balanced"
REGIMES = (REAL_ONLY, SYNTH_BALANCED)

# step names (= MLproject entry points)
PREPARE_DATA = "prepare_data"
GENERATOR_PRETRAIN = "generator_pretrain"
GENERATOR_FINETUNE = "generator_finetune"
SYNTHESIZE = "synthesize"
TRAIN_CV = "train_cv"
EVALUATE = "evaluate"
REPORT = "report"
TUNE = "tune"
PREDICT = "predict"
MAIN = "main"

# train_cv parent params
P_BACKBONE = "backbone"
P_BACKBONE_SET = "backbone_set"  # paper | demo: what the backbone names resolved to
P_REGIME = "regime"
P_FOLDS = "folds"
P_EPOCHS = "epochs"
P_BATCH_SIZE = "batch_size"
P_LR = "lr"
P_SEED = "seed"
P_SYNTH_RUN_ID = "synth_run_id"
P_DATA_DIGEST = "data_digest"
P_PRETRAINED = "pretrained"
P_N_SYNTHETIC = "n_synthetic"  # synthetic atypical crops per fold, or "balance"
P_TIMM_NAME = "timm_name"  # the architecture the backbone name resolved to in the profile
P_INPUT_SIZE = "input_size"
P_N_PARAMS = "n_params"  # train_cv parent: parameters of a fold model, and those that train (LoRA: a few)
P_N_TRAINABLE_PARAMS = "n_trainable_params"
P_FINETUNE = "finetune"  # full | lora | linear
P_LORA_RANK = "lora_rank"
P_LOSS = "loss"
P_STAIN_NORM = "stain_norm"
P_AUGMENT = "augment"  # paper | flips | strong | none
P_SPLIT = "split"  # how the store's folds were made: group (slide-grouped CV) | lodo (leave one domain out)
P_SPLIT_BY = "split_by"  # lodo: the column whose values are the folds
LODO = "lodo"
TRAIN_CV_KEY = "train_cv_key"  # tag: hash of params + data digest + code; fold jobs join the parent with it
FOLDS_DONE = "folds_done"  # tag on the parent: "1,2,..." the folds with a finished fold run
DATA_PATH = "data_path"  # tag on the parent: where the training store was (evaluate's overlap check opens it)
DEVICE = "device"  # tag on a fold run: the device it trained on
P_N_TRAIN_REAL = "n_train_real"  # fold run params: the crops of its training and validation split
P_N_TRAIN_SYNTHETIC = "n_train_synthetic"
P_N_VAL = "n_val"

# train_cv parent metrics
CV_AUROC_MEAN = "cv_auroc_mean"
CV_AUROC_STD = "cv_auroc_std"
CV_BA_MEAN = "cv_ba_mean"
CV_BA_STD = "cv_ba_std"
CV_SUMMARY = (CV_AUROC_MEAN, CV_AUROC_STD, CV_BA_MEAN, CV_BA_STD)  # also copied onto evaluate runs (UI comparison)


FOLD_DOMAIN = "domain"  # lodo: fold_domain_param(k), a train_cv parent param


def fold_domain_param(k: int) -> str:
    """lodo: the domain (or merged domains) fold k holds out, e.g. "fold2_domain"."""
    return fold_metric(k, FOLD_DOMAIN)


def fold_metric(k: int, name: str) -> str:
    """Per-fold summary on the parent run, e.g. fold_metric(3, "auroc") -> "fold3_auroc"."""
    return f"fold{k}_{name}"


def fold_model(k: int) -> str:
    """The registered model's name of fold k's checkpoint (its artifact, and its key in the
    model_config's fold thresholds), e.g. "fold3"."""
    return f"fold{k}"


_FOLD_KEY = re.compile(r"fold(\d+)(?:_(.+))?")


def fold_values(mapping: Mapping[str, _V], name: str | None) -> dict[int, _V]:
    """{k: value} of the fold{k}_<name> entries of a run's metrics or params, sorted by k
    (name None: the fold{k} entries of the registered model's artifacts or fold thresholds)."""
    found = {int(m[1]): v for key, v in mapping.items() if (m := _FOLD_KEY.fullmatch(key)) and m[2] == name}
    return dict(sorted(found.items()))


# fold (child) run metrics, per epoch
TRAIN_LOSS = "train_loss"
VAL_LOSS = "val_loss"
VAL_AUROC = "val_auroc"
VAL_BA = "val_ba"
LR = "lr"
BEST_VAL_AUROC = "best_val_auroc"
BEST_EPOCH = "best_epoch"
BEST_VAL_BA = "best_val_ba"  # BA (threshold 0.5) at the epoch of the best validation AUROC


def epoch_metrics(m) -> dict[str, float]:
    """One epoch's metrics (a models.training.EpochMetrics) under their key names."""
    return {TRAIN_LOSS: m.train_loss, VAL_LOSS: m.val_loss, VAL_AUROC: m.val_auroc, VAL_BA: m.val_ba, LR: m.lr}

# artifacts
CHECKPOINT_DIR = "checkpoint"  # artifact folder of a fold run: model.safetensors + config.json
VAL_PREDICTIONS = "val_predictions.csv"  # columns sample_id, label, prob
PREDICTIONS = "predictions.csv"

# prepare_data run
N_IMAGES = "n_images"  # metric; plus n_<class> per class (n_atypical, n_normal, n_unlabelled)
N_SKIPPED = "n_skipped"
SKIPPED_CSV = "skipped.csv"  # artifact: item, reason (on_error=skip)
GRIDS_DIR = "grids"  # artifact folder (and <store>/grids): class_<label>.png, domain_<name>.png
MANIFEST_JSON = "manifest.json"

# evaluate run
P_TRAIN_RUN_ID = "train_run_id"
P_TEST_DIGEST = "test_digest"
P_THRESHOLD = "threshold"
N_FOLDS = "n_folds"  # evaluate metric: fold models in the ensemble
FIG_ROC, FIG_CONFUSION, OVERLAP_CSV = "roc.png", "confusion.png", "overlap.csv"
TEST_PREFIX = "test_"
TEST_METRICS = ("auroc", "accuracy", "sensitivity", "specificity", "ba")
TEST_SET = "test_set"  # tag: the name of the test store (its manifest name)
N_OVERLAP = "n_overlap"  # evaluate metric: test images also found in the training store


def test_metric(name: str, domain: str | None = None) -> str:
    """test_metric("auroc") -> "test_auroc"; per domain: "test_auroc__<domain>"."""
    key = f"{TEST_PREFIX}{name}"
    if domain is not None:
        key += "__" + "".join(c if c.isalnum() or c in "-_." else "_" for c in domain)
    return key


def test_ci_metric(name: str, bound: str, domain: str | None = None) -> str:
    """Bootstrap 95% interval bound ("lo" | "hi"): test_ci_metric("auroc", "lo") -> "test_auroc_ci95_lo";
    per domain "test_auroc_ci95_lo__<domain>" (the domain suffix as in test_metric)."""
    base = test_metric(name, domain)
    head, sep, tail = base.partition("__")
    return f"{head}_ci95_{bound}{sep}{tail}"


# generator / synthesize runs
P_PRETRAIN_RUN_ID = "pretrain_run_id"
P_FINETUNE_RUN_ID = "finetune_run_id"
P_DATA = "data"  # the store a step read, as given
P_DATA_PATH = "data_path"  # ... and its absolute path
P_ARCH = "arch"  # generator size, models.generator.ARCHS
P_VAE_EPOCHS = "vae_epochs"
P_DIT_EPOCHS = "dit_epochs"
P_LABEL_DROPOUT = "label_dropout"
P_TRAIN_IDS_DIGEST = "train_ids_digest"  # finetune fold run: ids_digest of exactly the ids it trained on
P_N_TRAIN = "n_train"
P_SAMPLER = "sampler"
P_STEPS = "steps"
P_GUIDANCE = "guidance"
P_N_ATYPICAL = "n_atypical"  # synthesize: per fold ("balance" = the training split's normal - atypical)
P_N_NORMAL = "n_normal"
P_OUT = "out"
VAE_DIR = "vae"  # generator run artifacts: diffusers folders (config.json + safetensors)
DIT_DIR = "dit"  # + scheduler_config.json (the DDPM) + generator.json
TRAIN_IDS = "train_ids.txt"  # generator run artifact: the sample ids it trained on, one a line
PREVIEWS_DIR = "previews"  # reconstructions / samples every few epochs
# generator epoch metrics (written by models.generator_training as f"{stage}_{name}")
VAE_LOSS = "vae_loss"
VAE_REC = "vae_rec"
VAE_KL = "vae_kl"
DIT_LOSS = "dit_loss"
LATENT_SHIFT = "latent_shift"
LATENT_SCALE = "latent_scale"
# synthesize quality, per fold and class: fold_metric(k, f"{KID}_{class}") etc., and their means over folds
KID = "kid"
KID_STD = "kid_std"
FID = "fid"
NEAR_COPY_SHARE = "near_copy_share"
NN_DIST_RATIO = "nn_dist_ratio"
IMAGES_PER_SECOND = "images_per_second"


def quality_metric(name: str, cls: str | None = None, k: int | None = None) -> str:
    """quality_metric("kid", "atypical", 2) -> "fold2_kid_atypical"; without k: the mean over folds."""
    key = name if cls is None else f"{name}_{cls}"
    return key if k is None else fold_metric(k, key)

# tune: the study run and its nested trial runs
STUDY_TAG = "optuna_study"  # tag on the study run: "<study_name>@<storage>"
TRIAL = "trial"  # tag on a trial run: the Optuna trial number
TRIAL_STATE = "trial_state"  # tag: COMPLETE | PRUNED
OBJECTIVE = "objective"  # trial metric: mean best validation AUROC over the folds
BEST_VALUE, BEST_LR, BEST_TRIAL, BEST_PARAMS = "best_value", "best_lr", "best_trial", "best_params"
N_TRIALS_DONE = "n_trials_done"

# main: the workflow run
P_JOBS = "jobs"
SECONDS_TOTAL = "seconds_total"


def seconds_metric(step: str) -> str:
    """Wall time the workflow spent in a step, e.g. "seconds_train_cv"."""
    return f"seconds_{step}"


# registered submission model
MODEL_NAME = "atypical-mitosis-classifier"
SUBMISSION_ALIAS = "submission"
SUBMISSION_ARTIFACT = "submission_model"  # the pyfunc model's artifact path in the report run

# report run
P_EXPERIMENT = "experiment"
P_SELECT_BY = "select_by"
SELECTED_TRAIN_RUN = "selected_train_run_id"  # tag
SELECTED_ROW = "selected_row"  # tag, e.g. "ConvNeXt-Small (real)"
SELECTED_VALUE = "selected_value"  # metric: the criterion's value of the chosen row
REPORT_MD = "report.md"
STUDY_FIGURES_DIR = "optuna"  # tune: Optuna's figures of the study (history, slice per parameter)
TABLES_DIR = "tables"  # the report's tables as MLflow tables (mlflow.log_table): tables/<stem>.json
TABLE1, TABLE2, COMPARISON = "table1", "table2", "comparison"  # artifact stems: .md, .csv, .tex (+ comparison.json)
TABLE1_DOMAINS = "table1_domains"  # leave-one-domain-out rows: table1_domains_auroc.*, table1_domains_ba.*
FIG_FOLD_AUROC, FIG_TEST_ROC, FIG_CALIBRATION = "fold_auroc.png", "test_roc.png", "calibration.png"
FIG_DOMAIN_GAP = "domain_gap.png"  # slide-grouped CV vs leave one domain out, per row

# predict run (only under `mlflow run`)
N_CROPS = "n_crops"
N_ATYPICAL = "n_atypical"
PREDICT_SECONDS = "seconds"


def synth_store_param(k: int) -> str:
    """synthesize run param holding fold k's synthetic store path, e.g. "store_fold2"."""
    return f"store_fold{k}"


def synth_store_folds(params: Mapping[str, str]) -> list[int]:
    """The folds a synthesize run made a store for (its store_fold<k> params)."""
    return sorted(int(m[1]) for key in params if (m := re.fullmatch(r"store_fold(\d+)", key)))


def synth_digest_param(k: int) -> str:
    return f"digest_fold{k}"

# evaluate with threshold=fold_ba: fold model k's own BA-optimal threshold, metric "fold<k>_threshold"
FOLD_THRESHOLD = "threshold"  # fold_metric(k, FOLD_THRESHOLD)
