"""generator_finetune: one class-conditional generator per CV fold, each started from the
pretraining run's weights and fine-tuned (VAE, then DiT with labels) on fold k's training
ids only (the store's `fold` column), as in the paper.

Parent run: the store, the pretraining run. One nested run per fold (tag `fold`) with the
epoch losses, previews, the generator (`vae/`, `dit/`), `train_ids.txt` and param
`train_ids_digest`: the digest of exactly the ids it trained on, which synthesize writes
into each synthetic store and train_cv checks. Refuses a pretraining run that saw any crop
of this store's CV pool (every such crop is some fold's validation crop).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np

from analysis import keys
from data_tools.provenance import LeakageError, fold_train_ids, ids_digest
from data_tools.store import Store, open_store
from models.generator import Generator, encode_moments
from models.generator_training import FitConfig, fit_generator
from models.checkpoint import resolve_device
from pipelines.common import log_params, log_store, step_parser, step_run
from pipelines.generator_pretrain import FIT_PARAMS, add_fit_arguments, epoch_logger, log_generator
from pipelines.profiles import resolve

FINETUNE_PARAMS = tuple(p for p in FIT_PARAMS if p != "arch") + ("label_dropout",)


def parse_folds(spec: str, available: list[int]) -> list[int]:
    """"all" or a comma list such as "1,3"."""
    if str(spec).strip() in ("", "all"):
        return available
    folds = [int(f) for f in str(spec).split(",") if f.strip()]
    missing = sorted(set(folds) - set(available))
    if missing:
        raise ValueError(f"folds {missing} are not in the store (it has {available})")
    return folds


def download_generator(run_id: str, dst: str | Path, parts: tuple[str, ...] = (keys.VAE_DIR, keys.DIT_DIR, keys.TRAIN_IDS)
                       ) -> Path:
    """A run's `vae/`, `dit/` and `train_ids.txt` artifacts (or the `parts` asked for) into dst."""
    for part in parts:
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=part, dst_path=str(dst))
    return Path(dst)


def check_pretraining(pretrain_ids: Path, store: Store) -> None:
    """Fold isolation starts at pretraining: no CV-pool crop may be among its crops."""
    seen = set(pretrain_ids.read_text().split())
    pool = store.index.loc[store.index["fold"] > 0, "sample_id"].astype(str)
    shared = pool[pool.isin(seen)]
    if len(shared):
        raise LeakageError(f"the pretraining run saw {len(shared)} crops of {store.path}'s CV pool (e.g. "
                           f"{shared.iloc[:3].tolist()}): every one is a validation crop of some fold. Pretrain on a "
                           f"pool without them (the paper: unlabelled WSI crops; demo: prepare_data --source demo "
                           f"--seed <other> --folds 0)")


def main(argv: list[str] | None = None) -> str:
    p = step_parser(keys.GENERATOR_FINETUNE, __doc__)
    p.add_argument("--data", default="", help="the labelled store with CV folds")
    p.add_argument("--pretrain_run_id", default="", help="generator_pretrain run to start from")
    p.add_argument("--folds", default="", help="all, or a comma list")
    p.add_argument("--label_dropout", default="", help="classifier-free guidance: P(label -> null), per sample")
    add_fit_arguments(p)
    args = p.parse_args(argv)
    cfg = resolve(keys.GENERATOR_FINETUNE, args.profile, vars(args))
    if not cfg.get("pretrain_run_id"):
        raise SystemExit("generator_finetune needs --pretrain_run_id (a finished generator_pretrain run)")
    store = open_store(cfg["data"])
    folds = parse_folds(cfg["folds"], store.folds)
    device = resolve_device(cfg["device"])
    labels = store.index["label"].to_numpy()
    workdirs = []
    with step_run(keys.GENERATOR_FINETUNE, args.profile, run_name=f"finetune {store.name}") as parent, \
            tempfile.TemporaryDirectory() as tmp:
        log_params({keys.P_DATA: cfg["data"], keys.P_DATA_PATH: str(store.path.resolve()),
                    keys.P_PRETRAIN_RUN_ID: cfg["pretrain_run_id"], keys.P_FOLDS: ",".join(map(str, folds)),
                    **{k: cfg[k] for k in FINETUNE_PARAMS}})
        log_store(store, "training")
        pretrained_dir = download_generator(cfg["pretrain_run_id"], tmp)
        check_pretraining(pretrained_dir / keys.TRAIN_IDS, store)
        pretrained = Generator.load(pretrained_dir, device)
        fit = FitConfig.from_params({**cfg, "arch": pretrained.meta.get("arch", "tiny")})
        if fit.vae_epochs == 0:  # every fold keeps the pretrained VAE: encode the CV pool once, not per fold
            cv_rows = np.flatnonzero(store.index["fold"].to_numpy() > 0)
            position = np.full(len(store), -1)
            position[cv_rows] = np.arange(len(cv_rows))
            mean, std = encode_moments(pretrained.vae, store.images[cv_rows], device=device)
        for k in folds:
            rows = store.fold_rows(k)[0]
            moments = (mean[position[rows]], std[position[rows]]) if fit.vae_epochs == 0 else None
            ids = fold_train_ids(store, k)
            digest = ids_digest(ids)
            workdir = Path(cfg["work_dir"]) / ("finetune-" + fit.fingerprint(
                data=store.digest, fold=k, train_ids=digest, init=cfg["pretrain_run_id"]))
            workdirs.append(workdir)
            with step_run(keys.GENERATOR_FINETUNE, args.profile, run_name=f"fold {k}", tags={keys.FOLD: str(k)},
                          nested=True):
                log_params({keys.FOLD: k, keys.P_TRAIN_IDS_DIGEST: digest, keys.P_N_TRAIN: len(ids),
                            keys.P_PRETRAIN_RUN_ID: cfg["pretrain_run_id"], **{n: cfg[n] for n in FINETUNE_PARAMS}})
                gen = fit_generator(store.images[rows], labels[rows], fit, workdir, device=device, init=pretrained,
                                    on_epoch=epoch_logger(), moments=moments)
                gen.meta.update(trained_on=store.name, data_digest=store.digest, fold=k,
                                pretrain_run_id=cfg["pretrain_run_id"], train_ids_digest=digest)
                log_generator(gen, ids)
            print(f"fold {k}: fine-tuned on {len(ids)} crops")
    for w in workdirs:
        shutil.rmtree(w, ignore_errors=True)
    print(f"fine-tuned generators: run {parent.info.run_id} (folds {folds})")
    return parent.info.run_id


if __name__ == "__main__":
    main()
