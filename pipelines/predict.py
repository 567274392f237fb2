"""predict: run the submission ensemble on platform stacks, a folder of crops, or a store.

The container's command and a plain CLI (`python -m pipelines.predict --model ... --input
... --output ...`). Output: `*.csv` -> id, probability, class; `*.json` -> the platform JSON,
a list with one {"class", "confidence"} per page in page order (any other name is refused
before any work). Several stacks in the
input folder (the platform mounts one per job) are concatenated in natural file-name
order. Any bad input fails the whole call, naming the file, and writes no output: the
platform scores a job all-or-nothing. Logs an MLflow run only under `mlflow run`.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow

from analysis import keys
from analysis.serving import check_output, export_model, load_predictor, write_predictions
from data_tools.inputs import load_inputs
from data_tools.params import param
from models.tta import TTA_MODES
from pipelines.common import cli_step, log_params, step_run
from pipelines.config import StepConfig, as_params, from_cli

@dataclass
class PredictConfig(StepConfig):
    model: str = param("model URI (models:/name@alias, runs:/...), a local pyfunc model folder, or a train_cv run id")
    input: str = param("a platform stack, a folder of stacks or crops, or a store")
    output: str = param("*.json (the platform's format) or *.csv")
    tta: str = param("test-time augmentation: none | flips (the four flips) | d4 (the 8 rotations and flips)",
                     choices=TTA_MODES)
    batch_size: int = param("inference batch size")
    device: str = param("auto | cpu | cuda")
    threshold: float | None = param("override the model's threshold on its score (none: the model's own rule)")
    export: str = param("copy the model into this folder (a pyfunc model) and exit")

    STEP = keys.PREDICT


CONFIG = PredictConfig


@cli_step(keys.PREDICT)
def main(argv: list[str] | None = None) -> Path | None:
    cfg = from_cli(PredictConfig, argv, __doc__)
    if cfg.export:
        path = export_model(cfg.model, cfg.export)
        print(f"exported {cfg.model} to {path}")
        return path
    t0 = time.perf_counter()
    check_output(cfg.output)  # before any work
    crops = load_inputs(cfg.input)  # a bad input is named before the model is loaded
    predictor = load_predictor(cfg.model, cfg.device, cfg.threshold)  # none registered yet: says which step does
    prob, cls = predictor.predict(crops.images, tta=cfg.tta, batch_size=cfg.batch_size)
    out = write_predictions(cfg.output, crops.ids, prob, cls)
    seconds = time.perf_counter() - t0
    n_atypical = sum(c == "atypical" for c in cls)
    print(f"{len(crops)} crops ({crops.kind}) -> {out}: {n_atypical} atypical at threshold {predictor.threshold:g}, "
          f"{seconds:.1f} s", file=sys.stderr)
    if os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`; the container and the CLI only write the output
        with step_run(keys.PREDICT, cfg.profile):
            log_params({**as_params(cfg), keys.P_THRESHOLD: predictor.threshold})
            mlflow.log_metrics({keys.N_CROPS: len(crops), keys.N_ATYPICAL: n_atypical, keys.PREDICT_SECONDS: seconds})
            mlflow.log_artifact(str(out))
    return out


if __name__ == "__main__":
    main()
