"""What the paper's runs will cost on this machine, measured before starting them.

    python scripts/bench_gpu.py                 # on the GPU: the paper's configurations (< 8 min)
    python scripts/bench_gpu.py --quick         # on a CPU: the demo's small models, a few steps (CI runs it)

Measures images/s (and the share of a training step spent in the data path outside
forward/backward), peak GPU memory and GPU utilisation of: classifier training (ConvNeXt-S
128 px batch 16; Lunit ViT-S/8 224 px batch 16), the generator's VAE and DiT training steps,
sampling (DDPM 1,000 steps vs DPM-Solver++ 20, per image) and `predict` on a 16-crop platform
stack from a cold start (a fresh process: imports, five models, the stack, the answers).
Then projects the wall time of the full Table 1 grid (2 backbones x 2 regimes x 5 folds x 25
epochs on MIDOG 2025's 11,937 crops) and of the paper's generator schedule (1,000 + 1,000
pretraining epochs on a 56,000-crop pool; per fold 2,000 VAE + 5,000 DiT epochs), one fold
after the other and with fold_jobs=5, and the grid on 1, 2, 4 and 8 such GPUs: one node (`main
-P devices=auto`: a row per GPU, its five folds side by side) and a Slurm cluster (one fold per
job and GPU). From these it prints the `slurm:` profile lines (time limits: the projection x 1.5)
to paste into a profile file. Random weights: the compute is the same as trained ones.
On a GPU it also measures training through torch.compile (`train_cv compile=true`): the speed-up
over eager and the one-off compile time. Training computes in `--precision` (default auto, as
train_cv: bf16 on a GPU with native bf16, fp16 with a gradient scaler on older ones such as a
T4 or V100, fp32 on a CPU; models/precision.py); the first line says which. Writes every
figure to --json too, so two machines (or two commits) can be compared.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_train import sync, train_steps  # noqa: E402
from data_tools.augment import augment_and_preprocess  # noqa: E402
from data_tools.demo import make_demo  # noqa: E402
from models.backbones import resolve_backbone  # noqa: E402
from models.classifier import build_classifier  # noqa: E402
from models.generator import diffusion_loss, new_generator, vae_loss  # noqa: E402
from models.precision import PRECISIONS, Precision, backward_step, choose_precision  # noqa: E402
from models.sampling import generate  # noqa: E402

# the paper's workload (MIDOG 2025 Track 2 and the paper's protocol)
N_CROPS, FOLDS, EPOCHS, ROWS_PER_BACKBONE = 11_937, 5, 25, 2
ATYPICAL_SHARE, POOL, PRETRAIN_EPOCHS, FOLD_VAE_EPOCHS, FOLD_DIT_EPOCHS = 0.15, 56_000, 1_000, 2_000, 5_000
FOLD_JOBS = 5
GPU_COUNTS = (1, 2, 4, 8)
MARGIN = 1.5  # a job's time limit: its projection x this


class Utilisation:
    """GPU utilisation (%) sampled by NVML while a block runs; None on a CPU or without NVML."""

    def __init__(self, device: torch.device):
        self.samples: list[int] = []
        self.handle = None
        if device.type == "cuda":
            try:
                import pynvml
                pynvml.nvmlInit()
                self.nvml = pynvml
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except Exception:  # noqa: BLE001 - no NVML: no utilisation figure
                self.handle = None

    def __enter__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        self.thread.join()

    def _sample(self):
        while self.handle is not None and not self.stop.wait(0.05):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def peak_memory(device: torch.device) -> float:
    """GiB: the GPU's peak allocation since the last reset, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def classifier(name: str, backbone: str, backbone_set: str, batch: int, steps: int, device: torch.device,
               compile: bool = False, precision: Precision | None = None) -> dict:
    """Training images/s of one backbone; `compile`: through torch.compile (train_cv compile=true),
    its one-off compile time measured apart (the first step)."""
    spec = resolve_backbone(backbone, backbone_set)
    torch.manual_seed(0)
    model = build_classifier(spec, "none").to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    opt = torch.optim.NAdam(model.parameters(), lr=1e-4)
    crops, index = make_demo(64, seed=0)
    labels = index["label"].to_numpy()
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)

    def batches():
        while True:
            idx = rng.integers(0, len(crops), batch)
            x = augment_and_preprocess(torch.from_numpy(crops[idx]), spec.input_size, spec.mean, spec.std, device, gen)
            yield x, torch.tensor(labels[idx], dtype=torch.float32)
    reset_memory(device)
    first = time.perf_counter()
    train_steps(model, opt, batches(), device, steps=1, warmup=0, precision=precision)  # compiles, when compiling
    first = time.perf_counter() - first
    with Utilisation(device) as util:
        rate, outside = train_steps(model, opt, batches(), device, steps, precision=precision)
    return {"name": name, "timm_name": spec.timm_name, "input_px": spec.input_size, "batch": batch, "compile": compile,
            "first_step_s": first, "images_per_s": rate, "data_path_share": outside, "peak_gib": peak_memory(device),
            "gpu_util": util.mean}


