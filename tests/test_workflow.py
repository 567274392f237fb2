"""The whole workflow (`main`) end to end on a small profile, then `mlflow ui` over REST."""
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from analysis import keys
from pipelines.common import code_version
from pipelines.main import Workflow, comparison_url
from services import mlflow_server

pytestmark = pytest.mark.slow  # main runs every step as a process (mlflow run), a UI server and a browser

ROOT = Path(__file__).resolve().parents[1]
SMALL = """
base: demo
main: {backbones: convnext, pool_size: 160, test_size: 120, tune_first: true}  # one backbone: both regimes
prepare_data: {size: 240, folds: 3}  # 3-fold CV: the machinery, in less time
generator_pretrain: {vae_epochs: 1, dit_epochs: 1}
generator_finetune: {dit_epochs: 1}
synthesize: {n_atypical: 24, steps: 4, quality_max: 24}
train_cv: {epochs: 1}
tune: {n_trials: 2, folds: "1", epochs: 1, storage: "{tmp}/optuna.log"}  # each row trains with its study's best trial
report: {n_boot: 50}
"""


@pytest.fixture(scope="module")
def workflow_env(step_env):
    def build(tmp: Path) -> dict[str, str]:
        return step_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", MLFLOW_EXPERIMENT_NAME=None,
                        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")  # steps of seconds: sample every second, not 10
    return build


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, workflow_env):
    """One `main` run on a small profile file, through `mlflow run` like a user would."""
    tmp = tmp_path_factory.mktemp("workflow")
    (tmp / "small.yaml").write_text(SMALL.replace("{tmp}", str(tmp)))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = workflow_env(tmp)

    def run(*extra: str):
        return subprocess.run([sys.executable, "-m", "pipelines.main", "--profile", str(tmp / "small.yaml"),
                               "--stores", str(tmp / "stores"), *extra], cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=1200)
    first = run()
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    return tmp, uri, first, run


def _experiment(client: MlflowClient) -> str:
    """main started from the command line logs to the project's named experiment, not "Default"."""
    return client.get_experiment_by_name(keys.DEFAULT_EXPERIMENT).experiment_id


def test_main_runs_every_step_and_prints_a_readable_console(workflow):
    tmp, uri, first, _ = workflow
    out = first.stdout
    assert "Table 1" in out and "Table 2" in out and "mlflow ui" in out
    # piped to a file: whole lines only, no progress-bar frames, one start and one end line per step
    assert "\r" not in out and max(map(len, out.splitlines())) <= 300, max(out.splitlines(), key=len)
    assert out.count(": started (log ") == 12
    assert "[main] train_cv convnext/real_only: CV AUROC " in out and "[main] evaluate convnext/synth_balanced: test AUROC " in out
    client = MlflowClient(uri)
    exp = _experiment(client)
    [flow] = client.search_runs([exp], f"tags.step = '{keys.MAIN}'")
    steps = client.search_runs([exp], f"tags.`{keys.WORKFLOW_RUN}` = '{flow.info.run_id}'")
    counts = {}
    for r in steps:
        counts[r.data.tags[keys.STEP]] = counts.get(r.data.tags[keys.STEP], 0) + 1
        assert keys.PARENT_RUN not in r.data.tags  # top-level rows in the UI, linked to the workflow by a tag
        assert r.data.tags[keys.DESCRIPTION].startswith(r.data.tags[keys.STEP] + ": ")
        [log] = client.list_artifacts(r.info.run_id, "logs")  # the step's own output, with its progress bars
        assert log.file_size > 0
    [pretrain] = [r for r in steps if r.data.tags[keys.STEP] == keys.GENERATOR_PRETRAIN]
    assert any(m.startswith("system/cpu_utilization") for m in pretrain.data.metrics)  # MLflow's system metrics
    assert counts == {keys.PREPARE_DATA: 3, keys.GENERATOR_PRETRAIN: 1, keys.GENERATOR_FINETUNE: 1,
                      keys.SYNTHESIZE: 1, keys.TUNE: 1, keys.TRAIN_CV: 2, keys.EVALUATE: 2, keys.REPORT: 1}
    version = client.get_model_version_by_alias(keys.MODEL_NAME, keys.SUBMISSION_ALIAS)
    [report] = [r for r in steps if r.data.tags[keys.STEP] == keys.REPORT]
    assert version.tags["train_run_id"] == report.data.tags[keys.SELECTED_TRAIN_RUN]


