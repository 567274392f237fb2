"""main: the whole workflow for a profile, each step an `mlflow run` child of one workflow run.

prepare_data -> generator_pretrain -> generator_finetune -> synthesize -> train_cv for
every backbone x regime -> evaluate -> report. A step whose finished run has the same
parameters, code version and data digest is reused, not run again, so a workflow killed
halfway and started again goes on where it stopped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from analysis import keys
from data_tools.store import open_store
from pipelines.common import ROOT, code_version, step_parser, step_run
from pipelines.profiles import resolve

BACKBONES = ("convnext", "lunit")


@dataclass
class Workflow:
    """Runs steps as `mlflow run` children of one workflow run, reusing finished ones."""
    profile: str
    parent_run_id: str
    experiment_id: str
    env_manager: str = "local"
    client: MlflowClient = field(default_factory=MlflowClient)
    timings: dict[str, float] = field(default_factory=dict)

    def finished_run(self, step: str, params: dict[str, str], data: str | None) -> str | None:
        """The newest finished run of `step` with these params, this code version and data digest."""
        query = (f"tags.`{keys.STEP}` = '{step}' and attributes.status = 'FINISHED' "
                 f"and tags.`{keys.CODE_VERSION}` = '{code_version()}'")
        digest = open_store(data).digest if data else None
        for run in self.client.search_runs([self.experiment_id], query, order_by=["attributes.start_time DESC"]):
            if run.data.tags.get("mlflow.parentRunId") and keys.WORKFLOW_RUN not in run.data.tags:
                continue  # a nested run inside a step (e.g. a fold), not a step run of its own
            logged = run.data.params
            if all(logged.get(k) == v for k, v in params.items()) and \
                    (digest is None or run.data.tags.get(keys.DATASET_DIGEST) == digest):
                return run.info.run_id
        return None

    def step(self, step: str, data: str | None = None, **params: str) -> str:
        """Run one entry point (or reuse its finished run); returns the run id."""
        params = {"profile": self.profile, **({"data": data} if data else {}),
                  **{k: str(v) for k, v in params.items() if v not in (None, "")}}
        label = f"{step}({', '.join(f'{k}={v}' for k, v in params.items() if k != 'profile')})"
        reused = self.finished_run(step, params, data)
        if reused:
            print(f"[main] reuse {label}: run {reused}")
            return reused
        print(f"[main] run {label}", flush=True)
        start = time.time()
        submitted = mlflow.projects.run(str(ROOT), entry_point=step, parameters=params, experiment_id=self.experiment_id,
                                        env_manager=self.env_manager, synchronous=True)
        self.client.set_tag(submitted.run_id, "mlflow.parentRunId", self.parent_run_id)
        self.client.set_tag(submitted.run_id, keys.WORKFLOW_RUN, self.parent_run_id)
        self.timings[step] = self.timings.get(step, 0.0) + time.time() - start
        if self.client.get_run(submitted.run_id).info.status != RunStatus.to_string(RunStatus.FINISHED):
            raise RuntimeError(f"step {label} did not finish (run {submitted.run_id})")
        return submitted.run_id


def main(argv: list[str] | None = None) -> str:
    p = step_parser(keys.MAIN, __doc__)
    p.add_argument("--data", default="", help="an existing real store (skips prepare_data)")
    p.add_argument("--source", default="", help="raw source for prepare_data (default: the profile's)")
    p.add_argument("--root", default="", help="where the raw source lies")
    p.add_argument("--test_data", default="", help="test store for evaluate (demo: a held-out demo store)")
    p.add_argument("--pool", default="", help="store the generator is pretrained on (demo: a separate demo pool; "
                   "paper: the unlabelled WSI pool from prepare_data source=sliderunner|midogpp)")
    p.add_argument("--stores", default="stores", help="folder for the stores the workflow writes")
    p.add_argument("--backbones", default=",".join(BACKBONES))
    args = p.parse_args(argv)
    if Path(args.profile).is_file():  # steps run in the project folder: give them the file's absolute path
        args.profile = str(Path(args.profile).resolve())
    cfg = resolve(keys.PREPARE_DATA, args.profile, {"source": args.source, "root": args.root})
    sizes = resolve(keys.MAIN, args.profile, {})
    stores = Path(args.stores).resolve()
    started = time.time()
    with step_run(keys.MAIN, args.profile, run_name=f"workflow {args.profile}") as run:
        flow = Workflow(args.profile, run.info.run_id, run.info.experiment_id)
        data = args.data
        if not data:
            data = str(stores / cfg["source"])
            flow.step(keys.PREPARE_DATA, source=cfg["source"], root=cfg.get("root", ""), out=data)
        test_data = args.test_data
        if not test_data and cfg["source"] == "demo":  # a held-out demo set: other seed, no CV pool
            test_data = str(stores / "demo_test")
            flow.step(keys.PREPARE_DATA, source="demo", out=test_data, folds="0",
                      seed=str(int(cfg["seed"]) + 1), size=str(sizes["test_size"]))
        pool = args.pool
        if not pool and cfg["source"] == "demo":  # pretraining never sees the CV pool: a pool of its own
            pool = str(stores / "demo_pool")
            flow.step(keys.PREPARE_DATA, source="demo", out=pool, folds="0", seed=str(int(cfg["seed"]) + 2),
                      size=str(sizes["pool_size"]))
        pool = pool or resolve(keys.GENERATOR_PRETRAIN, args.profile, {}).get("data", "")
        if not Path(pool).joinpath("manifest.json").is_file():
            raise SystemExit(f"no generator pretraining pool at {pool!r}: build one first, e.g. "
                             f"mlflow run . -e prepare_data -P source=sliderunner -P root=<db.sqlite> -P out={pool}")
        pretrain = flow.step(keys.GENERATOR_PRETRAIN, data=pool)
        finetune = flow.step(keys.GENERATOR_FINETUNE, data=data, pretrain_run_id=pretrain)
        synth = flow.step(keys.SYNTHESIZE, finetune_run_id=finetune)
        for backbone in args.backbones.split(","):
            for regime in keys.REGIMES:
                train = flow.step(keys.TRAIN_CV, data=data, backbone=backbone, regime=regime,
                                  synth_run_id=synth if regime == keys.SYNTH_BALANCED else "")
                if test_data:
                    flow.step(keys.EVALUATE, train_run_id=train, test_data=test_data)
        flow.step(keys.REPORT)
        mlflow.log_metrics({f"seconds_{k}": v for k, v in flow.timings.items()})
        mlflow.log_metric("seconds_total", time.time() - started)
    print(f"[main] workflow finished in {time.time() - started:.0f} s. Open the results with:\n"
          f"  mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}  # then http://127.0.0.1:5000")
    return run.info.run_id


if __name__ == "__main__":
    main()
