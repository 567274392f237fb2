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
SLURM = "slurm"  # not a step: the profile section of the cluster resources (pipelines/slurm.py)

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
DEVICE = "device"  # tag on a fold run: the device it trained on, "gpu <physical id>" or "cpu"
P_N_TRAIN_REAL = "n_train_real"  # fold run params: the crops of its training and validation split
P_N_TRAIN_SYNTHETIC = "n_train_synthetic"
P_N_VAL = "n_val"
P_PRECISION = "precision"  # train_cv: as asked on the parent (auto | fp32 | fp16 | bf16), as computed on a fold run

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


def member_model(r: int, k: int) -> str:
    """The registered model's name of fold k's checkpoint of an ensemble's r-th row (report
    `ensemble=greedy`; its artifact, and its key in the model_config's fold thresholds and
    `member_weights`), e.g. "row2_fold3"."""
    return f"row{r}_{fold_model(k)}"


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
CHECKPOINT_DIR = "checkpoint"  # artifact folder of a fold run of older code: model.safetensors + config.json
VAL_PREDICTIONS = "val_predictions.csv"  # columns sample_id, label, prob
PREDICTIONS = "predictions.csv"
# a fold run's best checkpoint is an MLflow LoggedModel (name fold_model(k)): the checkpoint folder's files as
# its artifacts, the run's output at the best epoch, best_val_* logged against it and the validation split
FOLD_MODEL_TYPE = "fold_checkpoint"  # the LoggedModel's model_type
VALIDATION = "validation"  # dataset-input context of a fold run's validation split


def validation_dataset(store_name: str, k: int) -> str:
    """The MLflow dataset name of fold k's validation split, e.g. "demo600 fold 2 validation"."""
    return f"{store_name} fold {k} {VALIDATION}"


# prepare_data run
N_IMAGES = "n_images"  # metric; plus n_<class> per class (n_atypical, n_normal, n_unlabelled)
N_SKIPPED = "n_skipped"
SKIPPED_CSV = "skipped.csv"  # artifact: item, reason (on_error=skip)
GRIDS_DIR = "grids"  # artifact folder (and <store>/grids): class_<label>.png, domain_<name>.png
MANIFEST_JSON = "manifest.json"
# prepare_data source=stores (data_tools.merge)
DUPLICATES_CSV = "duplicates.csv"  # artifact: id_a, id_b, store_a, store_b, kind, distance, labels, conflict, kept
N_DUPLICATES = "n_duplicates"  # metric: copies dropped as duplicates of a kept crop
N_LABEL_CONFLICTS = "n_label_conflicts"  # metric: copies dropped for disagreeing labels (on_conflict=drop)


def parent_context(i: int) -> str:
    """The dataset-input context (and `<context>_digest` tag) of a merged store's i-th parent: "parent1"."""
    return f"parent{i}"

# evaluate run
P_TRAIN_RUN_ID = "train_run_id"
P_TEST_DIGEST = "test_digest"
P_THRESHOLD = "threshold"
P_TTA = "tta"  # none | flips | d4
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
# synthesize quality, per fold and class: quality_metric(KID, "atypical", 2) etc., and their means over folds.
# The features they are computed on (models.generator_quality.FEATURE_SETS) are in the name, but for the default
# descriptor's: kid_atypical; fid_imagenet_inception_atypical (torchvision's ImageNet Inception-v3: not the FID
# of published values); fid_fid_inception_atypical (the standard FID Inception weights, synthesize's fid_weights)
KID = "kid"
KID_STD = "kid_std"
FID = "fid"
DESCRIPTOR_FEATURES, IMAGENET_INCEPTION, FID_INCEPTION = "descriptor", "imagenet_inception", "fid_inception"
QUALITY_FEATURES = "quality_features"  # tag on a synthesize run: the feature sets its KID/FID used, in words
P_FID_WEIGHTS_SHA256 = "fid_weights_sha256"  # synthesize: the FID Inception weights file's SHA-256
NEAR_COPY_SHARE = "near_copy_share"
NN_DIST_RATIO = "nn_dist_ratio"
IMAGES_PER_SECOND = "images_per_second"


