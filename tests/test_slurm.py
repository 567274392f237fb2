"""main's steps as submitit jobs: executor=local (the code a Slurm cluster runs, as processes here)
on the smallest profile that has every edge of the graph, a fold job killed and the workflow run
again; the sbatch scripts a Slurm submission writes; the checks made before anything is queued."""
import http.server
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from analysis import keys
from data_tools.errors import ConfigError
from data_tools.ingest import ingest
from pipelines.config import build
from pipelines.preflight import PASSWORD, TOKEN, USER, check_paths, check_tracking
from pipelines.slurm import SlurmConfig, sbatch_options
from pipelines.train_cv import TrainCVConfig, run_train_cv

ROOT = Path(__file__).resolve().parents[1]
# one real-only row (the generator chain's edges are in the sbatch test), 2 folds of 200 crops, 1 epoch; the
# stores are given (prepare_data's edges are in the sbatch test too): a fold array, its summary, evaluate, report
TINY = """
base: demo
main: {{backbones: convnext, regimes: real_only, jobs: 3, executor: local}}
train_cv: {{epochs: 1, workroot: {tmp}/work}}
evaluate: {{n_boot: 20}}
report: {{n_boot: 20}}
slurm: {{folder: {tmp}/submitit}}
"""


def _step_runs(client, exp, workflow_id):
    return client.search_runs([exp], f"tags.`{keys.WORKFLOW_RUN}` = '{workflow_id}'", max_results=100)


def _kill_when_running(client, exp, backbone, fold, killed, stop):
    """SIGKILL the process of train_cv's fold `fold` of `backbone` once its fold run is RUNNING (a preempted job)."""
    query = (f"tags.step = '{keys.TRAIN_CV}' and tags.`{keys.BACKBONE}` = '{backbone}' and tags.fold = '{fold}' "
             f"and attributes.status = 'RUNNING'")
    while not stop.is_set():
        for run in client.search_runs([exp], query):
            os.kill(int(run.data.tags[keys.PID]), signal.SIGKILL)
            killed.append(run.info.run_id)
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def local_workflow(tmp_path_factory, empty_tracking_db):
    """main executor=local, fold 2 of the ConvNeXt row killed while it trains; then main again."""
    from pipelines import main as workflow
    tmp = tmp_path_factory.mktemp("slurm_local")
    profile = tmp / "tiny.yaml"
    profile.write_text(TINY.format(tmp=tmp))
    shutil.copyfile(empty_tracking_db, tmp / "mlflow.db")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    stores = {name: tmp / "stores" / name for name in ("demo", "demo_test")}
    ingest("demo", None, stores["demo"], folds=2, seed=0, size=200)
    ingest("demo", None, stores["demo_test"], folds=0, seed=1, size=60)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.chdir(tmp)
        mlflow.set_tracking_uri(uri)
        exp = mlflow.set_experiment("workflow").experiment_id
        client = MlflowClient()
        argv = ["--profile", str(profile), "--stores", str(tmp / "stores"), "--data", str(stores["demo"]),
                "--test_data", str(stores["demo_test"])]
        killed, stop = [], threading.Event()
        killer = threading.Thread(target=_kill_when_running, args=(client, exp, "convnext", 2, killed, stop))
        killer.start()
        started = time.time()
        try:
            with pytest.raises(SystemExit) as failed:
                workflow.main(argv)
        finally:
            stop.set()
            killer.join()
        first_s = time.time() - started
        started = time.time()
        second = workflow.main(argv)
        second_s = time.time() - started
        flows = client.search_runs([exp], f"tags.step = '{keys.MAIN}'", order_by=["attributes.start_time ASC"])
        print(f"executor=local: first run (one fold killed) {first_s:.0f} s, the rerun {second_s:.0f} s")
        yield {"tmp": tmp, "profile": profile, "client": client, "exp": exp, "killed": killed,
               "failed": str(failed.value), "first": flows[0].info.run_id, "second": second}
        while mlflow.active_run():
            mlflow.end_run()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the module fixture's two workflows: ~3 min on 2 idle cores, far more on busy ones
def test_a_killed_fold_job_fails_its_row_in_one_line_and_the_rest_of_the_workflow_runs(local_workflow):
    w = local_workflow
    client, exp = w["client"], w["exp"]
    assert len(w["killed"]) == 1
    assert re.match(r"main: step train_cv convnext/real_only fold 2 failed \(run \w+, job \d+\); its log: .*fold2\.log$",
                    w["failed"]), w["failed"]
    assert client.get_run(w["killed"][0]).info.status == "KILLED"  # not left RUNNING
    # every job's run is made when it is queued: what depends on the killed fold never ran; fold 1 did
    first = {r.data.tags[keys.STEP]: r for r in _step_runs(client, exp, w["first"])}
    assert {step: r.info.status for step, r in first.items()} == {
        keys.TRAIN_CV: "KILLED", keys.EVALUATE: "KILLED", keys.REPORT: "KILLED"}
    folds = client.search_runs([exp], f"tags.`{keys.PARENT_RUN}` = '{first[keys.TRAIN_CV].info.run_id}'")
    assert {f.data.tags[keys.FOLD]: f.info.status for f in folds} == {"1": "FINISHED", "2": "KILLED"}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the module fixture's two workflows: ~3 min on 2 idle cores, far more on busy ones
