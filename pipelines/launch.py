"""One step as a child process with its own MLflow run, the way `mlflow run` starts it: the
command from MLproject (declared parameters filled in, the others appended as `--key value`),
the parameters logged as given, `MLFLOW_RUN_ID` in the environment. Unlike `mlflow run`, the
child's output goes to a log file (logged with the run), so side-by-side steps never
interleave on the console. The same run, made first and run later, is a submitted job's
(pipelines/submission.py).
"""
from __future__ import annotations

import functools
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.entities import Param, RunStatus
from mlflow.tracking import MlflowClient

from analysis import keys
from pipelines.children import child_env
from pipelines.common import ROOT, code_version
from pipelines.orphans import end_orphaned_runs, process_tags
from pipelines.placement import gpu_env

LOGS_DIR = "logs"  # artifact folder of a step run: its console output


@functools.cache
def _entry_points() -> dict:
    return yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]


def step_command(step: str, params: dict[str, str]) -> list[str]:
    """MLproject's command for `step` with `params`, run by this interpreter."""
    entry = _entry_points()[step]
    declared = entry.get("parameters", {})
    values = {k: params.get(k, (v or {}).get("default")) for k, v in declared.items()}
    missing = [k for k, v in values.items() if v in (None, "")]
    if missing:
        raise ValueError(f"step {step}: no value for {missing}")
    command = shlex.split(entry["command"].format(**{k: shlex.quote(str(v)) for k, v in values.items()}))
    if command[0] == "python":
        command[0] = sys.executable
    for key, value in params.items():
        if key not in declared:
            command += [f"--{key}", str(value)]
    return command


def create_step_run(client: MlflowClient, experiment_id: str, step: str, params: dict[str, str],
                    tags: dict[str, str], run_name: str | None = None) -> str:
    """The step's run, made before its process starts (as `mlflow run` does), with the params as given
    (`run_name`: until the step names it)."""
    run_tags = {"mlflow.source.type": "PROJECT", "mlflow.source.name": str(ROOT), "mlflow.project.entryPoint": step,
                "mlflow.project.backend": "local", "mlflow.project.env": "local",
                "mlflow.source.git.commit": code_version().split("-")[0], keys.STEP: step,
                **process_tags(), **tags}  # the child's own replace these once it starts
    run_id = client.create_run(experiment_id, tags=run_tags, run_name=run_name).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])  # as given, like `mlflow run`
    return run_id


def run_step(step: str, params: dict[str, str], log: Path, *, experiment_id: str, threads: int,
             run_id: str | None = None, gpu: str | None = None, extra_env: dict[str, str] | None = None,
             log_run: str | None = None) -> int:
    """Run the step's command (`threads` threads, on `gpu`) with its output in `log`; in its run when
    `run_id` is given (resumed through MLFLOW_RUN_ID; left RUNNING by a dead child it ends FAILED).
    Runs the child left RUNNING (its nested runs) end KILLED. The log goes to `log_run` (default:
    the step's run). Returns the exit code."""
    client = MlflowClient()
    env = child_env(experiment_id, threads=threads, run_id=run_id, **gpu_env(gpu), **(extra_env or {}))
    log.parent.mkdir(parents=True, exist_ok=True)
    command = step_command(step, params)
    with open(log, "w") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        code = subprocess.call(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if run_id and client.get_run(run_id).info.status == RunStatus.to_string(RunStatus.RUNNING):
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if code == 0 else RunStatus.FAILED))
    if code != 0:
        end_orphaned_runs(client, experiment_id, step)
    if log_run or run_id:
        client.log_artifact(log_run or run_id, str(log), LOGS_DIR)
    return code


def launch(client: MlflowClient, experiment_id: str, step: str, params: dict[str, str], tags: dict[str, str],
           log: Path, threads: int, gpu: str | None = None) -> tuple[str, int]:
    """Create the step's run and run the step in it (`threads` threads, on `gpu`) with its output in `log`;
    returns (run id, exit code)."""
    run_id = create_step_run(client, experiment_id, step, params, tags)
    return run_id, run_step(step, params, log, experiment_id=experiment_id, threads=threads, run_id=run_id, gpu=gpu)
