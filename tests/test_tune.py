"""tune: an Optuna study over train_cv's recipe shared by worker processes, trials as nested MLflow runs,
resumable, safe after a killed worker, refusing mixed settings; train_cv takes its best trial."""
import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from analysis import keys
from data_tools.ingest import ingest
from data_tools.errors import ConfigError
from pipelines import train_cv, tune
from pipelines.config import build
from pipelines.orphans import process_tags

DONE = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    store, _ = ingest("demo", None, tmp_path_factory.mktemp("tune") / "demo160", folds=2, seed=0, size=160)
    return store


def _args(store, storage, n_trials, n_workers, space="lr", lr_max="1e-2"):
    return ["--data", str(store.path), "--backbone", "convnext", "--n_trials", str(n_trials),
            "--n_workers", str(n_workers), "--storage", str(storage), "--study_name", "study-test",
            "--folds", "1", "--epochs", "2", "--lr_min", "1e-4", "--lr_max", lr_max, "--loss", "focal",
            "--space", space]


def _trial_runs(client, study_run_id):
    return client.search_runs([mlflow.get_experiment_by_name("test").experiment_id],
                              f"tags.mlflow.parentRunId = '{study_run_id}'")


@pytest.mark.slow
def test_a_killed_worker_costs_nothing_and_the_best_trial_trains(tracking, tiny_store, tmp_path, step_env,
                                                                 monkeypatch):
    """Two workers over lr and focal_gamma; one SIGKILLed mid-trial: the same command again fails its trial (run
    FAILED), queues its values again and ends with exactly n_trials; more trials extend the study; train_cv takes
    the best trial's values."""
    journal = tmp_path / "journal.log"
    space = "lr,focal_gamma=0.5:3"
    args = _args(tiny_store, journal, n_trials=4, n_workers=2, space=space)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.tune", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path,
                            env=step_env(MLFLOW_EXPERIMENT_NAME="test", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1"))
    client = MlflowClient()
    killed = None
    for _ in range(3000):  # the first worker's first trial, while it trains: SIGKILL that worker (the step's process)
        running = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=(
            "attributes.status = 'RUNNING' and attributes.run_name LIKE 'trial%'"))
        if running:
            killed = running[0]
            other_workers = psutil.Process(proc.pid).children()
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    assert killed is not None and killed.data.tags[keys.PID] == str(proc.pid) and len(other_workers) == 1
    proc.wait()
    psutil.wait_procs(other_workers, timeout=600)  # the other worker goes on to n_trials (counting the dead one)

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # trials of seconds: sample every second
    study = tune.main(args)  # the same command again
    done = study.get_trials(states=DONE)
    assert len(done) == 4 and not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    [dead] = [t for t in study.get_trials(states=(TrialState.FAIL,)) if tune.SURPLUS not in t.user_attrs]
    assert dead.number == int(killed.data.tags["trial"])
    assert client.get_run(killed.info.run_id).info.status == "FAILED"
    [retry] = [t for t in done if t.user_attrs.get(tune.RETRY_OF) == dead.number]
    assert retry.params == dead.params
    # trial 0 is the profile's recipe: the backbone's default lr, the profile's focal_gamma
    first = study.trials[0]
    assert first.user_attrs.get(tune.BASELINE) and first.params == {"lr": 2e-3, "focal_gamma": 2.0}
    assert len({tuple(sorted(t.params.items())) for t in done if t is not retry}) == len(done) - 1  # never repeated
    assert all(1e-4 <= t.params["lr"] <= 1e-2 and 0.5 <= t.params["focal_gamma"] <= 3 for t in done)
    for t in done:  # where each ran, and its run
        assert {keys.HOST, keys.PID, keys.PROCESS_START, keys.TRIAL_RUN_ID} <= set(t.user_attrs)

    [study_run] = mlflow.search_runs(filter_string="tags.step = 'tune' and tags.optuna_study LIKE 'study-test@%'",
                                     output_format="list")
    trial_runs = {int(r.data.tags["trial"]): r for r in _trial_runs(client, study_run.info.run_id)}
    for t in done:
        run = trial_runs[t.number]
        assert run.info.status == "FINISHED" and run.info.run_id == t.user_attrs[keys.TRIAL_RUN_ID]
        assert float(run.data.params["focal_gamma"]) == pytest.approx(t.params["focal_gamma"])
        assert run.data.params[keys.P_AUGMENT] == "flips" and run.data.params["loss"] == "focal"  # the full config
        assert any(m.startswith("system/") for m in run.data.metrics)  # MLflow's system metrics, as fold runs
    assert study_run.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert json.loads(study_run.data.tags[keys.BEST_PARAMS]) == study.best_params
    assert {keys.IMPORTANCE_PREFIX + "lr", keys.IMPORTANCE_PREFIX + "focal_gamma"} <= set(study_run.data.metrics)
    figures = {f.path for f in client.list_artifacts(study_run.info.run_id, keys.STUDY_FIGURES_DIR)}
    assert {f"{keys.STUDY_FIGURES_DIR}/{n}" for n in ("optuna_history.png", "optuna_importance.png",
                                                      "optuna_slice_lr.png", "optuna_slice_focal_gamma.png")} <= figures
    assert study_run.data.tags[keys.DESCRIPTION].startswith("tune: ")
    _dashboard_lists(journal, "study-test", len(study.trials))

    # the same command with one more trial extends the same study and the same study run
    study = tune.main(_args(tiny_store, journal, n_trials=5, n_workers=1, space=space))
    assert len(study.get_trials(states=DONE)) == 5
    runs = mlflow.search_runs(filter_string="tags.step = 'tune' and tags.optuna_study LIKE 'study-test@%'",
                              output_format="list")
    assert [r.info.run_id for r in runs] == [study_run.info.run_id]
    assert mlflow.get_run(study_run.info.run_id).data.metrics["n_trials_done"] == 5

    # train_cv with the study's best trial: its lr and focal_gamma, tagged with the study
    best = study.best_trial
    parent = train_cv.main(["--data", str(tiny_store.path), "--backbone", "convnext", "--folds", "1", "--epochs", "1",
                            "--loss", "focal", "--from_study", "study-test"])
    row = client.get_run(parent)
    assert float(row.data.params["lr"]) == pytest.approx(best.params["lr"])
    assert float(row.data.params["focal_gamma"]) == pytest.approx(best.params["focal_gamma"])
    assert (row.data.tags[keys.FROM_STUDY], row.data.tags[keys.FROM_TRIAL]) == ("study-test", str(best.number))
    assert row.data.tags[keys.FROM_STUDY_RUN] == study_run.info.run_id