def test_the_rerun_submits_only_the_killed_jobs_work(local_workflow):
    """Finished steps are reused (no new run); the killed row runs again, its finished fold is logged
    again from its work folder without training; its evaluation and the report follow."""
    w = local_workflow
    client, exp = w["client"], w["exp"]
    again = _step_runs(client, exp, w["second"])
    assert sorted(r.data.tags[keys.STEP] for r in again) == [keys.EVALUATE, keys.REPORT, keys.TRAIN_CV]
    assert {r.info.status for r in again} == {"FINISHED"}
    [train] = [r for r in again if r.data.tags[keys.STEP] == keys.TRAIN_CV]
    assert (train.data.params[keys.P_BACKBONE], train.data.params[keys.P_REGIME]) == ("convnext", keys.REAL_ONLY)
    logs = {Path(a.path).name for a in client.list_artifacts(train.info.run_id, "logs")}
    assert {"train_cv_convnext-real_only-fold1.log", "train_cv_convnext-real_only-fold2.log"} <= logs
    fold_logs = {k: (w["tmp"] / "logs").glob(f"workflow-{w['second'][:8]}/train_cv_convnext-real_only-fold{k}.log")
                 for k in (1, 2)}
    text = {k: next(iter(v)).read_text() for k, v in fold_logs.items()}
    assert "fold 1 epoch 1/1" not in text[1] and "fold 2 epoch 1/1" in text[2]  # only the killed fold trains


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the module fixture's two workflows: ~3 min on 2 idle cores, far more on busy ones
def test_folds_run_as_an_array_under_the_one_parent_the_submitter_made(local_workflow):
    w = local_workflow
    client, exp = w["client"], w["exp"]
    [parent] = [r for flow in (w["first"], w["second"]) for r in _step_runs(client, exp, flow)
                if r.data.tags[keys.STEP] == keys.TRAIN_CV and r.info.status == "FINISHED"]  # the rerun's row
    folds = client.search_runs([exp], f"tags.`{keys.PARENT_RUN}` = '{parent.info.run_id}' "
                                      f"and attributes.status = 'FINISHED'")
    assert sorted(f.data.tags[keys.FOLD] for f in folds) == ["1", "2"]
    pids = {f.data.tags[keys.PID] for f in folds} | {parent.data.tags[keys.PID]}
    assert len(pids) == 3  # a process per fold task, another for the summary
    assert {f.data.tags[keys.DEVICE] for f in folds} == {"cpu"}
    assert parent.data.tags[keys.JOB_ID].isdigit()
    assert parent.data.metrics[keys.CV_AUROC_MEAN] == pytest.approx(
        sum(f.data.metrics[keys.BEST_VAL_AUROC] for f in folds) / 2)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the module fixture's two workflows: ~3 min on 2 idle cores, far more on busy ones
