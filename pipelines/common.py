"""What every step does the same way: its entry point's errors, its MLflow run, tags, dataset inputs."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import mlflow
from mlflow.exceptions import MlflowException

from analysis import keys
from data_tools.errors import ConfigError, UserError
from data_tools.params import parse_flag
from data_tools.store import Store
from pipelines.orphans import end_orphaned_runs, process_tags

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
DEBUG_ENV = "MITOCLASS_DEBUG"  # =1: user errors show their traceback too (as does --debug)
# steps download many small artifacts (fold predictions, checkpoints): one bar each buries the output
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@functools.cache
def code_version() -> str:
    """The git commit of the project, plus a digest of uncommitted changes ("<sha>-dirty-<hash>"),
    so that a reused run was made by exactly this code; "unknown" outside git. Once per process:
    a process runs the code it started with, and its keys and tags must agree."""
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout  # noqa: E731
        sha, diff = git("rev-parse", "HEAD").strip(), git("diff", "HEAD")
        return sha + (f"-dirty-{hashlib.sha256(diff.encode()).hexdigest()[:10]}" if diff else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cli_step(step: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Wrap a step's `main(argv)`: a `UserError` (bad file, row, option, run id...) ends in one
    line `<step>: <what is wrong>` (exit code 1) instead of a traceback; `--debug` or
    MITOCLASS_DEBUG=1 lets the traceback through. Any other exception is a bug: traceback."""
    def wrap(main: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> T:
            if argv is None and not any(os.environ.get(v) for v in
                                        ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")):
                os.environ["MLFLOW_EXPERIMENT_NAME"] = keys.DEFAULT_EXPERIMENT  # a named experiment, not "Default"
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = "--debug" in argv or parse_flag(os.environ.get(DEBUG_ENV) or "false")
            try:
                return main([a for a in argv if a != "--debug"])
            except UserError as e:
                if debug:
                    raise
                raise SystemExit(f"{step}: {e}") from None
        return run
    return wrap


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler's cancel, `kill`) unwinds like an error: the step's run is marked
    FAILED and its temporary folders are removed, instead of a run left RUNNING forever."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def mark_training_experiment(experiment_id: str) -> None:
    """Tag the experiment as model training, so the MLflow UI opens its runs table (not the GenAI view)."""
    client = mlflow.tracking.MlflowClient()
    if client.get_experiment(experiment_id).tags.get(keys.EXPERIMENT_KIND) != keys.MODEL_TRAINING_KIND:
        shared_write(lambda: client.set_experiment_tag(experiment_id, keys.EXPERIMENT_KIND, keys.MODEL_TRAINING_KIND))


def step_description(step: str, profile: str) -> str:
    """A step run's description in the MLflow UI: the first paragraph of its module's docstring."""
    doc = (importlib.import_module(f"pipelines.{step}").__doc__ or step).strip().split("\n\n")[0]
    return f"{' '.join(doc.split())}\n\nProfile: {profile}."


@contextlib.contextmanager
def step_run(step: str, profile: str, run_name: str | None = None, tags: dict[str, str] | None = None,
             nested: bool = False, system_metrics: bool = False) -> Iterator[mlflow.ActiveRun]:
    """Start (or, under `mlflow run`, resume via MLFLOW_RUN_ID) the run of a step, tagged by contract
    (with its process: pipelines/orphans.py), with its description; `system_metrics`: CPU, memory (and
    GPU) sampled into the run (training steps). Runs its experiment's processes left RUNNING are ended."""
    all_tags = {keys.STEP: step, keys.PROFILE: profile, keys.CODE_VERSION: code_version(), **process_tags(),
                **({} if nested else {keys.DESCRIPTION: step_description(step, profile)}), **(tags or {})}
    _stop_on_sigterm()
    with mlflow.start_run(run_name=run_name, nested=nested, tags=all_tags,
                          log_system_metrics=system_metrics or None) as run:
        if not nested:
            mark_training_experiment(run.info.experiment_id)
            end_orphaned_runs(mlflow.tracking.MlflowClient(), run.info.experiment_id, step)
        if run_name and not nested:
            mlflow.set_tag("mlflow.runName", run_name)
        yield run


def shared_write(write: Callable[[], T], attempts: int = 3) -> T:
    """An idempotent write to a run that other jobs write to at the same moment (a joined
    train_cv parent). MLflow's SQL store checks, then inserts: of two jobs writing the same tag
    or dataset, one hits the database's unique key. The retry finds the other job's row."""
    for attempt in range(attempts):
        try:
            return write()
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def log_store(store: Store, context: str) -> None:
    """Record which data a run consumed: the digest tag and an MLflow dataset input."""
    tag = keys.DATASET_DIGEST if context in ("training", "train") else f"{context}_digest"
    shared_write(lambda: mlflow.set_tag(tag, store.digest))
    with warnings.catch_warnings():  # MLflow's source-type guess and integer-schema hints: noise here
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(store.index, source=str(store.path.resolve()), name=store.name,
                                          digest=store.digest[:32])
        shared_write(lambda: mlflow.log_input(dataset, context=context))


def _same_value(a: str, b: str) -> bool:
    """The same value as typed by the user and as resolved: "1e-3" / "0.001", "yes" / "true", and
    "'a|b'" / "a|b" (`mlflow run` logs a value with shell characters as it quoted it for the command)."""
    if a == b or a == shlex.quote(b):
        return True
    for parse in (float, parse_flag):
        try:
            return parse(a) == parse(b)
        except ValueError:
            continue
    return False


def log_params(params: dict) -> None:
    """Log the resolved parameters of the active run, once.

    Under `mlflow run` the parameters given with -P are already logged as typed by the
    user ("1e-3"); the resolved value ("0.001") is the same and is not logged again. A
    truly different value (resuming a run with other parameters) is a clear error.
    """
    run_id = mlflow.active_run().info.run_id
    params = {k: "" if v is None else str(v) for k, v in params.items()}

    def not_yet_logged() -> dict[str, str]:
        existing = mlflow.get_run(run_id).data.params
        for key, value in params.items():
            if key in existing and not _same_value(existing[key], value):
                raise ConfigError(f"run {run_id} already has {key}={existing[key]!r}; this call asks for "
                                 f"{value!r}. Start a new run instead of resuming this one.")
        return {k: v for k, v in params.items() if k not in existing}

    fresh = not_yet_logged()
    if fresh:
        try:
            mlflow.log_params(fresh)
        except mlflow.exceptions.MlflowException:
            # another job (e.g. a fold on another machine) logged them at the same moment: fine if equal
            if not_yet_logged():
                raise
