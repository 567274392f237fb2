"""The report's word on the synthetic crops: each synthesize run that a row trained on, its KID and
FID of the atypical class, and what they were computed on, so that neither the descriptor's
nor torchvision's ImageNet Inception-v3 "FID" passes for the FID of published values
(models/generator_quality.py, FEATURE_SETS)."""
from __future__ import annotations

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from analysis import keys
from analysis.queries import TrainRow
from models.generator_quality import FEATURE_SETS

CAPTION = ("KID (x 1000) and FID of the synthetic atypical crops against their fold's real training crops, "
           "mean over folds, with the features each was computed on")
KID_COLUMN, FID_COLUMN = "KID x 1000 (atypical)", "FID (atypical)"


def quality_table(client: MlflowClient, rows: list[TrainRow]) -> tuple[pd.DataFrame, list[str]]:
    """One line per (synthesize run, feature set) the rows' synthetic stores were measured on, and
    what could not be read."""
    run_ids = list(dict.fromkeys(r.run.data.params.get(keys.P_SYNTH_RUN_ID) for r in rows))
    records, index, skipped = [], [], []
    for run_id in filter(None, run_ids):
        try:
            metrics = client.get_run(run_id).data.metrics
        except MlflowException as e:
            skipped.append(f"synthesize run {run_id}: {str(e).splitlines()[0]}")
            continue
        for features, words in FEATURE_SETS.items():
            kid = metrics.get(keys.quality_metric(keys.KID, "atypical", features=features))
            fid = metrics.get(keys.quality_metric(keys.FID, "atypical", features=features))
            if kid is None and fid is None:
                continue
            index.append(f"synthesize run {run_id[:8]}")
            records.append({"features": words, KID_COLUMN: None if kid is None else 1000 * kid, FID_COLUMN: fid,
                            "synth_run_id": run_id})
    frame = pd.DataFrame(records, columns=["features", KID_COLUMN, FID_COLUMN, "synth_run_id"],
                         index=pd.Index(index, name="Synthetic crops"))
    return frame, skipped
