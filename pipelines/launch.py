"""One step as a child process with its own MLflow run, the way `mlflow run` starts it: the
command from MLproject (declared parameters filled in, the others appended as `--key value`),
the parameters logged as given, `MLFLOW_RUN_ID` in the environment. Unlike `mlflow run`, the
child's output goes to a log file (logged with the run), so side-by-side steps never
interleave on the console.
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


def launch(client: MlflowClient, experiment_id: str, step: str, params: dict[str, str], tags: dict[str, str],
           log: Path, threads: int) -> tuple[str, int]:
    """Create the step's run, run the step in it (`threads` threads) with its output in `log`;
    returns (run id, exit code). A child that died without closing its run leaves it FAILED, not RUNNING."""
    run_tags = {"mlflow.source.type": "PROJECT", "mlflow.source.name": str(ROOT), "mlflow.project.entryPoint": step,
                "mlflow.project.backend": "local", "mlflow.project.env": "local",
                "mlflow.source.git.commit": code_version().split("-")[0], keys.STEP: step, **tags}
    run_id = client.create_run(experiment_id, tags=run_tags).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])  # as given, like `mlflow run`
    env = child_env(experiment_id, threads=threads, run_id=run_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = step_command(step, params)
    with open(log, "w") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        code = subprocess.call(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if client.get_run(run_id).info.status == RunStatus.to_string(RunStatus.RUNNING):
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if code == 0 else RunStatus.FAILED))
    client.log_artifact(run_id, str(log), LOGS_DIR)
    return run_id, code
