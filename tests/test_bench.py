"""The GPU benchmark runs on a CPU with --quick (so it cannot rot before a GPU is lent), and
prints and writes the figures a user reads before a run."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.mark.slow
def test_bench_gpu_quick_prints_rates_and_projections(tmp_path, capsys):
    import bench_gpu
    figures = bench_gpu.main(["--quick", "--device", "cpu", "--json", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    assert "img/s" in out and "Table 1 grid" in out and "generator fine-tuning" in out and "cold start" in out
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["projections"]["table1_grid_s"] == figures["projections"]["table1_grid_s"] > 0
    assert all(r["images_per_s"] > 0 and 0 <= r["data_path_share"] < 1 for r in saved["classifier"])
    assert [s["sampler"] for s in saved["sampling"]] == ["ddpm", "dpmsolver++"]
    assert saved["predict"]["crops"] == 16 and saved["generator_finetune"]["dit"]["images_per_s"] > 0


@pytest.mark.slow  # three modes of a model trained: ~3-4 s
def test_bench_finetune_counts_what_each_mode_trains(capsys):
    import bench_finetune
    rows = {r["mode"]: r for r in bench_finetune.main(["--steps", "2", "--batch", "8", "--threads", "1"])}
    assert rows["full"]["n_trainable_params"] == rows["full"]["n_params"]
    assert 0 < rows["linear"]["n_trainable_params"] < rows["lora"]["n_trainable_params"] < rows["lora"]["n_params"] / 10
    assert all(r["images_per_s"] > 0 for r in rows.values()) and "x full" in capsys.readouterr().out
