"""Bad input gives a clear one-line error before any work, never a partial answer: a folder that
mixes stacks and crops, an output that cannot be written, an option a source does not know, an
ingest that would leave an empty store, an empty test store."""

import os

import mlflow
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from conftest import shared_data
from data_tools.adapters.base import AdapterError
from data_tools.ingest import ingest
from data_tools.inputs import InputError, load_inputs
from data_tools.store import open_store, write_store
from pipelines import predict, prepare_data
from pipelines.config import build
from pipelines.evaluate import EvaluateConfig, run_evaluate

RNG = np.random.default_rng(0)


def _crops(n: int) -> np.ndarray:
    return RNG.integers(0, 255, (n, 128, 128, 3), dtype=np.uint8)


def _index(n: int) -> pd.DataFrame:
    return pd.DataFrame({"sample_id": [f"c{i}" for i in range(n)], "label": 0, "domain": "d", "group": "g",
                         "source": "t", "fold": -1})


def test_a_folder_with_stacks_and_crops_is_refused_not_half_read(tmp_path):
    tifffile.imwrite(tmp_path / "stack_1.tiff", _crops(4), photometric="rgb")
    for i in range(3):
        Image.fromarray(_crops(1)[0]).save(tmp_path / f"crop_{i}.png")
    with pytest.raises(InputError, match="holds platform stacks and 3 crop image"):
        load_inputs(tmp_path)
    (tmp_path / "crops").mkdir()
    for i in range(3):
        (tmp_path / f"crop_{i}.png").rename(tmp_path / "crops" / f"crop_{i}.png")
    assert len(load_inputs(tmp_path)) == 4  # stacks alone: every page


@pytest.mark.parametrize("output, why", [("out.parquet", "must end in .json"), ("out.txt", "must end in .json"),
                                         ("folder.json", "is a folder")])
def test_an_output_that_cannot_be_written_stops_predict_before_any_work(tmp_path, capsys, output, why):
    tifffile.imwrite(tmp_path / "stack.tiff", _crops(2), photometric="rgb")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(SystemExit, match=why):  # before the (missing) model is even looked at
        predict.main(["--model", str(tmp_path / "no_model"), "--input", str(tmp_path / "stack.tiff"),
                      "--output", str(tmp_path / output)])
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "out.parquet").exists()


def test_an_option_the_source_does_not_know_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare_data.main(["--source", "demo", "--bogus", "1", "--out", str(tmp_path / "s")])
    assert "source 'demo' has no option(s) ['bogus']; its options: size" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_an_ingest_that_leaves_no_crop_writes_no_store(tmp_path):
    root = tmp_path / "raw"
    (root / "Atypical").mkdir(parents=True)
    (root / "Normal").mkdir()
    with pytest.raises(AdapterError, match="no crops found; an empty store is not written"):
        ingest("folder", str(root), tmp_path / "empty", folds=0)
    (root / "Normal" / "a.png").write_bytes(b"not a png")
    (root / "Normal" / "b.png").write_bytes(b"")
    with pytest.raises(AdapterError, match=r"all 2 rows were skipped.*cannot decode image"):
        ingest("folder", str(root), tmp_path / "empty", folds=0, on_error="skip")
    with pytest.raises(SystemExit, match="prepare_data: source 'folder' .* all 2 rows were skipped"):
        prepare_data.main(["--source", "folder", "--root", str(root), "--folds", "0", "--on_error", "skip",
                           "--out", str(tmp_path / "empty")])
    assert not (tmp_path / "empty").exists()


def test_evaluate_refuses_an_empty_test_store(tmp_path):
    index = pd.DataFrame({c: pd.Series(dtype=t) for c, t in (("sample_id", str), ("label", int), ("domain", str),
                                                              ("group", str), ("source", str), ("fold", int))})
    empty = write_store(tmp_path / "empty", np.zeros((0, 128, 128, 3), np.uint8), index, name="empty", adapter="t")
    with pytest.raises(ValueError, match="holds no crops"):
        run_evaluate(build(EvaluateConfig, "demo", train_run_id="0" * 32, test_data=str(empty.path)))


