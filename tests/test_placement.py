"""Every GPU of a node: fold jobs and main's side-by-side steps placed round-robin through
CUDA_VISIBLE_DEVICES, on fake GPUs (a device count given to pipelines/placement.py)."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from analysis import keys
from data_tools.errors import ConfigError
from pipelines import launch as launch_module
from pipelines import placement
from pipelines.fold_jobs import FOLD_JOB_PARENT, plan_fold_jobs
from pipelines.main import Workflow, side_by_side
from pipelines.placement import VISIBLE, Slots, device_tag, gpus


@pytest.fixture
def no_visible_devices(monkeypatch):
    monkeypatch.delenv(VISIBLE, raising=False)


def test_five_fold_jobs_on_two_fake_gpus_go_round_robin(tmp_path, no_visible_devices):
    on = gpus("auto", count=2)
    jobs = plan_fold_jobs({"backbone": "convnext"}, [1, 2, 3, 4, 5], 5, "parent-run", "0", tmp_path, on)
    assert [(j.folds, j.env[VISIBLE]) for j in jobs] == [([1], "0"), ([2], "1"), ([3], "0"), ([4], "1"), ([5], "0")]
    assert all(j.env[FOLD_JOB_PARENT] == "parent-run" for j in jobs)
    # three folds on two GPUs: the third shares GPU 0; on a CPU nothing is placed
    assert [j.env[VISIBLE] for j in plan_fold_jobs({}, [1, 2, 3], 5, "p", "0", tmp_path, on)] == ["0", "1", "0"]
    assert all(VISIBLE not in j.env for j in plan_fold_jobs({}, [1, 2], 2, "p", "0", tmp_path, gpus(count=0)))


def test_two_side_by_side_steps_of_main_get_one_fake_gpu_each(tracking, monkeypatch, no_visible_devices):
    """Workflow.step as main calls it, two at a time (jobs=auto on 2 GPUs): each child's environment
    names its own GPU; a third step started later goes to the GPU that is free."""
    seen, lock = {}, threading.Lock()

    def child(command, cwd, env, stdout, stderr):  # the step's process, as launch starts it
        with lock:
            seen[command[command.index("--out") + 1]] = env.get(VISIBLE)
        time.sleep(0.5)  # both steps run at once
        return 0
    monkeypatch.setattr(launch_module.subprocess, "call", child)
    client = MlflowClient()
    exp = client.get_experiment_by_name("test").experiment_id
    on = gpus("auto", count=2)
    jobs = side_by_side("auto", on)
    flow = Workflow("demo", parent_run_id="workflow", experiment_id=exp, client=client, slots=Slots(on),
                    logs=Path("logs"))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda out: flow.step(keys.PREPARE_DATA, label=f"prepare {out}", out=out), ["a", "b"]))
    flow.step(keys.PREPARE_DATA, label="prepare c", out="c")
    assert jobs == 2 and {seen["a"], seen["b"]} == {"0", "1"} and seen["c"] == "0"  # both free again: the first


def test_devices_lists_and_the_inherited_allocation(monkeypatch, no_visible_devices):
    assert gpus("0,1,3", count=4) == ["0", "1", "3"]
    assert gpus("auto", device="cpu", count=2) == [] and gpus("auto", count=0) == []
    with pytest.raises(ConfigError, match="sees 2 GPU"):
        gpus("0,2", count=2)
    monkeypatch.setenv(VISIBLE, "4,6")  # e.g. a Slurm allocation: jobs get the physical ids
    assert gpus("auto", count=2) == ["4", "6"] and gpus("1", count=2) == ["6"]
    monkeypatch.setenv(VISIBLE, "6")
    assert device_tag(torch.device("cuda", 0)) == "gpu 6" and device_tag(torch.device("cpu")) == "cpu"
    assert side_by_side("auto", ["0", "1", "2", "3"]) == 4 and side_by_side("auto", []) == 2
    assert side_by_side("3", []) == 3


def test_slots_give_the_least_busy_gpu():
    slots = Slots(["0", "1"])
    a, b, c = slots.take(), slots.take(), slots.take()
    slots.give(b)
    assert (a, b, c, slots.take()) == ("0", "1", "0", "1")
    assert placement.round_robin(3, []) == [None, None, None]


def test_bench_gpu_projects_the_grid_on_one_to_eight_gpus():
    """Four rows (real, synth per backbone): on one node a row per GPU (its folds side by side), on Slurm a
    fold per job; past four GPUs a node has no row left to place, a cluster still spreads the folds."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_gpu import FOLDS, on_gpus
    rows = {"a real": 10.0, "a synth": 20.0, "b real": 30.0, "b synth": 40.0}
    grid = on_gpus(rows, overlap=2.0)
    assert grid["node"] == {1: 50.0, 2: 25.0, 4: 20.0, 8: 20.0}
    assert grid["slurm"][1] == 100.0 and 100.0 / 8 <= grid["slurm"][8] < 40.0 / FOLDS * 2  # 20 folds on 8 GPUs
