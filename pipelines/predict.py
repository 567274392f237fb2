"""predict: run the submission ensemble on platform stacks, a folder of crops, or a store.

The container's command and a plain CLI (`python -m pipelines.predict --model ... --input
... --output ...`). Output: `*.csv` -> id, probability, class; otherwise the platform JSON,
a list with one {"class", "confidence"} per page in page order. Several stacks in the
input folder (the platform mounts one per job) are concatenated in natural file-name
order. Any bad input fails the whole call, naming the file, and writes no output: the
platform scores a job all-or-nothing. Logs an MLflow run only under `mlflow run`.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import mlflow

from analysis import keys
from analysis.submission import export_model, load_predictor, write_predictions
from data_tools.images import ImageError
from data_tools.inputs import PLATFORM_INPUT, PLATFORM_OUTPUT, InputError, load_inputs
from data_tools.store import StoreError
from pipelines.common import log_params, step_parser, step_run
from pipelines.profiles import resolve

DEFAULT_MODEL = f"models:/{keys.MODEL_NAME}@{keys.SUBMISSION_ALIAS}"


def _flag(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def main(argv: list[str] | None = None) -> Path | None:
    p = step_parser(keys.PREDICT, __doc__)
    p.add_argument("--model", default="", help=f"model URI, local pyfunc model folder, or train_cv run id "
                                                f"(default {DEFAULT_MODEL})")
    p.add_argument("--input", default="", help=f"stack file, folder of stacks or crops, or a store "
                                                f"(default {PLATFORM_INPUT})")
    p.add_argument("--output", default="", help=f"*.json (platform format) or *.csv (default {PLATFORM_OUTPUT})")
    p.add_argument("--tta", default="", help="true: average over the four flips")
    p.add_argument("--batch_size", default="")
    p.add_argument("--device", default="", help="auto | cpu | cuda")
    p.add_argument("--threshold", default="", help="override the model's threshold")
    p.add_argument("--export", default="", help="copy --model into this folder (a pyfunc model) and exit")
    args = p.parse_args(argv)
    cfg = {"model": DEFAULT_MODEL, "input": PLATFORM_INPUT, "output": PLATFORM_OUTPUT,
           **resolve(keys.PREDICT, args.profile, vars(args))}
    if cfg.get("export"):
        path = export_model(cfg["model"], cfg["export"])
        print(f"exported {cfg['model']} to {path}")
        return path
    t0 = time.perf_counter()
    try:
        crops = load_inputs(cfg["input"])
    except (InputError, ImageError, StoreError) as e:
        raise SystemExit(f"predict: {e}") from None
    predictor = load_predictor(cfg["model"], cfg["device"], float(cfg["threshold"]) if cfg.get("threshold") else None)
    prob, cls = predictor.predict(crops.images, tta=_flag(cfg["tta"]), batch_size=int(cfg["batch_size"]))
    out = write_predictions(cfg["output"], crops.ids, prob, cls)
    seconds = time.perf_counter() - t0
    n_atypical = sum(c == "atypical" for c in cls)
    print(f"{len(crops)} crops ({crops.kind}) -> {out}: {n_atypical} atypical at threshold {predictor.threshold:g}, "
          f"{seconds:.1f} s", file=sys.stderr)
    if os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`; the container and the CLI only write the output
        with step_run(keys.PREDICT, args.profile):
            log_params({k: cfg[k] for k in ("model", "input", "output", "tta", "batch_size", "device")}
                       | {"threshold": predictor.threshold})
            mlflow.log_metrics({keys.N_CROPS: len(crops), keys.N_ATYPICAL: n_atypical, keys.PREDICT_SECONDS: seconds})
            mlflow.log_artifact(str(out))
    return out


if __name__ == "__main__":
    main()