def test_a_study_refuses_other_settings_and_recovers_dead_trials(tracking, tiny_store, tmp_path, capsys):
    """Reopening a study with another lr_max or another store is refused, naming the difference, before any
    trial or run; a trial whose process is gone is failed, its run ended FAILED, its values queued again."""
    journal = tmp_path / "journal.log"
    flags = _args(tiny_store, journal, 4, 1, "lr,focal_gamma=0.5:3")
    cfg = build(tune.TuneConfig, "demo", **{flags[i].lstrip("-"): flags[i + 1] for i in range(0, len(flags), 2)})
    study = tune.prepare_study(cfg, tiny_store)
    assert study.user_attrs["space"] == "focal_gamma=0.5:3,lr=0.0001:0.01:log"
    assert study.user_attrs["data_digest"] == tiny_store.digest and study.user_attrs["loss"] == "focal"
    [baseline] = study.get_trials(states=(TrialState.WAITING,))  # the profile's values come first
    assert baseline.system_attrs["fixed_params"] == {"lr": 2e-3, "focal_gamma": 2.0}
    with pytest.raises(SystemExit, match=r"space 'focal_gamma=0.5:3,lr=0.0001:0.01:log' -> "
                                         r"'focal_gamma=0.5:3,lr=0.0001:0.003:log'.*new study_name"):
        tune.main(_args(tiny_store, journal, 4, 1, "lr,focal_gamma=0.5:3", lr_max="3e-3"))
    other, _ = ingest("demo", None, tmp_path / "other", folds=2, seed=1, size=120)
    with pytest.raises(SystemExit, match=f"data_digest '{tiny_store.digest}' -> '{other.digest}'"):
        tune.main(_args(other, journal, 4, 1, "lr,focal_gamma=0.5:3"))
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")  # refused before any run
    assert tune.prepare_study(cfg, tiny_store).user_attrs == study.user_attrs  # the same settings reopen it

    # a trial left RUNNING by a process of this host that is gone (this pid, another start time)
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    trial.suggest_float("focal_gamma", 0.5, 3)
    with mlflow.start_run() as run:
        pass
    MlflowClient().update_run(run.info.run_id, status="RUNNING")
    for name, value in {**process_tags(), keys.PROCESS_START: "1.00", keys.TRIAL_RUN_ID: run.info.run_id}.items():
        trial.set_user_attr(name, value)
    # killed between starting its run and recording the run's id: found by its tags
    unnamed = study.ask()
    dead_process = {**process_tags(), keys.PROCESS_START: "2.00"}
    for name, value in dead_process.items():
        unnamed.set_user_attr(name, value)
    with mlflow.start_run(tags={keys.STEP: keys.TUNE, keys.TRIAL: str(unnamed.number), **dead_process}) as lost:
        pass
    MlflowClient().update_run(lost.info.run_id, status="RUNNING")
    alive = study.ask()  # one of this very process: still running, left alone
    for name, value in process_tags().items():
        alive.set_user_attr(name, value)
    tune.recover_dead_trials(study)
    assert study.trials[trial.number].state == study.trials[unnamed.number].state == TrialState.FAIL
    assert study.trials[alive.number].state == TrialState.RUNNING
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"
    assert MlflowClient().get_run(lost.info.run_id).info.status == "FAILED"
    again = {t.user_attrs[tune.RETRY_OF]: t for t in study.get_trials(states=(TrialState.WAITING,))
             if tune.RETRY_OF in t.user_attrs}
    assert again[trial.number].system_attrs["fixed_params"] == study.trials[trial.number].params
    assert set(again) == {trial.number, unnamed.number}
    assert "were left RUNNING by workers that are gone" in capsys.readouterr().out