def _stack_bytes(tmp_path, pages: np.ndarray, **kw) -> bytes:
    tifffile.imwrite(tmp_path / "whole.tiff", pages, photometric="rgb", **kw)
    return (tmp_path / "whole.tiff").read_bytes()


@pytest.mark.parametrize("kept", [0.1, 0.33, 0.5, 0.9, 0.999])
def test_a_truncated_stack_is_an_error_naming_file_and_page_not_fewer_answers(tmp_path, kept):
    (tmp_path / "in").mkdir()
    whole = _stack_bytes(tmp_path, _crops(16), metadata=None)  # no page count in it, like the platform's
    cut = tmp_path / "in" / "stack_1.tiff"
    cut.write_bytes(whole[:int(len(whole) * kept)])
    with pytest.raises(InputError, match=r"stack_1.tiff.*truncated or corrupt TIFF.*page \d+"):
        load_inputs(tmp_path / "in")
    with pytest.raises(SystemExit, match=r"stack_1.tiff.*truncated"):
        prepare_data.main(["--source", "gc_stack", "--root", str(cut), "--folds", "0", "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()


def test_the_real_platform_stack_cut_anywhere_is_refused(tmp_path):
    whole = shared_data("gc_interface", "stack_5.tiff").read_bytes()
    cut = tmp_path / "stack_5.tiff"
    for end in range(1000, len(whole) - 100, 48_611):  # 15 cuts over the file, between and inside pages
        cut.write_bytes(whole[:end])
        with pytest.raises(InputError, match="stack_5.tiff"):
            load_inputs(cut)


def test_a_page_count_promised_by_the_metadata_is_checked(tmp_path):
    whole = _stack_bytes(tmp_path, _crops(6))  # tifffile records shape [6, 128, 128, 3]
    with tifffile.TiffFile(tmp_path / "whole.tiff") as tif:
        first_page_end = tif.pages[1].offset  # keep page 0 whole, then end the chain after it
    data = bytearray(whole[:first_page_end])
    with tifffile.TiffFile(tmp_path / "whole.tiff") as tif:
        at = tif.pages[0].offset + 2 + len(tif.pages[0].tags) * 12
    data[at:at + 4] = b"\0\0\0\0"  # a well-formed one-page file whose metadata says 6
    (tmp_path / "one.tiff").write_bytes(bytes(data))
    with pytest.raises(InputError, match="metadata promises 6 pages, the file holds 1"):
        load_inputs(tmp_path / "one.tiff")


def test_planar_rgb_pages_read_as_the_same_crops(tmp_path):
    crops = _crops(3)
    tifffile.imwrite(tmp_path / "planar.tiff", np.moveaxis(crops, -1, 1), photometric="rgb", planarconfig="separate")
    assert np.array_equal(load_inputs(tmp_path / "planar.tiff").images, crops)


def test_16_bit_crops_are_refused_the_same_way_by_ingest_and_predict(tmp_path):
    """Pillow reads 16-bit RGB PNGs and TIFFs as 8 bits without a word; both readers refuse them."""
    import imagecodecs
    deep = _crops(1)[0].astype(np.uint16) * 257
    root = tmp_path / "raw"
    for cls in ("Atypical", "Normal"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(_crops(1)[0]).save(root / cls / f"ok_{cls}.png")
    (root / "Normal" / "deep_png.png").write_bytes(imagecodecs.png_encode(deep))
    tifffile.imwrite(root / "Normal" / "deep_tiff.tiff", deep, photometric="rgb")
    store, skipped = ingest("folder", str(root), tmp_path / "s", folds=0, on_error="skip")
    assert len(store) == 2 and len(skipped) == 2 and skipped["reason"].str.contains("16-bit image, expected 8-bit").all()
    for name in ("deep_png.png", "deep_tiff.tiff"):
        (tmp_path / "crops").mkdir(exist_ok=True)
        (tmp_path / "crops" / name).write_bytes((root / "Normal" / name).read_bytes())
        with pytest.raises(InputError, match=f"{name}.*16-bit image"):
            load_inputs(tmp_path / "crops")
        (tmp_path / "crops" / name).unlink()
    tifffile.imwrite(tmp_path / "deep_stack.tiff", np.stack([deep, deep]), photometric="rgb")
    with pytest.raises(InputError, match="deep_stack.tiff page 0: 16-bit image"):
        load_inputs(tmp_path / "deep_stack.tiff")


def _demo_args(out, *extra) -> list[str]:
    return ["--source", "demo", "--size", "60", "--folds", "0", "--out", str(out), *extra]


@pytest.mark.slow  # three prepare_data runs: ~4-7 s
def test_an_existing_store_is_replaced_only_when_asked_and_in_one_step(tmp_path, tracking):
    out = tmp_path / "stores" / "s"
    first = prepare_data.main(_demo_args(out, "--seed", "1"))
    with pytest.raises(SystemExit, match=r"s already exists, a store \(60 crops, digest .*give overwrite=true"):
        prepare_data.main(_demo_args(out, "--seed", "2"))
    assert open_store(out).digest == first.digest  # untouched
    second = prepare_data.main(_demo_args(out, "--seed", "2", "--overwrite", "true"))
    assert second.digest != first.digest and open_store(out).digest == second.digest
    assert [p.name for p in out.parent.iterdir()] == ["s"]  # nothing left beside it


def test_a_kill_during_a_replacement_leaves_the_old_or_the_new_store_never_none(tmp_path, monkeypatch):
    import subprocess
    import sys
    from data_tools import atomic
    out = tmp_path / "s"
    old = write_store(out, _crops(2), _index(2), name="s", adapter="t")

    class Killed(BaseException):
        pass

    def killed(*_, **__):
        raise Killed
    # atomic exchange: once the names are swapped the new store is in place; a kill then only leaves the old copy
    monkeypatch.setattr(atomic.shutil, "rmtree", killed)
    with pytest.raises(Killed):
        write_store(out, _crops(3), _index(3), name="s", adapter="t")
    monkeypatch.undo()
    assert len(open_store(out)) == 3
    # without kernel support: two renames; a kill between them leaves `out` missing and the old one aside ...
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_replace = atomic.os.replace

    def replace(a, b):
        if b == out:  # the second rename: the new store into place
            raise Killed
        real_replace(a, b)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(Killed):
        write_store(out, _crops(4), _index(4), name="s", adapter="t")
    monkeypatch.undo()
    assert not out.exists()
    # ... which the next writer's start restores once the writer that left it is gone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = next(tmp_path.glob(".s.old-*"))
    aside.rename(aside.with_name(aside.name.replace(f"-{os.getpid()}-", f"-{dead.stdout.strip()}-")))
    stray = tmp_path / f".s.tmp-{atomic._HOST}-{dead.stdout.strip()}-0123abcd"
    stray.mkdir()
    done = atomic.clean_leftovers(out)
    assert len(open_store(out)) == 3 and not stray.exists() and len(done) == 2, done
    assert old.digest != open_store(out).digest


@pytest.mark.slow
def test_a_killed_ingest_leaves_a_failed_run_and_its_leftovers_are_removed_at_the_next_start(tmp_path, tracking, step_env):
    import signal
    import subprocess
    import sys
    import time
    from mlflow.tracking import MlflowClient
    from conftest import ROOT
    out = tmp_path / "s"
    env = step_env(MLFLOW_EXPERIMENT_NAME="test")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        job = subprocess.Popen([sys.executable, "-m", "pipelines.prepare_data", *_demo_args(out, "--size", "4000")],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while not list(tmp_path.glob(".s.scratch-*")) and time.time() < deadline and job.poll() is None:
            time.sleep(0.05)  # the ingest has begun (inside the run)
        job.send_signal(sig)
        job.communicate(timeout=60)
        assert not out.exists()
        if sig == signal.SIGTERM:  # unwinds: the run is FAILED, the scratch folder gone
            assert [r.info.status for r in MlflowClient().search_runs([mlflow.get_experiment_by_name("test").experiment_id])] \
                == ["FAILED"]
            assert not list(tmp_path.glob(".s.*"))
    assert list(tmp_path.glob(".s.scratch-*"))  # SIGKILL: nothing could tidy up ...
    prepare_data.main(_demo_args(out))  # ... until the next start
    assert not list(tmp_path.glob(".s.*")) and len(open_store(out)) == 60


@pytest.mark.slow
def test_user_errors_end_in_one_line_and_debug_shows_the_traceback(tmp_path, tracking, monkeypatch, step_env):
    import subprocess
    import sys
    from conftest import ROOT
    cmd = [sys.executable, "-m", "pipelines.evaluate", "--train_run_id", "0" * 32, "--test_data", str(tmp_path / "none")]
    env = step_env()
    quiet = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith("evaluate: ") and "none" in quiet.stderr
    (tmp_path / "raw" / "Normal").mkdir(parents=True)
    (tmp_path / "raw" / "Normal" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"^prepare_data: .*bad.png: cannot decode image"):
        prepare_data.main(["--source", "folder", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "s")])
    with pytest.raises(AdapterError):  # --debug: the exception itself, for a traceback
        prepare_data.main(["--source", "folder", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "s"), "--debug"])
    monkeypatch.setenv("MITOCLASS_DEBUG", "1")
    with pytest.raises(AdapterError):
        prepare_data.main(["--source", "folder", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "s")])


def test_skips_that_empty_a_class_are_named_in_the_fold_error_and_skipped_csv_is_logged(tmp_path, tracking):
    from mlflow.tracking import MlflowClient
    root = tmp_path / "raw"
    for cls, n in (("Normal", 12), ("Atypcal", 6)):  # a misspelt class folder, skipped whole
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_crops(1)[0]).save(root / cls / f"{cls}_{i}.png")
    with pytest.raises(SystemExit, match=r"note: 1 rows were skipped \(1 x unknown class folder.*see skipped.csv"):
        prepare_data.main(["--source", "folder", "--root", str(root), "--folds", "3", "--on_error", "skip",
                           "--out", str(tmp_path / "s")])
    run = MlflowClient().search_runs([mlflow.get_experiment_by_name("test").experiment_id])[0]
    assert run.info.status == "FAILED"
    skipped = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="skipped.csv"))
    assert skipped["item"].str.endswith("Atypcal").tolist() == [True]


def test_steps_with_nothing_to_work_on_yet_name_the_command_that_makes_it(tmp_path, tracking):
    """A fresh clone: nothing trained, nothing registered. Each step says in one line what makes its input."""
    from pipelines import evaluate, report
    with pytest.raises(SystemExit, match=r"^report: no finished train_cv run in experiment .* yet: .*"
                                         r"`mlflow run \. -e train_cv"):
        report.main([])
    with pytest.raises(SystemExit, match=r"^evaluate: no train_run_id given: .* there is none yet: make one with "
                                         r"`mlflow run \. -e train_cv"):
        evaluate.main([])
    with pytest.raises(SystemExit, match=r"^evaluate: no test_data given: .*`mlflow run \. -e prepare_data"):
        evaluate.main(["--profile", "paper", "--train_run_id", "0" * 32])
    crops = tmp_path / "crops"
    crops.mkdir()
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(crops / "a.png")
    with pytest.raises(SystemExit, match=r"^predict: models:/atypical-mitosis-classifier@submission: .*"
                                         r"`mlflow run \. -e report` registers the submission model"):
        predict.main(["--input", str(crops), "--output", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists() and not mlflow.search_runs(search_all_experiments=True).shape[0]
