"""Every MLflow key name in one place, so that the steps that write runs and the
analysis that reads them cannot drift apart (DESIGN.md, "MLflow runs")."""

# tags on every run
STEP = "step"
PROFILE = "profile"
DATASET_DIGEST = "dataset_digest"
CODE_VERSION = "code_version"
# tags that let the UI group and compare classifier runs
BACKBONE = "backbone"
REGIME = "regime"
FOLD = "fold"  # tag on a nested fold run, value "1".."K"
WORKFLOW_RUN = "workflow_run_id"

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
P_REGIME = "regime"
P_FOLDS = "folds"
P_EPOCHS = "epochs"
P_BATCH_SIZE = "batch_size"
P_LR = "lr"
P_SEED = "seed"
P_SYNTH_RUN_ID = "synth_run_id"
P_DATA_DIGEST = "data_digest"
P_PRETRAINED = "pretrained"

# train_cv parent metrics
CV_AUROC_MEAN = "cv_auroc_mean"
CV_AUROC_STD = "cv_auroc_std"
CV_BA_MEAN = "cv_ba_mean"
CV_BA_STD = "cv_ba_std"


def fold_metric(k: int, name: str) -> str:
    """Per-fold summary on the parent run, e.g. fold_metric(3, "auroc") -> "fold3_auroc"."""
    return f"fold{k}_{name}"


# fold (child) run metrics, per epoch
TRAIN_LOSS = "train_loss"
VAL_LOSS = "val_loss"
VAL_AUROC = "val_auroc"
VAL_BA = "val_ba"
LR = "lr"
BEST_VAL_AUROC = "best_val_auroc"
BEST_EPOCH = "best_epoch"

# artifacts
CHECKPOINT_DIR = "checkpoint"  # artifact folder of a fold run: model.safetensors + config.json
VAL_PREDICTIONS = "val_predictions.csv"  # columns sample_id, label, prob
PREDICTIONS = "predictions.csv"

# evaluate run
P_TRAIN_RUN_ID = "train_run_id"
P_TEST_DIGEST = "test_digest"
P_THRESHOLD = "threshold"
TEST_PREFIX = "test_"
TEST_METRICS = ("auroc", "accuracy", "sensitivity", "specificity", "ba")
TEST_SET = "test_set"  # tag: the name of the test store (its manifest name)


def test_metric(name: str, domain: str | None = None) -> str:
    """test_metric("auroc") -> "test_auroc"; per domain: "test_auroc__<domain>"."""
    key = f"{TEST_PREFIX}{name}"
    if domain is not None:
        key += "__" + "".join(c if c.isalnum() or c in "-_." else "_" for c in domain)
    return key


# generator / synthesize runs
P_GENERATOR_RUN_ID = "generator_run_id"
P_PRETRAIN_RUN_ID = "pretrain_run_id"
P_FINETUNE_RUN_ID = "finetune_run_id"

# registered submission model
MODEL_NAME = "atypical-mitosis-classifier"
SUBMISSION_ALIAS = "submission"


def synth_store_param(k: int) -> str:
    """synthesize run param holding fold k's synthetic store path, e.g. "store_fold2"."""
    return f"store_fold{k}"


def synth_digest_param(k: int) -> str:
    return f"digest_fold{k}"
