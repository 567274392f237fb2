"""Bad input gives a clear one-line error before any work, never a partial answer: a folder that
mixes stacks and crops, an output that cannot be written, an option a source does not know, an
ingest that would leave an empty store, an empty test store."""

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from data_tools.adapters.base import AdapterError
from data_tools.ingest import ingest
from data_tools.inputs import InputError, load_inputs
from data_tools.store import write_store
from pipelines import predict, prepare_data
from pipelines.config import build
from pipelines.evaluate import EvaluateConfig, run_evaluate

RNG = np.random.default_rng(0)


def _crops(n: int) -> np.ndarray:
    return RNG.integers(0, 255, (n, 128, 128, 3), dtype=np.uint8)


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
