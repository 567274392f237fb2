"""The sbatch scripts `main -P executor=slurm` would submit, written without a cluster: check the
resources and dependencies before a first submission.

    python scripts/slurm_dry_run.py --out sbatch/ -- --profile paper --pool /shared/stores/wsi_pool ...

Runs main's real submission path (the same checks, runs, reuse and dependencies) with `sbatch` and
`srun` replaced by stand-ins on PATH: `sbatch` keeps the script it is given as
`<out>/<job id>_<job name>.sh` and answers with a made-up job id. Logs to a throwaway tracking
server unless --tracking-uri names one; a store main reads that is not given is a small demo store
(it is never read: no job runs). The scripts name this machine's paths.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SBATCH = """#!{python}
# stand-in for sbatch: keep the script, answer with a job id (under a lock: main submits from several threads)
import fcntl, re, shutil, sys
with open("{counter}", "r+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    n = int(f.read()) + 1
    f.seek(0), f.write(str(n)), f.truncate()
name = re.search(r"^#SBATCH --job-name=(.*)$", open(sys.argv[1]).read(), re.M)[1].strip("'")
shutil.copy(sys.argv[1], f"{out}/{{n}}_{{name}}.sh")
print(f"Submitted batch job {{n}}")
"""


def fake_slurm(bin_dir: Path, out: Path, first_id: int = 1000) -> None:
    """`sbatch` and `srun` stand-ins in `bin_dir` (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (bin_dir / "counter").write_text(str(first_id))
    (bin_dir / "sbatch").write_text(SBATCH.format(python=sys.executable, counter=bin_dir / "counter", out=out))
    (bin_dir / "srun").write_text("#!/bin/sh\necho 'srun stand-in: nothing runs in a dry run' >&2\nexit 1\n")
    for name in ("sbatch", "srun"):
        (bin_dir / name).chmod(0o755)


@contextlib.contextmanager
def throwaway_server(folder: Path) -> Iterator[str]:
    """`mlflow server` on a free local port over a sqlite file; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{folder / 'mlflow.db'}", "--default-artifact-root", str(folder / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("mlflow server did not start")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def dry_run(out: Path, main_argv: list[str], tracking_uri: str, work: Path) -> list[Path]:
    """main with `main_argv` plus `--executor slurm`, the scripts written to `out`; returns them in order."""
    import mlflow

    from analysis import keys
    from data_tools.ingest import ingest
    from pipelines import main as workflow
    given = {a.lstrip("-") for a in main_argv if a.startswith("--")}
    extra = []
    for name in ("pool", "test_data", "root"):  # inputs the dry run needs to exist, made small
        if name not in given:
            path = work / name
            if not path.exists():
                ingest("demo", None, path, folds=0, seed=1, size=40) if name != "root" else path.mkdir(parents=True)
            extra += [f"--{name}", str(path)]
    if "stores" not in given:
        extra += ["--stores", str(work / "stores")]
    fake_slurm(work / "bin", out)
    before, uri = dict(os.environ), mlflow.get_tracking_uri()
    os.environ.update(PATH=f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}", MLFLOW_TRACKING_URI=tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or keys.DEFAULT_EXPERIMENT)  # not an earlier id
    try:
        workflow.main([*main_argv, *extra, "--executor", "slurm", "--wait", "false"])
    finally:
        os.environ.clear()
        os.environ.update(before)
        mlflow.set_tracking_uri(uri)
    return sorted(out.glob("*.sh"), key=lambda p: int(p.name.split("_")[0]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="sbatch", help="folder for the scripts")
    p.add_argument("--tracking-uri", default="", help="a tracking server to log the (scheduled) runs to")
    p.add_argument("main_args", nargs="*", help="main's own arguments, after --")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    with tempfile.TemporaryDirectory() as tmp, \
            (contextlib.nullcontext(args.tracking_uri) if args.tracking_uri else throwaway_server(Path(tmp))) as uri:
        scripts = dry_run(out, args.main_args or ["--profile", "paper"], uri, Path(tmp))
    print(f"{len(scripts)} sbatch scripts in {out}: " + ", ".join(s.name for s in scripts))


if __name__ == "__main__":
    main()