@pytest.mark.parametrize("space, error", [
    ("backbone=convnext|lunit", "'backbone' cannot be searched"),
    ("focal_gamma=3:1", "empty range"),
    ("augment=flips|wild", r"augment has no value\(s\) \['wild'\]; it takes paper\|flips\|none\|strong"),
    ("augment=0:1", "takes choices"),
    ("lora_rank=2.5:8", "integer field"),
    ("lr=0:1e-3:log", "log range needs lo > 0"),
    ("lr,lr=1e-4:1e-3", "given twice"),
])
def test_a_bad_space_is_one_line_before_any_trial(space, error):
    with pytest.raises(ConfigError, match=error):
        build(tune.TuneConfig, "demo", space=space)


def test_a_space_draws_each_field_as_its_type():
    cfg = build(tune.TuneConfig, "demo",
                space="lr=1e-5:1e-3:log,focal_gamma=0.5:3,lora_rank=4|8|16,augment=flips|strong,epochs=1:3")
    assert [d.name for d in cfg.dimensions] == ["augment", "epochs", "focal_gamma", "lora_rank", "lr"]
    assert cfg.study_name == "augment+epochs+focal_gamma+lora_rank+lr-convnext-demo"
    study = optuna.create_study()
    trial = study.ask()
    train_cfg = tune.trial_config(cfg, {d.name: d.suggest(trial) for d in cfg.dimensions})
    assert train_cfg.augment in ("flips", "strong") and train_cfg.lora_rank in (4, 8, 16)
    assert isinstance(train_cfg.epochs, int) and 1 <= train_cfg.epochs <= 3 and 1e-5 <= train_cfg.lr <= 1e-3
    assert train_cfg.backbone == cfg.backbone and train_cfg.loss == cfg.loss  # nothing else changed
    # the default space is the learning rate alone over tune's lr_min:lr_max
    default = build(tune.TuneConfig, "demo")
    assert [d.text() for d in default.dimensions] == ["lr=0.0001:0.003:log"]
    assert default.study_name == "lr-convnext-demo"


def _dashboard_lists(journal, study_name: str, n_trials: int) -> None:
    """`optuna-dashboard <journal file>` as docs/steps.md says: its app reads the study from the file."""
    import io
    import json

    from optuna_dashboard import wsgi
    app = wsgi(str(journal))

    def get(path: str) -> dict:
        status = []
        body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "x",
                             "SERVER_PORT": "80", "wsgi.input": io.BytesIO(), "wsgi.errors": io.StringIO(),
                             "wsgi.url_scheme": "http"}, lambda s, h, e=None: status.append(s)))
        assert status == ["200 OK"], (path, status, body[:300])
        return json.loads(body)
    [study] = get("/api/studies")["study_summaries"]
    assert study["study_name"] == study_name
    assert len(get(f"/api/studies/{study['study_id']}")["trials"]) == n_trials


def _cheap_study(storage, seed: int, n: int) -> list[float]:
    study = optuna.create_study(study_name="s", storage=tune.open_storage(str(storage)), direction="maximize",
                                load_if_exists=True, sampler=tune.TrialSeededTPE(seed))
    study.optimize(lambda t: -abs(t.suggest_float("lr", 1e-5, 1e-2, log=True) - 1e-3), n_trials=n)
    return [t.params["lr"] for t in study.get_trials()]


def test_the_sampler_is_reproducible_per_seed_and_never_repeats_across_workers(tmp_path):
    """The sampler alone, on a cheap objective past TPE's 10 random start-up trials."""
    first = _cheap_study(tmp_path / "a.log", seed=0, n=14)
    assert _cheap_study(tmp_path / "b.log", seed=0, n=14) == first  # one worker, fixed seed: the same lrs
    assert _cheap_study(tmp_path / "c.log", seed=1, n=3) != first[:3]
    # two workers on one journal, interleaved, both with seed 0 (what TPESampler(seed) per worker repeats)
    workers = [optuna.create_study(study_name="s", storage=tune.open_storage(str(tmp_path / "shared.log")),
                                   direction="maximize", load_if_exists=True, sampler=tune.TrialSeededTPE(0))
               for _ in range(2)]
    for _ in range(7):
        for study in workers:
            trial = study.ask()
            study.tell(trial, -abs(trial.suggest_float("lr", 1e-5, 1e-2, log=True) - 1e-3))
    lrs = [t.params["lr"] for t in workers[0].get_trials()]
    assert len(lrs) == 14 and len(set(lrs)) == 14


def test_a_space_that_mlflow_run_quoted_is_the_same_param(tracking):
    """`mlflow run -P space="lr,augment=flips|strong"` logs the value shell-quoted; the step logs it as resolved."""
    import shlex

    from pipelines.common import log_params
    with mlflow.start_run():
        mlflow.log_param("space", shlex.quote("lr,augment=flips|strong"))
        log_params({"space": "lr,augment=flips|strong"})
        with pytest.raises(ConfigError, match="already has space"):
            log_params({"space": "lr"})
