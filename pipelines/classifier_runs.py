"""What train_cv and tune share: the parameters a classifier run logs (a train_cv parent and
a tune trial log the same, so a trial can be read like a row), here so that neither step
module imports the other's helpers."""
from __future__ import annotations

from analysis import keys
from data_tools.folds import fold_domains
from data_tools.store import Store
from models.training import TrainConfig
from pipelines.config import as_params


def split_params(store: Store) -> dict[str, str]:
    """How the store's folds were made; for leave-one-domain-out, the domain each fold holds out."""
    split = store.manifest.get("split") or {}
    domains = fold_domains(split)
    if not domains:
        return {keys.P_SPLIT: "group"}
    return {keys.P_SPLIT: keys.LODO, keys.P_SPLIT_BY: str(split.get("split_by", "")),
            **{keys.fold_domain_param(k): name for k, name in domains.items()}}


def parent_params(cfg: TrainConfig, store: Store) -> dict[str, str]:
    """The identity fields, with what they resolved to (lr, architecture, input size, data digest,
    the split). Tune's trial runs log the same."""
    spec = cfg.spec()
    n_params, n_trainable = cfg.parameter_counts()
    return {**as_params(cfg, identity_only=True), keys.P_LR: str(cfg.learning_rate()),
            keys.P_TIMM_NAME: spec.timm_name, keys.P_INPUT_SIZE: str(spec.input_size),
            keys.P_N_PARAMS: str(n_params), keys.P_N_TRAINABLE_PARAMS: str(n_trainable),
            keys.P_DATA_DIGEST: store.digest, **split_params(store)}