def test_real_only_training_runs_beside_the_generator(workflow):
    """The profile's jobs=2: the generator chain and real-only training overlap; synth-balanced
    training waits for the synthetic stores; report comes last."""
    tmp, uri, _, _ = workflow
    client = MlflowClient(uri)
    exp = _experiment(client)
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


def test_tune_first_trains_every_row_with_its_studys_best_trial(workflow):
    tmp, uri, first, _ = workflow
    client = MlflowClient(uri)
    exp = _experiment(client)
    studies = {r.data.params[keys.P_BACKBONE]: r for r in client.search_runs([exp], f"tags.step = '{keys.TUNE}'")}
    assert sorted(studies) == ["convnext"]
    rows = [r for r in client.search_runs([exp], f"tags.step = '{keys.TRAIN_CV}'") if keys.FOLD not in r.data.tags]
    assert len(rows) == 2
    for r in rows:
        study = studies[r.data.params[keys.P_BACKBONE]]
        best = json.loads(study.data.tags[keys.BEST_PARAMS])
        assert r.data.tags[keys.FROM_STUDY_RUN] == study.info.run_id
        assert float(r.data.params["lr"]) == pytest.approx(best["lr"])
    assert "Trained with a tune study's best trial:" in first.stdout and "study lr-convnext-small, trial " in first.stdout


def test_a_killed_workflow_leaves_no_run_running_and_the_next_reuses_every_finished_step(workflow, workflow_env):
    """main SIGKILLed with its step processes (a closed laptop, a preempted node): the next main ends their
    runs as KILLED, says so, and reuses every finished step."""
    tmp, uri, _, run = workflow
    client = MlflowClient(uri)
    exp = _experiment(client)
    before = len(client.search_runs([exp], "", max_results=1000))
    # a bigger held-out store: its prepare_data step runs long enough to be killed in its own process
    killed = subprocess.Popen([sys.executable, "-m", "pipelines.main", "--profile", str(tmp / "small.yaml"),
                               "--stores", str(tmp / "stores"), "--test_size", "3000"], cwd=tmp,
                              env=workflow_env(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    step = []
    for _ in range(2400):
        step = [r for r in client.search_runs([exp], f"attributes.status = 'RUNNING' and tags.step = '{keys.PREPARE_DATA}'")
                if r.data.tags.get(keys.PID) not in (None, str(killed.pid))]
        if step:
            break
        time.sleep(0.25)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert step, "the prepare_data step never started"
    dead = {r.info.run_id for r in client.search_runs([exp], "attributes.status = 'RUNNING'")}
    assert step[0].info.run_id in dead and len(dead) == 2  # the workflow run and its step's

    again = run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "main: ended 2 run(s) left RUNNING by processes of this host that are gone, as KILLED" in again.stdout
    assert {client.get_run(r).info.status for r in dead} == {"KILLED"}
    assert again.stdout.count("[main] reuse") == 12 and "[main] run " not in again.stdout
    after = client.search_runs([exp], "", max_results=1000)
    assert len(after) == before + 3  # the killed workflow and step, and the new workflow run itself


def test_a_failing_step_names_its_log_and_shows_its_last_lines(workflow):
    tmp, _, _, run = workflow
    failed = run("--source", "folder", "--root", str(tmp / "no_such_folder"))  # the first step fails at once
    assert failed.returncode == 1 and "Traceback" not in failed.stdout + failed.stderr
    out = failed.stdout
    assert "FAILED (run " in out and "; its log: " in out and "last lines:" in out
    log = Path(out.split("; its log: ")[1].split(";")[0])
    assert (tmp / log).is_file() and "no_such_folder" in (tmp / log).read_text()
    assert "no_such_folder" in out.split("last lines:")[1]  # the step's own error, shown on main's console
    assert failed.stderr.strip().splitlines()[-1].startswith("main: step prepare_data ")


def _rows_over_rest(url: str, exp: str) -> dict:
    """The train_cv step runs main started, as `mlflow ui` serves them over REST."""
    body = json.dumps({"experiment_ids": [exp], "filter": f"tags.step = '{keys.TRAIN_CV}'", "max_results": 100}).encode()
    req = urllib.request.Request(url + "/api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"})
    rows = {}
    for r in json.loads(urllib.request.urlopen(req, timeout=30).read())["runs"]:
        tags = {t["key"]: t["value"] for t in r["data"]["tags"]}
        if keys.WORKFLOW_RUN in tags:  # the step runs main started (their fold children are not tagged with it)
            rows[(tags[keys.BACKBONE], tags[keys.REGIME])] = {m["key"]: m["value"] for m in r["data"].get("metrics", [])}
    return rows


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


def _chromium() -> str:
    """A headless Chromium for the browser test (CI installs Debian's package), or skip."""
    pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    found = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
                  if p and Path(p).is_file()), None)
    if not found:
        pytest.skip("no headless Chromium (apt-get install chromium)")
    return found


