"""The cluster's share for each step: the profile's `slurm` section (partition, account, extra sbatch
options, and per step its GPUs, CPUs, memory and time limit), and the submitit executor built from
it for one job of `main -P executor=slurm` (or `executor=local`: the same jobs as processes of this
machine, where only the time limit applies).

A step's resources are a line such as `gpus=1 cpus=8 mem_gb=48 hours=12`; what a line leaves out
comes from `default`. In a profile file, a step's line replaces the base profile's as a whole:

    base: paper
    slurm: {partition: gpu, account: mylab, train_cv: "gpus=1 cpus=8 mem_gb=48 hours=6"}
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import submitit

from analysis import keys
from data_tools.errors import ConfigError
from data_tools.params import param
from pipelines.config import StepConfig

RESOURCES = ("gpus", "cpus", "mem_gb", "hours")


@dataclass
class Resources:
    gpus: int
    cpus: int
    mem_gb: float
    hours: float


@dataclass
class SlurmConfig(StepConfig):
    partition: str = param("partition the jobs go to (empty: the cluster's default)")
    account: str = param("account the jobs are charged to (empty: the user's default)")
    extra: str = param("more sbatch options as on its command line, e.g. --qos=high --constraint=a100")
    setup: str = param("shell lines each job runs first, separated by ';' (e.g. module load cuda/12.4)")
    folder: str = param("where submitit keeps each job's script, pickles and output (storage every node mounts)")
    default: str = param("resources of a job no other line names (train_cv's summary job): gpus= cpus= mem_gb= hours=")
    prepare_data: str = param("resources of prepare_data")
    generator_pretrain: str = param("resources of generator_pretrain")
    generator_finetune: str = param("resources of generator_finetune (every fold, one after another)")
    synthesize: str = param("resources of synthesize")
    tune: str = param("resources of tune")
    train_cv: str = param("resources of each fold task of train_cv's job array (one fold)")
    evaluate: str = param("resources of evaluate")
    report: str = param("resources of report")

    STEP = keys.SLURM

    def resources(self, step: str) -> Resources:
        """The step's line over `default`'s."""
        values = {**_parse(self.default, "default"), **_parse(getattr(self, step, "") or "", step)}
        missing = [k for k in RESOURCES if k not in values]
        if missing:
            raise ConfigError(f"slurm: no {', '.join(missing)} for {step} (nor in default)")
        return Resources(int(values["gpus"]), int(values["cpus"]), float(values["mem_gb"]), float(values["hours"]))


CONFIG = SlurmConfig


def _parse(line: str, name: str) -> dict[str, str]:
    """`gpus=1 cpus=8` -> {"gpus": "1", "cpus": "8"}, refusing unknown names and non-numbers."""
    out = {}
    for item in line.split():
        key, _, value = item.partition("=")
        try:
            float(value)
        except ValueError:
            value = ""
        if key not in RESOURCES or not value:
            raise ConfigError(f"slurm {name}: {item!r} is not one of {', '.join(k + '=<number>' for k in RESOURCES)}")
        out[key] = value
    return out


def sbatch_options(extra: str) -> dict[str, str | bool]:
    """`--qos=high --exclusive` -> {"qos": "high", "exclusive": True} (submitit writes them as #SBATCH lines)."""
    out: dict[str, str | bool] = {}
    for token in shlex.split(extra):
        if not token.startswith("--"):
            raise ConfigError(f"slurm extra: {token!r} is not an sbatch option of the form --name=value or --flag")
        name, eq, value = token[2:].partition("=")
        out[name] = value if eq else True
    return out


def executor(kind: str, cfg: SlurmConfig, step: str, name: str, after: list[str] = (), tasks: int = 1
             ) -> submitit.AutoExecutor:
    """submitit's executor for one job (`tasks` > 1: a job array) of `step`: on Slurm with the step's
    resources, starting once the jobs `after` ended well (a failed one cancels it); `kind` local: this
    machine's processes (the caller places them on GPUs and orders them)."""
    res = cfg.resources(step)
    ex = submitit.AutoExecutor(folder=Path(cfg.folder) / "%j", cluster=kind)
    slurm = {"slurm_additional_parameters": {**({"dependency": "afterok:" + ":".join(after), "kill-on-invalid-dep": "yes"}
                                                if after else {}), **sbatch_options(cfg.extra)},
             "slurm_array_parallelism": tasks}
    setup = [line.strip() for line in cfg.setup.split(";") if line.strip()]
    if setup:
        slurm["slurm_setup"] = setup
    if cfg.partition:
        slurm["slurm_partition"] = cfg.partition
    if cfg.account:
        slurm["slurm_account"] = cfg.account
    ex.update_parameters(name=name, timeout_min=max(1, round(res.hours * 60)), cpus_per_task=res.cpus,
                         mem_gb=res.mem_gb, stderr_to_stdout=True, **slurm,
                         # no --gpus-per-node=0 (a cluster without GPUs may refuse the option)
                         **({"gpus_per_node": res.gpus} if kind == "slurm" and res.gpus else {}))
    return ex
