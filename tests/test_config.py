"""Step configs: one dataclass per step is its command line, its logged params and its profile
keys; one boolean vocabulary; tune's trials are train_cv configs with only lr changed."""
import dataclasses
import sys
from pathlib import Path

import pytest

from analysis import keys
from data_tools.folds import FoldError, parse_fold_list, select_folds
from data_tools.params import parse_flag
from pipelines.config import build, config_class, from_cli
from pipelines.profiles import PROFILES
from pipelines.train_cv import TrainCVConfig, experiment_key, parent_params
from pipelines.tune import TuneConfig, trial_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
STEPS = [s for s in PROFILES["demo"]]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_value_is_a_field_and_every_field_has_a_value(profile):
    for step in STEPS:
        cls = config_class(step)
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(PROFILES[profile][step]) <= fields, step
        required = {f.name: "x" for f in dataclasses.fields(cls) if f.metadata.get("required")}
        cfg = build(cls, profile, **required)  # no field lacks a default
        assert cfg.profile == profile


def test_the_domain_profile_builds_every_step():
    profile = str(ROOT / "profiles" / "domain.yaml")
    for step in STEPS:
        cls = config_class(step)
        build(cls, profile, **{f.name: "x" for f in dataclasses.fields(cls) if f.metadata.get("required")})
    assert (build(config_class(keys.PREPARE_DATA), profile).split, build(TrainCVConfig, profile).epochs) == ("lodo", 4)


def test_the_sota_profile_builds_every_step_on_the_leaderboards_recipe():
    profile = str(ROOT / "profiles" / "sota.yaml")
    for step in STEPS:
        cls = config_class(step)
        build(cls, profile, **{f.name: "x" for f in dataclasses.fields(cls) if f.metadata.get("required")})
    cfg = build(TrainCVConfig, profile)
    assert (cfg.backbone, cfg.finetune, cfg.loss, cfg.augment, cfg.folds) == ("uni2", "lora", "domain_focal", "strong", "all")
    assert cfg.spec().display == "UNI2-h" and cfg.parameter_counts()[1] < cfg.parameter_counts()[0] / 100
    ev = build(config_class(keys.EVALUATE), profile, train_run_id="x", test_data="y")
    assert (ev.threshold, ev.tta) == ("fold_ba", "d4")


def test_the_command_line_is_the_config():
    cfg = from_cli(TrainCVConfig, ["--profile", "paper", "--epochs", "3", "--lr", "1e-3", "--n_synthetic", "balance",
                                   "--restart_epochs", "2"])
    assert (cfg.epochs, cfg.lr, cfg.n_synthetic, cfg.restart_epochs, cfg.augment) == (3, 1e-3, None, 2, "paper")
    with pytest.raises(SystemExit):
        from_cli(TrainCVConfig, ["--epohcs", "3"])  # a typo is an error, not ignored
    with pytest.raises(SystemExit):
        from_cli(TrainCVConfig, ["--epochs", "three"])


def test_restart_epochs_is_settable_and_part_of_the_experiment(demo_store):
    base, other = build(TrainCVConfig, "demo"), build(TrainCVConfig, "demo", restart_epochs=2)
    assert (base.restart_epochs, other.restart_epochs) == (5, 2)
    assert parent_params(other, demo_store)["restart_epochs"] == "2"
    assert experiment_key(base, demo_store) != experiment_key(other, demo_store)
    # fields that may differ between jobs of one experiment do not change its key
    assert experiment_key(base, demo_store) == experiment_key(dataclasses.replace(base, device="cpu", folds="1"),
                                                              demo_store)


def test_a_profile_file_overrides_a_step_and_a_typo_in_it_is_an_error(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("base: paper\ntrain_cv: {epochs: 2, augment: flips}\n")
    cfg = build(TrainCVConfig, str(good))
    assert (cfg.epochs, cfg.augment, cfg.batch_size) == (2, "flips", 16)
    bad = tmp_path / "typo.yaml"
    bad.write_text("base: demo\ntrain_cv: {epohcs: 2}\n")
    with pytest.raises(ValueError, match="epohcs"):
        build(TrainCVConfig, str(bad))


def test_one_flag_vocabulary():
    assert [parse_flag(w) for w in ("true", "Yes", "on", "1", True)] == [True] * 5
    assert [parse_flag(w) for w in ("false", "NO", "off", "0", False)] == [False] * 5
    with pytest.raises(ValueError, match="true, yes, on, 1, false, no, off, 0"):
        parse_flag("maybe", "register")


def test_one_fold_list_parser():
    assert parse_fold_list("all") is None and parse_fold_list("") is None
    assert parse_fold_list("3,1,3") == [1, 3]
    assert select_folds("2, 1", [1, 2, 3]) == [1, 2] and select_folds("all", [1, 2]) == [1, 2]
    for bad in ("1,x", ",", "4"):
        with pytest.raises(FoldError):
            select_folds(bad, [1, 2, 3])


def test_tune_trials_are_train_cvs_config_with_only_the_searched_fields_changed(tmp_path):
    profile = tmp_path / "p.yaml"  # train_cv values must reach the trials: augment, weights, schedule
    profile.write_text("base: demo\ntrain_cv: {augment: paper, pretrained: /weights.safetensors, restart_epochs: 3}\n")
    tune_cfg = build(TuneConfig, str(profile), data="stores/x")
    trial = trial_config(tune_cfg, {"lr": 1.5e-3})
    overrides = {k: v for k, v in PROFILES["demo"][keys.TUNE].items() if k in TrainCVConfig.__dataclass_fields__}
    expected = build(TrainCVConfig, str(profile), data="stores/x", **overrides)
    assert type(trial) is TrainCVConfig and trial.lr == 1.5e-3
    assert dataclasses.replace(trial, lr=expected.lr) == expected
    assert (trial.augment, trial.pretrained, trial.restart_epochs) == ("paper", "/weights.safetensors", 3)


def test_docs_parameters_md_tables_are_generated_from_the_configs():
    import param_tables
    assert param_tables.current((ROOT / "docs" / "parameters.md").read_text()) == param_tables.render(), \
        "docs/parameters.md is out of date: run python scripts/param_tables.py"


def test_report_register_maybe_is_an_error_naming_the_words(capsys):
    from pipelines import report
    with pytest.raises(SystemExit):
        report.main(["--register", "maybe"])
    assert "register must be one of true, yes, on, 1, false, no, off, 0; got 'maybe'" in capsys.readouterr().err


def test_a_value_outside_a_fields_choices_is_an_error(capsys):
    with pytest.raises(SystemExit):
        from_cli(TrainCVConfig, ["--regime", "synth"])
    assert "regime must be one of real_only, synth_balanced; got 'synth'" in capsys.readouterr().err


def test_main_regimes_choose_the_rows_and_whether_the_generator_runs(capsys):
    """regimes=real_only: one row per backbone and no generator chain (nor its demo pool) in the plan."""
    from pipelines.main import MainConfig, planned_steps
    both = build(MainConfig, "demo")
    alone = build(MainConfig, "demo", regimes="real_only")
    assert both.synthetic and not alone.synthetic and alone.regime_list == [keys.REAL_ONLY]
    # demo: 3 stores + 3 generator steps + 4 rows + 4 evaluations + report; real-only: 2 stores + 2 + 2 + report
    assert (planned_steps(both), planned_steps(alone)) == (15, 7)
    with pytest.raises(SystemExit):
        from_cli(MainConfig, ["--regimes", "real_only,synth"])
    assert "regimes='real_only,synth': give one or more of real_only,synth_balanced" in capsys.readouterr().err
