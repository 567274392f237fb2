"""Inference as the platform runs it: stacks in, the platform JSON out (entries in page order,
keys exactly class/confidence, float confidences, classes at the model's threshold); the
container's own command on an exported model; CSV output; bad input fails naming the file;
TTA modes (d4 = the mean over the 8 dihedral views)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from analysis import keys
from analysis.queries import train_rows
from analysis.runs import experiment_ids
from analysis.submission import SelectionError, log_ensemble_model
from data_tools.augment import preprocess
from data_tools.demo import make_demo
from data_tools.errors import ConfigError
from data_tools.inputs import PLATFORM_INPUT, PLATFORM_OUTPUT, read_stack
from data_tools.store import write_store
from models.checkpoint import load_checkpoint
from models.classifier import predict_logits
from models.ensemble import FoldEnsemble
from pipelines import predict

from conftest import ROOT, shared_data


def write_stack(path: Path, images: np.ndarray) -> Path:
    tifffile.imwrite(path, images, photometric="rgb", compression="zlib")
    return path


def log_threshold(train_run_id: str, threshold: float) -> None:
    with mlflow.start_run(tags={keys.STEP: keys.EVALUATE, keys.TEST_SET: "t"}):
        mlflow.log_params({keys.P_TRAIN_RUN_ID: train_run_id, keys.P_THRESHOLD: str(threshold)})
        mlflow.log_metrics({keys.test_metric(m): 0.5 for m in keys.TEST_METRICS})


def check_platform_json(path: Path, expected_prob: np.ndarray, threshold: float) -> list[dict]:
    entries = json.loads(path.read_text())
    assert isinstance(entries, list) and len(entries) == len(expected_prob)
    for entry, p in zip(entries, expected_prob):
        assert set(entry) == {"class", "confidence"}
        assert isinstance(entry["confidence"], float) and 0.0 <= entry["confidence"] <= 1.0
        assert entry["confidence"] == pytest.approx(float(p), abs=1e-6)  # page order kept
        assert entry["class"] == ("atypical" if entry["confidence"] >= threshold else "normal")
    return entries


def test_stack_5_from_a_train_run(tiny_train_run, tiny_checkpoints, tmp_path):
    stack_dir = shared_data("gc_interface")
    pages = read_stack(stack_dir / "stack_5.tiff")
    expected = FoldEnsemble.from_dirs(tiny_checkpoints).predict_proba(pages)
    threshold = float(np.median(expected))  # both classes appear
    log_threshold(tiny_train_run, threshold)
    out = predict.main(["--model", tiny_train_run, "--input", str(stack_dir), "--output", str(tmp_path / "out.json")])
    entries = check_platform_json(out, expected, threshold)
    assert len(entries) == 16 and {e["class"] for e in entries} == {"atypical", "normal"}


@pytest.mark.slow
def test_the_containers_command_on_an_exported_model(tiny_train_run, tiny_checkpoints, tmp_path):
    # the report's registration, then the build script's export
    client = MlflowClient()
    rows, _ = train_rows(client, experiment_ids(client, "test"))
    images, _ = make_demo(19, seed=5)
    expected = FoldEnsemble.from_dirs(tiny_checkpoints).predict_proba(images)
    threshold = float(np.median(expected))
    with mlflow.start_run(tags={keys.STEP: keys.REPORT}):
        version = log_ensemble_model(rows[0], threshold)
    assert client.get_model_version_by_alias(keys.MODEL_NAME, keys.SUBMISSION_ALIAS).version == version.version
    model_dir = predict.main(["--model", f"models:/{keys.MODEL_NAME}@{keys.SUBMISSION_ALIAS}",
                              "--export", str(tmp_path / "docker" / "model")])

    # two stacks as the platform mounts them; natural order: stack_2 before stack_10
    inputs = tmp_path / "input" / "images" / "stacked-histopathology-roi-cropouts"
    inputs.mkdir(parents=True)
    write_stack(inputs / "stack_10.tiff", images[3:])
    write_stack(inputs / "stack_2.tiff", images[:3])
    output = tmp_path / "output" / "multiple-mitotic-figure-classification.json"

    # the Dockerfile's ENTRYPOINT + CMD, with the container's paths mapped to this test's folders
    dockerfile = (ROOT / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    mapping = {"/opt/app/model": str(model_dir), PLATFORM_INPUT: str(inputs), PLATFORM_OUTPUT: str(output)}
    assert set(mapping) <= set(cmd)
    argv = [sys.executable] + entrypoint[1:] + [mapping.get(a, a) for a in cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # no tracking in the container
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'unused.db'}")
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    check_platform_json(output, expected, threshold)
    assert not (tmp_path / "unused.db").exists()  # inference never touched a tracking store


def test_csv_from_a_store_and_from_a_folder(tiny_train_run, tiny_checkpoints, tmp_path):
    images, index = make_demo(5, seed=9)
    store = write_store(tmp_path / "store", images, index, name="five", adapter="demo")
    expected = FoldEnsemble.from_dirs(tiny_checkpoints).predict_proba(images, tta="d4")
    out = predict.main(["--model", tiny_train_run, "--input", str(store.path), "--output", str(tmp_path / "p.csv"),
                        "--tta", "d4"])
    df = pd.read_csv(out)
    assert list(df.columns) == ["id", "probability", "class"]
    assert df["id"].tolist() == index["sample_id"].tolist()
    assert df["probability"].to_numpy() == pytest.approx(expected, abs=1e-6)
    assert (df["class"] == np.where(df["probability"] >= 0.5, "atypical", "normal")).all()  # no evaluate run: 0.5

    folder = tmp_path / "crops"
    folder.mkdir()
    for i in (10, 2, 1):  # natural order: 1, 2, 10
        Image.fromarray(images[i % 5]).save(folder / f"crop_{i}.png")
    df = pd.read_csv(predict.main(["--model", tiny_train_run, "--input", str(folder), "--output", str(tmp_path / "f.csv")]))
    assert df["id"].tolist() == ["crop_1.png", "crop_2.png", "crop_10.png"]


def test_bad_inputs_fail_naming_the_file(tmp_path):
    rgb = make_demo(2, seed=1)[0]
    cases = {
        "garbage.tiff": lambda p: p.write_bytes(b"II*\x00 a TIFF header, then nothing"),
        "text.tif": lambda p: p.write_text("not an image at all"),
        "small.tiff": lambda p: write_stack(p, rgb[:, :64, :64]),
        "grey.tiff": lambda p: tifffile.imwrite(p, rgb[..., 0]),
    }
    expectations = {"garbage.tiff": "not a readable TIFF", "text.tif": "not a readable TIFF", "small.tiff": "size 64x64, expected 128x128",
                    "grey.tiff": "expected RGB"}
    for name, make in cases.items():
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        write_stack(folder / "a_good.tiff", rgb)  # one good stack does not save the job: all-or-nothing
        make(folder / name)
        out = tmp_path / f"{name}.json"
        with pytest.raises(SystemExit, match=re.escape(str(folder / name)) + ".*" + expectations[name]):
            predict.main(["--model", "unused", "--input", str(folder), "--output", str(out)])
        assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=f"{empty}: no crop images"):
        predict.main(["--model", "unused", "--input", str(empty), "--output", str(tmp_path / "e.json")])
    with pytest.raises(SystemExit, match="input not found"):
        predict.main(["--model", "unused", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "n.json")])


def test_d4_tta_is_the_mean_over_the_eight_dihedral_views(tiny_checkpoints):
    model, spec, _ = load_checkpoint(tiny_checkpoints[0])
    with torch.no_grad():  # a random init's logits barely move with the view: scale them to order 1
        [head for head in model.modules() if isinstance(head, torch.nn.Linear)][-1].weight.mul_(1000)
    cpu = torch.device("cpu")
    images = make_demo(3, seed=4)[0]

    def logits(crops: np.ndarray, tta) -> torch.Tensor:
        with torch.inference_mode():
            return predict_logits(model, spec, torch.from_numpy(np.ascontiguousarray(crops)), cpu, tta)

    x = preprocess(torch.from_numpy(images), spec.input_size, spec.mean, spec.std, cpu)
    views = [torch.rot90(x.flip(-1) if mirror else x, k, dims=(-2, -1)) for mirror in (False, True) for k in range(4)]
    assert len({v.numpy().tobytes() for v in views}) == 8
    with torch.inference_mode():
        direct = torch.stack([model(v).reshape(-1) for v in views]).mean(0)
    d4 = logits(images, "d4")
    torch.testing.assert_close(d4, direct, atol=1e-4, rtol=0)
    # the group average does not change when the crop is turned or mirrored; one view or the flips do
    for turned in (np.rot90(images, 1, axes=(1, 2)), images[:, :, ::-1], np.rot90(images, 3, axes=(1, 2))):
        torch.testing.assert_close(logits(turned, "d4"), d4, atol=1e-4, rtol=0)
    turned = np.rot90(images, 1, axes=(1, 2))
    for fewer in ("none", "flips"):  # the four flips hold no 90-degree turn
        assert (logits(turned, fewer) - logits(images, fewer)).abs().max() > 0.05
    # a crop with the square's symmetries: all 8 views are the same image, so d4 = no TTA
    yy, xx = np.mgrid[:128, :128] - 63.5
    ring = (127 + 120 * np.cos(np.hypot(yy, xx) / 6)).astype(np.uint8)
    symmetric = np.stack([ring, ring // 2, 255 - ring], -1)[None]
    torch.testing.assert_close(logits(symmetric, "d4"), logits(symmetric, "none"), atol=1e-4, rtol=0)
    # flips are the old TTA, and the old boolean still means them
    torch.testing.assert_close(logits(images, True), logits(images, "flips"), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="none, flips, d4"):
        logits(images, "d8")


def test_fold_thresholds_must_name_the_rows_folds(tiny_train_run):
    client = MlflowClient()
    rows, _ = train_rows(client, experiment_ids(client, "test"))
    with mlflow.start_run(tags={keys.STEP: keys.REPORT}), pytest.raises(SelectionError, match=r"folds \[1\]"):
        log_ensemble_model(rows[0], 0.5, fold_thresholds={1: 0.3})