def quality_metric(name: str, cls: str | None = None, k: int | None = None,
                   features: str = DESCRIPTOR_FEATURES) -> str:
    """quality_metric("kid", "atypical", 2) -> "fold2_kid_atypical"; without k: the mean over folds;
    quality_metric("fid", "atypical", features=FID_INCEPTION) -> "fid_fid_inception_atypical"."""
    key = name if features == DESCRIPTOR_FEATURES else f"{name}_{features}"
    key = key if cls is None else f"{key}_{cls}"
    return key if k is None else fold_metric(k, key)

# tune: the study run and its nested trial runs
STUDY_TAG = "optuna_study"  # tag on the study run: "<study_name>@<storage>"
TRIAL = "trial"  # tag on a trial run: the Optuna trial number
TRIAL_RUN_ID = "mlflow_run_id"  # the trial's user attribute naming its MLflow run
TRIAL_STATE = "trial_state"  # tag: COMPLETE | PRUNED
OBJECTIVE = "objective"  # trial metric: mean best validation AUROC over the folds
BEST_VALUE, BEST_LR, BEST_TRIAL, BEST_PARAMS = "best_value", "best_lr", "best_trial", "best_params"
N_TRIALS_DONE = "n_trials_done"
IMPORTANCE_PREFIX = "importance_"  # study run metrics: Optuna's importance of each searched field
# train_cv -P from_study: the parent's tags name the study run, its study and the trial whose values it took
FROM_STUDY_RUN, FROM_STUDY, FROM_TRIAL = "from_study_run", "from_study", "from_trial"
# every run (and trial) records where it runs, so a run left RUNNING by a process that is gone can be ended
HOST, PID, PROCESS_START = "host", "pid", "process_start"

# main: the workflow run
P_JOBS = "jobs"
P_EXECUTOR = "executor"
JOB_ID = "job_id"  # tag on a submitted step run: its scheduler job (Slurm id, or a local process id)
SUBMITTED_JOBS = "submitted_jobs"  # tag on a submitting workflow run: "<label>=<job id>; ..."
SECONDS_TOTAL = "seconds_total"


def seconds_metric(step: str) -> str:
    """Wall time the workflow spent in a step, e.g. "seconds_train_cv"."""
    return f"seconds_{step}"


# registered submission model
MODEL_NAME = "atypical-mitosis-classifier"
SUBMISSION_ALIAS = "submission"
SUBMISSION_ARTIFACT = "submission_model"  # the pyfunc model's artifact path in the report run
# tags of a registered version (beside its model_config's keys: threshold, train_run_id, backbone, ...); its
# description says the same in sentences. SELECTION: what makes two versions the same model (members, threshold
# rule, TTA), JSON; report registers a new version only when it differs from the alias's version
V_SELECTION = "selection"
V_MEMBERS = "members"  # JSON {fold_model(k): LoggedModel id (or, from older code, the fold run id)}
V_MEMBER_RUNS = "member_runs"  # JSON {fold_model(k): fold run id}
V_ROW, V_ROWS_COMPARED = "row", "rows_compared"  # the chosen row's label; how many rows had the criterion
V_SELECTED_VALUE = "selected_value"
V_THRESHOLD_RULE = "threshold_rule"  # the evaluate run's threshold param (0.5, a number, cv_ba, fold_ba)
V_EVALUATE_RUN = "evaluate_run_id"
V_ENSEMBLE_ROWS = "ensemble_rows"  # JSON [{row, train_run_id, weight}] of an ensemble of rows, in pick order
V_SYNTHETIC_DIGESTS = "synthetic_digests"  # JSON {fold_model(k): digest} of a synth_balanced row's stores
SYNTHETIC_DIGEST = "synthetic_digest"  # fold run tag: its synthetic store (pipelines.common.log_store)

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
# report ensemble=greedy: its pick order, weights, and it against the best single row (+ .json)
ENSEMBLE_PICKS, ENSEMBLE_WEIGHTS, ENSEMBLE_COMPARISON = "ensemble_picks", "ensemble_weights", "ensemble_comparison"
QUALITY_TABLE = "synthetic_quality"  # report: the rows' synthetic crops' KID/FID and their features (.md, .csv, .tex)
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