def test_the_jobs_give_the_runs_and_metrics_of_the_in_process_path(local_workflow):
    """Each step run has the params main passes locally (the run id of the step before it), started after
    it; the train_cv row's fold metrics equal train_cv run in this process on the same store."""
    w = local_workflow
    client, exp = w["client"], w["exp"]
    second = {r.data.tags[keys.STEP]: r for r in _step_runs(client, exp, w["second"])}
    row, evaluate, report = second[keys.TRAIN_CV], second[keys.EVALUATE], second[keys.REPORT]
    assert evaluate.data.params["train_run_id"] == row.info.run_id
    began = lambda r: float(r.data.tags[keys.PROCESS_START])  # noqa: E731 - the step's own process
    assert began(evaluate) >= row.info.end_time / 1000 and began(report) >= evaluate.info.end_time / 1000
    mlflow.set_experiment("in-process")
    cfg = build(TrainCVConfig, str(w["profile"]), data=row.data.params["data"], backbone="convnext",
                workroot=str(w["tmp"] / "in_process"))
    here = client.get_run(run_train_cv(cfg)).data.metrics
    for name in (keys.fold_metric(1, "auroc"), keys.fold_metric(2, "auroc"), keys.CV_AUROC_MEAN):
        assert row.data.metrics[name] == pytest.approx(here[name], abs=1e-6), name


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the module fixture's two workflows: ~3 min on 2 idle cores, far more on busy ones
def test_sbatch_scripts_follow_the_workflow_graph(tmp_path, empty_tracking_db):
    """A Slurm submission of the paper profile (sbatch and srun stood in for, scripts/slurm_dry_run.py):
    every step a job with the profile's resources, after the jobs that make its inputs."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from services import mlflow_server
    from slurm_dry_run import dry_run
    shutil.copyfile(empty_tracking_db, tmp_path / "mlflow.db")
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts") as url:
        scripts = dry_run(tmp_path / "sbatch", ["--profile", "paper", "--backbones", "convnext"], url,
                          tmp_path / "work")
    jobs = {}
    for path in scripts:
        text = path.read_text()
        options = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", text, re.M))
        jobs.setdefault(options["job-name"], []).append((path.name.split("_")[0], options))
    first = lambda name: jobs[name][0]  # noqa: E731
    after = lambda name, i=0: set(jobs[name][i][1].get("dependency", "afterok").split(":")[1:])  # noqa: E731
    assert after("generator_pretrain") == set()  # the pool is given
    assert after("generator_finetune") == {first("prepare_data_midog25")[0], first("generator_pretrain")[0]}
    assert after("synthesize") == {first("generator_finetune")[0]}
    real, synth = "train_cv_convnext-real_only", "train_cv_convnext-synth_balanced"
    assert first(real)[1]["array"] == "0-4%5" and after(real) == {first("prepare_data_midog25")[0]}
    assert after(synth) == {first("prepare_data_midog25")[0], first("synthesize")[0]}
    assert after(real, 1) == {first(real)[0]}  # the summary job waits for every fold task
    assert after("evaluate_convnext-real_only") == {jobs[real][1][0]}
    assert len(after("report")) == len(scripts) - 1
    paper = build(SlurmConfig, "paper").resources(keys.TRAIN_CV)
    assert first(real)[1]["gpus-per-node"] == str(paper.gpus) and first(real)[1]["time"] == str(round(paper.hours * 60))
    assert first(real)[1]["kill-on-invalid-dep"] == "yes"


def test_store_paths_must_be_absolute_and_present(tmp_path):
    with pytest.raises(ConfigError, match=r"^data=stores/x is relative: .*give the absolute path"):
        check_paths({"data": "stores/x"}, {})
    with pytest.raises(ConfigError, match="does not exist here"):
        check_paths({"data": str(tmp_path / "missing")}, {})
    with pytest.raises(ConfigError, match="its folder .* does not exist"):
        check_paths({}, {"stores": str(tmp_path / "a" / "b")})
    check_paths({"data": str(tmp_path), "pool": ""}, {"stores": str(tmp_path / "stores")})


class _LoginWanted(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(401)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_tracking_uri_the_nodes_cannot_share_or_log_in_to_is_refused(tmp_path, monkeypatch):
    for uri in (f"sqlite:///{tmp_path}/mlflow.db", "file:///shared/mlruns", "./mlruns"):
        with pytest.raises(ConfigError, match="cannot share"):
            check_tracking(uri, env={})
    check_tracking("postgresql://user@db-host/mlflow", env={})
    with pytest.raises(ConfigError, match=f"set both {USER} and {PASSWORD}"):
        check_tracking("http://tracking-host:5000", env={USER: "alice"})
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LoginWanted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ConfigError, match=r"asks for a login \(HTTP 401\): export MLFLOW_TRACKING_USERNAME"):
            check_tracking(url, env={})
        check_tracking(url, env={USER: "alice", PASSWORD: "secret"})
        check_tracking(url, env={TOKEN: "t"})
        (tmp_path / ".mlflow").mkdir()
        (tmp_path / ".mlflow" / "credentials").write_text(
            "[mlflow]\nmlflow_tracking_username = alice\nmlflow_tracking_password = secret\n")
        check_tracking(url, env={})
    finally:
        server.shutdown()
        server.server_close()
    (tmp_path / ".mlflow" / "credentials").unlink()
    with pytest.raises(ConfigError, match="cannot reach the tracking server"):
        check_tracking(url, env={}, timeout=2)


def test_resources_lines_and_sbatch_options():
    cfg = build(SlurmConfig, "paper")
    assert cfg.resources(keys.TRAIN_CV).gpus == 1 and cfg.resources("default").gpus == 0
    cfg.evaluate = "hours=3"  # what a line leaves out comes from default
    assert (cfg.resources(keys.EVALUATE).hours, cfg.resources(keys.EVALUATE).cpus) == (3.0, 4)
    cfg.evaluate = "gpu=1"
    with pytest.raises(ConfigError, match="'gpu=1' is not one of gpus=<number>"):
        cfg.resources(keys.EVALUATE)
    assert sbatch_options("--qos=high --exclusive") == {"qos": "high", "exclusive": True}
    with pytest.raises(ConfigError, match="not an sbatch option"):
        sbatch_options("qos=high")