def generator_steps(arch: str, batch: int, steps: int, device: torch.device,
                    precision: Precision | None = None) -> dict:
    """images/s of the VAE's and the DiT's training steps at this batch size."""
    precision = precision or choose_precision("auto", device)
    gen = new_generator(arch, 128, 1000).to(device)
    x = torch.rand(batch, 3, 128, 128, device=device) * 2 - 1
    out = {}
    for part, model, loss_of in (("vae", gen.vae, lambda: vae_loss(gen.vae, x, 1e-4)[0]),
                                 ("dit", gen.dit, None)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = precision.scaler()
        if part == "dit":
            with torch.no_grad():
                z = gen.vae.encode(x).latent_dist.sample()
            y = torch.zeros(batch, dtype=torch.long, device=device)
            loss_of = lambda: diffusion_loss(gen.dit, gen.scheduler, z, y)  # noqa: E731
        reset_memory(device)
        for i in range(steps + 2):
            if i == 2:
                sync(device)
                start = time.perf_counter()
            with precision.autocast():
                loss = loss_of()
            backward_step(loss, opt, scaler)
        sync(device)
        out[part] = {"images_per_s": batch * steps / (time.perf_counter() - start), "peak_gib": peak_memory(device)}
    return {"arch": arch, "batch": batch, **out}


def sampling(arch: str, plans: list[tuple[str, int]], n: int, device: torch.device) -> list[dict]:
    gen = new_generator(arch, 128, 1000).to(device)
    labels = np.zeros(n, dtype=np.int64)
    out = []
    for sampler, steps in plans:
        sync(device)
        start = time.perf_counter()
        generate(gen, labels, sampler, steps, 1.5, seed=0, batch_size=n, progress=False)
        sync(device)
        out.append({"sampler": sampler, "steps": steps, "s_per_image": (time.perf_counter() - start) / n})
    return out


PREDICT_COLD = """
import sys, time, numpy as np
t0 = time.perf_counter()
from data_tools.inputs import read_stack
from models.backbones import resolve_backbone
from models.classifier import build_classifier
from models.ensemble import FoldEnsemble
spec = resolve_backbone(sys.argv[2], sys.argv[3])
ensemble = FoldEnsemble([build_classifier(spec, "none") for _ in range(5)], [spec] * 5, sys.argv[4])
prob = ensemble.predict_proba(read_stack(sys.argv[1]), batch_size=16, tta=True)
print(len(prob), time.perf_counter() - t0)
"""


def predict_cold(backbone: str, backbone_set: str, device: torch.device) -> dict:
    import tifffile
    with tempfile.TemporaryDirectory() as tmp:
        stack = Path(tmp) / "stack_1.tiff"
        tifffile.imwrite(stack, make_demo(16, seed=1)[0], photometric="rgb")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PREDICT_COLD, str(stack), backbone, backbone_set, str(device)],
                              cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"predict cold start failed:\n{done.stderr[-2000:]}")
    n, inside = done.stdout.split()[-2:]
    return {"crops": int(n), "cold_start_s": wall, "after_interpreter_s": float(inside), "tta": True}


def hours(seconds: float) -> str:
    return f"{seconds / 3600:7.1f} h" if seconds >= 3600 else f"{seconds / 60:7.1f} min"


def makespan(durations: list[float], gpus: int) -> float:
    """Wall time of jobs on `gpus` GPUs, each job to the least busy GPU, longest first (as main places
    its steps; a Slurm queue with free GPUs does no worse)."""
    load = [0.0] * gpus
    for d in sorted(durations, reverse=True):
        load[load.index(min(load))] += d
    return max(load)


def on_gpus(row_s: dict[str, float], overlap: float | None) -> dict[str, dict[int, float]]:
    """The grid on 1, 2, 4, 8 GPUs: one node, where main runs a row per GPU with its folds side by
    side (the fold_jobs speed-up), and a Slurm cluster, one fold per job and GPU."""
    speedup = overlap or 1.0
    return {"node": {g: makespan([t / speedup for t in row_s.values()], g) for g in GPU_COUNTS},
            "slurm": {g: makespan([t / FOLDS for t in row_s.values() for _ in range(FOLDS)], g) for g in GPU_COUNTS}}


