"""The whole workflow (`main`) end to end on a small profile, then `mlflow ui` over REST."""
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from analysis import keys
from pipelines.common import code_version
from pipelines.main import Workflow
from services import mlflow_server

ROOT = Path(__file__).resolve().parents[1]
SMALL = """
base: demo
main: {pool_size: 200, test_size: 150}
prepare_data: {size: 300}
generator_pretrain: {vae_epochs: 1, dit_epochs: 1}
generator_finetune: {dit_epochs: 1}
synthesize: {n_atypical: 24, steps: 4, quality_max: 24}
train_cv: {epochs: 1}
report: {n_boot: 50}
"""


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """One `main` run on a small profile file, through `mlflow run` like a user would."""
    tmp = tmp_path_factory.mktemp("workflow")
    (tmp / "small.yaml").write_text(SMALL)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}  # tiny models: one thread each (see conftest.one_torch_thread)
    for leaked in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):  # set by other tests' runs
        env.pop(leaked, None)

    def run():
        return subprocess.run([sys.executable, "-m", "pipelines.main", "--profile", str(tmp / "small.yaml"),
                               "--stores", str(tmp / "stores")], cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=1200)
    first = run()
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    return tmp, uri, first, run


def test_main_runs_every_step_and_prints_the_tables(workflow):
    tmp, uri, first, _ = workflow
    out = first.stdout
    assert "Table 1" in out and "Table 2" in out and "mlflow ui" in out
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("Default").experiment_id
    [flow] = client.search_runs([exp], f"tags.step = '{keys.MAIN}'")
    steps = client.search_runs([exp], f"tags.`{keys.WORKFLOW_RUN}` = '{flow.info.run_id}'")
    counts = {}
    for r in steps:
        counts[r.data.tags[keys.STEP]] = counts.get(r.data.tags[keys.STEP], 0) + 1
        assert r.data.tags["mlflow.parentRunId"] == flow.info.run_id
    assert counts == {keys.PREPARE_DATA: 3, keys.GENERATOR_PRETRAIN: 1, keys.GENERATOR_FINETUNE: 1,
                      keys.SYNTHESIZE: 1, keys.TRAIN_CV: 4, keys.EVALUATE: 4, keys.REPORT: 1}
    version = client.get_model_version_by_alias(keys.MODEL_NAME, keys.SUBMISSION_ALIAS)
    [report] = [r for r in steps if r.data.tags[keys.STEP] == keys.REPORT]
    assert version.tags["train_run_id"] == report.data.tags[keys.SELECTED_TRAIN_RUN]


def test_real_only_training_runs_beside_the_generator(workflow):
    """The profile's jobs=2: the generator chain and real-only training overlap; synth-balanced
    training waits for the synthetic stores; report comes last."""
    tmp, uri, _, _ = workflow
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("Default").experiment_id
    [flow] = client.search_runs([exp], f"tags.step = '{keys.MAIN}'", order_by=["attributes.start_time ASC"],
                                max_results=1)
    steps = client.search_runs([exp], f"tags.`{keys.WORKFLOW_RUN}` = '{flow.info.run_id}'")
    [synth] = [r for r in steps if r.data.tags[keys.STEP] == keys.SYNTHESIZE]
    [report] = [r for r in steps if r.data.tags[keys.STEP] == keys.REPORT]
    trains = [r for r in steps if r.data.tags[keys.STEP] == keys.TRAIN_CV]
    real = [r for r in trains if r.data.params[keys.P_REGIME] == keys.REAL_ONLY]
    balanced = [r for r in trains if r.data.params[keys.P_REGIME] == keys.SYNTH_BALANCED]
    assert min(r.info.start_time for r in real) < synth.info.end_time
    assert all(r.info.start_time >= synth.info.end_time for r in balanced)
    assert report.info.start_time >= max(r.info.end_time for r in steps if r is not report)
    assert flow.data.params["jobs"] == "2"


def test_a_second_main_reuses_every_finished_step(workflow):
    tmp, uri, _, run = workflow
    client = MlflowClient(uri)
    before = len(client.search_runs([client.get_experiment_by_name("Default").experiment_id], "", max_results=1000))
    again = run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("[main] reuse") == 15 and "[main] run " not in again.stdout
    after = client.search_runs([client.get_experiment_by_name("Default").experiment_id], "", max_results=1000)
    assert len(after) == before + 1  # only the new workflow run itself


def test_mlflow_ui_shows_every_backbone_and_regime(workflow):
    tmp, uri, _, _ = workflow
    with mlflow_server(uri, tmp / "unused", ui=True) as url:
        body = json.dumps({"experiment_ids": ["0"], "filter": f"tags.step = '{keys.TRAIN_CV}'",
                           "max_results": 100}).encode()
        req = urllib.request.Request(url + "/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        runs = json.loads(urllib.request.urlopen(req, timeout=30).read())["runs"]
    rows = {}
    for r in runs:  # the step runs main started (their fold children are not tagged with the workflow)
        tags = {t["key"]: t["value"] for t in r["data"]["tags"]}
        metrics = {m["key"]: m["value"] for m in r["data"].get("metrics", [])}
        if keys.WORKFLOW_RUN in tags:
            rows[(tags[keys.BACKBONE], tags[keys.REGIME])] = metrics
    assert set(rows) == {(b, g) for b in ("convnext", "lunit") for g in keys.REGIMES}
    for metrics in rows.values():
        assert 0.0 <= metrics[keys.CV_AUROC_MEAN] <= 1.0 and keys.CV_BA_STD in metrics


def test_a_step_is_reused_only_with_the_same_params_code_and_data(tracking, demo_store):
    """Workflow.finished_run, on runs logged here: the reuse key is params + code version + data digest."""
    client = MlflowClient()
    exp = client.create_experiment("reuse")
    flow = Workflow("demo", parent_run_id="", experiment_id=exp, client=client)
    tags = {keys.STEP: keys.TRAIN_CV, keys.CODE_VERSION: code_version(), keys.DATASET_DIGEST: demo_store.digest}
    done = client.create_run(exp, tags=tags).info.run_id
    client.log_param(done, "profile", "demo")
    client.log_param(done, "epochs", "1")
    client.set_terminated(done)
    data = str(demo_store.path)
    assert flow.finished_run(keys.TRAIN_CV, {"profile": "demo", "epochs": "1"}, data) == done
    assert flow.finished_run(keys.TRAIN_CV, {"profile": "demo", "epochs": "2"}, data) is None
    assert flow.finished_run(keys.EVALUATE, {"profile": "demo", "epochs": "1"}, data) is None
    client.set_tag(done, keys.DATASET_DIGEST, "other data")
    assert flow.finished_run(keys.TRAIN_CV, {"profile": "demo", "epochs": "1"}, data) is None
    client.set_tag(done, keys.DATASET_DIGEST, demo_store.digest)
    client.set_tag(done, keys.CODE_VERSION, "other code")
    assert flow.finished_run(keys.TRAIN_CV, {"profile": "demo", "epochs": "1"}, data) is None
