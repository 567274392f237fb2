"""tune: an Optuna study shared by worker processes, trials as nested MLflow runs (train_cv configs
with only lr changed), resumable; workers never repeat each other's learning rates."""
import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from analysis import keys
from data_tools.ingest import ingest
from pipelines import tune
from pipelines.config import build
from pipelines.train_cv import parent_params

DONE = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    store, _ = ingest("demo", None, tmp_path_factory.mktemp("tune") / "demo160", folds=2, seed=0, size=160)
    return store


def _args(store, storage, n_trials, n_workers):
    return ["--data", str(store.path), "--backbone", "convnext", "--n_trials", str(n_trials),
            "--n_workers", str(n_workers), "--storage", str(storage), "--study_name", "lr-test",
            "--folds", "1", "--epochs", "1", "--lr_min", "1e-4", "--lr_max", "1e-2"]


@pytest.mark.slow
def test_two_workers_share_a_journal_study_and_it_resumes(tracking, tiny_store, tmp_path):
    journal = tmp_path / "journal.log"
    study = tune.main(_args(tiny_store, journal, n_trials=4, n_workers=2))
    trials = study.get_trials(states=DONE)
    # the two workers together did n_trials (one more only if both took the last one at the same instant)
    assert 4 <= len(trials) <= 5 and not study.get_trials(states=(TrialState.RUNNING, TrialState.FAIL))
    numbers = sorted(t.number for t in trials)
    assert all(1e-4 <= t.params["lr"] <= 1e-2 for t in trials)
    assert len({t.params["lr"] for t in trials}) == len(trials)  # the two workers never drew the same lr

    [study_run] = mlflow.search_runs(filter_string="tags.step = 'tune' and tags.optuna_study LIKE 'lr-test@%'",
                                     output_format="list")
    trial_runs = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{study_run.info.run_id}'",
                                    output_format="list")
    assert sorted(int(r.data.tags["trial"]) for r in trial_runs) == numbers  # each trial ran once, in MLflow too
    assert {r.data.params["lr"] for r in trial_runs} == {str(t.params["lr"]) for t in trials}
    # a trial logs what a train_cv parent logs, with the profile's train_cv values (augment, weights)
    trial_cfg = tune.trial_config(build(tune.TuneConfig, "demo", data=str(tiny_store.path), folds="1", epochs=1), 1e-3)
    for r in trial_runs:
        assert set(parent_params(trial_cfg, tiny_store)) <= set(r.data.params)
        assert (r.data.params[keys.P_AUGMENT], r.data.params[keys.P_PRETRAINED]) == ("flips", "none")
    assert study_run.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert study_run.data.metrics["best_lr"] == pytest.approx(study.best_params["lr"])
    figures = {f.path for f in MlflowClient().list_artifacts(study_run.info.run_id, keys.STUDY_FIGURES_DIR)}
    assert figures == {f"{keys.STUDY_FIGURES_DIR}/optuna_history.png", f"{keys.STUDY_FIGURES_DIR}/optuna_slice_lr.png"}
    assert study_run.data.tags[keys.DESCRIPTION].startswith("tune: ")
    _dashboard_lists(journal, "lr-test", len(trials))

    # the same command with more trials extends the same study and the same study run
    study = tune.main(_args(tiny_store, journal, n_trials=len(trials) + 1, n_workers=1))
    assert len(study.get_trials(states=DONE)) == len(trials) + 1
    lrs = [t.params["lr"] for t in study.get_trials(states=DONE)]
    assert len(set(lrs)) == len(lrs)  # the resumed study did not repeat an earlier trial
    runs = mlflow.search_runs(filter_string="tags.step = 'tune' and tags.optuna_study LIKE 'lr-test@%'",
                              output_format="list")
    assert [r.info.run_id for r in runs] == [study_run.info.run_id]
    assert mlflow.get_run(study_run.info.run_id).data.metrics["n_trials_done"] == len(trials) + 1


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