def slurm_lines(row_s: dict[str, float], pretrain_s: float, finetune_s: float, synth_s: float) -> dict[str, str]:
    """The profile's `slurm:` lines for the paper's jobs: each time limit its projection x MARGIN (whole hours)."""
    hours = lambda s: max(1, int(np.ceil(MARGIN * s / 3600)))  # noqa: E731
    gpu = "gpus=1 cpus=8 mem_gb=48"
    return {"train_cv": f"{gpu} hours={hours(max(row_s.values()) / FOLDS)}",
            "generator_pretrain": f"gpus=1 cpus=8 mem_gb=64 hours={hours(pretrain_s)}",
            "generator_finetune": f"gpus=1 cpus=8 mem_gb=64 hours={hours(finetune_s)}",
            "synthesize": f"gpus=1 cpus=8 mem_gb=32 hours={hours(synth_s)}"}


def projections(rows: list[dict], gen_pre: dict, gen_fold: dict, sample_s: float = 0.0) -> dict:
    """Wall time of the paper's grid and generator schedule, sequential and with fold_jobs=5 (the
    five processes overlap as far as one leaves the device idle: speed-up min(5, 100 / utilisation)),
    on 1 to 8 GPUs, and the `slurm:` lines they size. `sample_s`: seconds per synthetic crop."""
    n_train = N_CROPS * (FOLDS - 1) / FOLDS
    n_val = N_CROPS / FOLDS
    balanced_extra = n_train * (1 - 2 * ATYPICAL_SHARE)  # synthetic atypical crops up to the normal count
    out, row_s = {}, {}
    for row in rows:
        ips = row["images_per_s"]
        row_s[f"{row['name']} real"] = (n_train / ips + n_val / (3 * ips)) * EPOCHS * FOLDS
        row_s[f"{row['name']} synth"] = ((n_train + balanced_extra) / ips + n_val / (3 * ips)) * EPOCHS * FOLDS
        out[row["name"]] = row_s[f"{row['name']} real"] + row_s[f"{row['name']} synth"]  # both rows of the backbone
    grid = sum(out.values())
    utils = [r["gpu_util"] for r in rows if r["gpu_util"]]
    overlap = min(FOLD_JOBS, 100 / max(np.mean(utils), 1)) if utils else None
    pretrain = PRETRAIN_EPOCHS * POOL * (1 / gen_pre["vae"]["images_per_s"] + 1 / gen_pre["dit"]["images_per_s"])
    finetune = FOLDS * n_train * (FOLD_VAE_EPOCHS / gen_fold["vae"]["images_per_s"]
                                  + FOLD_DIT_EPOCHS / gen_fold["dit"]["images_per_s"])
    synth = sample_s * balanced_extra * FOLDS
    return {"table1_grid_s": grid, "per_backbone_s": out, "per_row_s": row_s, "generator_pretrain_s": pretrain,
            "generator_finetune_s": finetune, "fold_jobs_overlap": overlap,
            "table1_grid_fold_jobs_s": grid / overlap if overlap else None,
            "generator_finetune_fold_jobs_s": finetune / overlap if overlap else None,
            "table1_grid_on_gpus_s": on_gpus(row_s, overlap), "synthesize_s": synth,
            "slurm": slurm_lines(row_s, pretrain, finetune, synth)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the demo's small models and a few steps (a CPU, CI)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default="bench_gpu.json", help="where the figures are written")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="as train_cv's (auto: bf16 on a GPU with native bf16, fp16 + gradient scaler on older ones, "
                        "fp32 on a CPU)")
    p.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                   help="also measure torch.compile'd training (auto: on a GPU, not with --quick: a CPU compile "
                        "takes minutes)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    backbone_set, steps, arch = ("demo", 3, "tiny") if args.quick else ("paper", 30, "base")
    plans = [("ddpm", 20), ("dpmsolver++", 4)] if args.quick else [("ddpm", 1000), ("dpmsolver++", 20)]
    started = time.perf_counter()
    what = "demo backbones (--quick)" if args.quick else "the paper's backbones"
    precision = choose_precision(args.precision, device)
    gpu = (f"{torch.cuda.get_device_name(device)}, sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"
           if device.type == "cuda" else "CPU")
    print(f"bench_gpu on {device} ({gpu}), {what}, precision {precision.name}"
          f"{' with a gradient scaler' if precision.name == 'fp16' else ''} (asked: {args.precision})")
    rows = [classifier("ConvNeXt", "convnext", backbone_set, 16, steps, device, precision=precision),
            classifier("Lunit ViT", "lunit", backbone_set, 16, steps, device, precision=precision)]
    for r in rows:
        util = f", GPU {r['gpu_util']:.0f} % busy" if r["gpu_util"] is not None else ""
        print(f"  train {r['name']:<9} ({r['timm_name']}, {r['input_px']} px, batch {r['batch']}): "
              f"{r['images_per_s']:8.1f} img/s, "
              f"data path {r['data_path_share']:.0%} of the step, peak {r['peak_gib']:.2f} GiB{util}")
    compile_ = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda" and not args.quick)
    compiled = [classifier(r["name"], b, backbone_set, 16, steps, device, compile=True, precision=precision)
                for r, b in zip(rows, ("convnext", "lunit"))] if compile_ else []
    for r, c in zip(rows, compiled):
        print(f"  train {r['name']:<9} torch.compile: {c['images_per_s']:8.1f} img/s "
              f"({c['images_per_s'] / r['images_per_s']:.2f}x eager), first step (the compile) {c['first_step_s']:.0f} s "
              f"(eager {r['first_step_s']:.1f} s)")
    gen_pre = generator_steps(arch, 32 if not args.quick else 8, steps, device, precision)
    gen_fold = generator_steps(arch, 8, steps, device, precision)
    for g in (gen_pre, gen_fold):
        print(f"  generator {g['arch']} batch {g['batch']:>2}: VAE {g['vae']['images_per_s']:8.1f} img/s, "
              f"DiT {g['dit']['images_per_s']:8.1f} img/s, peak {g['dit']['peak_gib']:.2f} GiB")
    samples = sampling(arch, plans, 4, device)
    for s in samples:
        print(f"  sample {s['sampler']:<12} {s['steps']:>5} steps: {s['s_per_image']:8.3f} s per image")
    cold = predict_cold("convnext", backbone_set, device)
    print(f"  predict, 16-crop stack, 5 models, flip TTA, {choose_precision('auto', device).name} (predict's choice "
          f"on this device), cold start: {cold['cold_start_s']:.1f} s "
          f"({cold['after_interpreter_s']:.1f} s after the interpreter started)")
    proj = projections(rows, gen_pre, gen_fold, samples[0]["s_per_image"])  # the paper samples with ddpm
    jobs = lambda s: hours(s) if s else "   n/a (no GPU utilisation figure)"  # noqa: E731
    print("projected wall time (the paper's workload at these rates):")
    print(f"  Table 1 grid (4 rows x 5 folds x {EPOCHS} epochs): {hours(proj['table1_grid_s'])} one fold at a time, "
          f"{jobs(proj['table1_grid_fold_jobs_s'])} with fold_jobs={FOLD_JOBS}")
    print(f"  generator pretraining ({PRETRAIN_EPOCHS} + {PRETRAIN_EPOCHS} epochs, {POOL:,} crops): "
          f"{hours(proj['generator_pretrain_s'])}")
    print(f"  generator fine-tuning (5 folds x {FOLD_VAE_EPOCHS} VAE + {FOLD_DIT_EPOCHS} DiT epochs): "
          f"{hours(proj['generator_finetune_s'])} one fold at a time, "
          f"{jobs(proj['generator_finetune_fold_jobs_s'])} side by side")
    for where, label in (("node", "one node, main -P devices=auto (a row per GPU, its folds side by side)"),
                         ("slurm", "Slurm, one fold per job and GPU")):
        print(f"  Table 1 grid on {label}: " + ", ".join(
            f"{g} GPU{'s' if g > 1 else ''} {hours(t).strip()}" for g, t in proj["table1_grid_on_gpus_s"][where].items()))
    print("profile lines for main -P executor=slurm (time limits: these projections x 1.5; docs/scaling.md):\n"
          "  slurm:\n" + "\n".join(f'    {step}: "{line}"' for step, line in proj["slurm"].items()))
    figures = {"device": str(device), "precision": precision.name, "quick": args.quick, "classifier": rows,
               "classifier_compiled": compiled,
               "generator_pretrain": gen_pre,
               "generator_finetune": gen_fold, "sampling": samples, "predict": cold, "projections": proj,
               "bench_s": time.perf_counter() - started}
    Path(args.json).write_text(json.dumps(figures, indent=1))
    print(f"figures: {args.json} ({figures['bench_s']:.0f} s)")
    return figures


if __name__ == "__main__":
    main()