def _tick_column(page, name: str) -> None:
    """Columns menu: search a column and tick its box (the tree re-renders while the search applies)."""
    page.get_by_placeholder("Search columns").fill(name)
    node = page.locator("[data-component-type=popover] .du-bois-light-tree-treenode").filter(
        has=page.locator(".du-bois-light-tree-title", has_text=re.compile(f"^{re.escape(name)}$")))
    for _ in range(5):
        page.wait_for_timeout(400)
        if "checkbox-checked" in (node.get_attribute("class") or ""):
            return
        node.locator(".du-bois-light-tree-checkbox").click()
    raise AssertionError(f"column {name} could not be ticked")


def test_mlflow_ui_shows_every_row_and_in_a_real_browser_the_regime_comparison(workflow):
    """`mlflow ui` over REST lists every backbone x regime; then, in headless Chromium, the README's
    view: the evaluate rows with cv_auroc_mean, cv_auroc_std and test_ba, grouped by regime and
    backbone, and the report's Table 1 (screenshots in test-artifacts/)."""
    tmp, uri, _, _ = workflow
    client = MlflowClient(uri)
    exp = _experiment(client)
    [report] = client.search_runs([exp], f"tags.step = '{keys.REPORT}'", max_results=1)
    shots = ROOT / "test-artifacts"
    shots.mkdir(exist_ok=True)
    with mlflow_server(uri, tmp / "unused", ui=True) as url:
        rows = _rows_over_rest(url, exp)
        assert set(rows) == {("convnext", g) for g in keys.REGIMES}
        assert all(0.0 <= m[keys.CV_AUROC_MEAN] <= 1.0 and keys.CV_BA_STD in m for m in rows.values())
        _in_the_browser(url, _chromium(), client, exp, report.info.run_id, shots)


