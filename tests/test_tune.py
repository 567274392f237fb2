"""tune: an Optuna study shared by worker processes, trials as nested MLflow runs, resumable."""
import mlflow
import pytest
from optuna.trial import TrialState

from data_tools.ingest import ingest
from pipelines import tune

DONE = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    store, _ = ingest("demo", None, tmp_path_factory.mktemp("tune") / "demo160", folds=2, seed=0, size=160)
    return store


def _args(store, storage, n_trials, n_workers):
    return ["--data", str(store.path), "--backbone", "convnext", "--n_trials", str(n_trials),
            "--n_workers", str(n_workers), "--storage", str(storage), "--study_name", "lr-test",
            "--folds", "1", "--epochs", "1", "--lr_min", "1e-4", "--lr_max", "1e-2"]


def test_two_workers_share_a_journal_study_and_it_resumes(tracking, tiny_store, tmp_path):
    journal = tmp_path / "journal.log"
    study = tune.main(_args(tiny_store, journal, n_trials=4, n_workers=2))
    trials = study.get_trials(states=DONE)
    # the two workers together did n_trials (one more only if both took the last one at the same instant)
    assert 4 <= len(trials) <= 5 and not study.get_trials(states=(TrialState.RUNNING, TrialState.FAIL))
    numbers = sorted(t.number for t in trials)
    assert all(1e-4 <= t.params["lr"] <= 1e-2 for t in trials)

    [study_run] = mlflow.search_runs(filter_string="tags.step = 'tune' and tags.optuna_study LIKE 'lr-test@%'",
                                     output_format="list")
    trial_runs = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{study_run.info.run_id}'",
                                    output_format="list")
    assert sorted(int(r.data.tags["trial"]) for r in trial_runs) == numbers  # each trial ran once, in MLflow too
    assert {r.data.params["lr"] for r in trial_runs} == {str(t.params["lr"]) for t in trials}
    assert study_run.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert study_run.data.metrics["best_lr"] == pytest.approx(study.best_params["lr"])

    # the same command with more trials extends the same study and the same study run
    study = tune.main(_args(tiny_store, journal, n_trials=len(trials) + 1, n_workers=1))
    assert len(study.get_trials(states=DONE)) == len(trials) + 1
    runs = mlflow.search_runs(filter_string="tags.step = 'tune' and tags.optuna_study LIKE 'lr-test@%'",
                              output_format="list")
    assert [r.info.run_id for r in runs] == [study_run.info.run_id]
    assert mlflow.get_run(study_run.info.run_id).data.metrics["n_trials_done"] == len(trials) + 1