def _in_the_browser(url: str, chromium: str, client: MlflowClient, exp: str, report_id: str, shots: Path) -> None:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 2600, "height": 900})  # wide: the grid renders visible columns only
        page.goto(url)
        page.get_by_text(keys.DEFAULT_EXPERIMENT).first.wait_for(timeout=60_000)  # the named experiment, not "Default"
        page.goto(comparison_url(url, exp))
        for row in ("convnext / real_only", "convnext / synth_balanced"):
            page.get_by_text(f"evaluate {row} on demo_test").wait_for(timeout=60_000)
        page.locator("button", has_text=re.compile(r"^\s*Columns\s*$")).click()
        for name in (keys.CV_AUROC_MEAN, keys.CV_AUROC_STD, "test_ba"):
            _tick_column(page, name)
        page.keyboard.press("Escape")
        for tag in (keys.REGIME, keys.BACKBONE):
            page.locator("button", has_text=re.compile(r"^\s*Group by")).click()
            page.get_by_text(tag, exact=True).last.click()
            page.wait_for_timeout(500)
            page.keyboard.press("Escape")
        text = " ".join(page.inner_text("body").split())
        for name in (keys.CV_AUROC_MEAN, keys.CV_AUROC_STD, "test_ba"):
            assert name in text
        [row] = client.search_runs([exp], f"tags.step = '{keys.EVALUATE}' and tags.backbone = 'convnext' "
                                          f"and tags.regime = 'real_only'")
        assert str(row.data.metrics[keys.CV_AUROC_MEAN])[:6] in text  # the value, in its column
        assert "Group: regime: real_only, backbone: convnext" in text
        page.screenshot(path=str(shots / "mlflow_ui_regimes.png"), full_page=True)
        page.goto(f"{url}/#/experiments/{exp}/runs/{report_id}/artifacts/{keys.TABLE1}.md")
        page.get_by_text("ConvNeXt-Atto-shaped [demo, scratch] (real)").first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "mlflow_ui_table1.png"), full_page=True)
        # a fresh page: the comparison's grouping is not carried into the runs table below
        _fold_models(browser.new_page(viewport={"width": 2600, "height": 900}), url, client, exp, shots)
        browser.close()


def _fold_models(page, url: str, client: MlflowClient, exp: str, shots: Path) -> None:
    """Each fold run's best checkpoint is its MLflow LoggedModel: with a train_cv row expanded in the
    runs table, each fold run shows its model (fold<k>) in the "Models" column and its validation split
    in "Dataset" (screenshot mlflow_ui_fold_models.png); the fold run's page lists the model under
    "Logged models"; the model's page shows the best validation metrics against that split
    (mlflow_ui_fold_model.png)."""
    row = f"tags.step = '{keys.TRAIN_CV}' and tags.backbone = 'convnext' and tags.regime = 'real_only'"
    folds = {int(r.data.tags[keys.FOLD]): r for r in client.search_runs([exp], row) if keys.FOLD in r.data.tags}
    assert sorted(folds) == [1, 2, 3]  # the profile's 3-fold CV
    models = {k: client.get_logged_model(r.outputs.model_outputs[0].model_id) for k, r in folds.items()}
    split = {m.key: m.dataset_name for m in models[1].metrics}[keys.BEST_VAL_AUROC]
    assert split.endswith(f"fold 1 {keys.VALIDATION}")
    page.goto(f"{url}/#/experiments/{exp}/runs?" + urllib.parse.urlencode({"searchFilter": row}))
    parent = page.locator("[role=row]", has=page.get_by_role("link", name="convnext / real_only", exact=True)).first
    parent.wait_for(timeout=60_000)
    parent.locator("button[data-component-id*=runnamecellrenderer]").click()  # expand: its fold runs
    for k, model in models.items():
        link = page.locator(f'[role=gridcell] a[href*="/models/{model.model_id}"]').first
        link.wait_for(timeout=60_000)
        assert link.inner_text().strip() == keys.fold_model(k) == model.name
    page.get_by_text(split).first.wait_for(timeout=60_000)  # the Dataset column
    page.screenshot(path=str(shots / "mlflow_ui_fold_models.png"), full_page=True)
    page.goto(f"{url}/#/experiments/{exp}/runs/{folds[1].info.run_id}")
    page.locator(f'a[href*="/models/{models[1].model_id}"]', has_text=keys.fold_model(1)).first.wait_for(timeout=60_000)
    assert page.get_by_text(re.compile(r"^Logged models")).count() >= 1
    page.goto(f"{url}/#/experiments/{exp}/models/{models[1].model_id}")
    page.get_by_text(keys.BEST_VAL_AUROC, exact=True).first.wait_for(timeout=60_000)
    text = " ".join(page.inner_text("body").split())
    assert keys.BEST_VAL_BA in text and split in text and "Ready" in text
    page.screenshot(path=str(shots / "mlflow_ui_fold_model.png"), full_page=True)
