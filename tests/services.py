"""Real services for the multi-machine tests: a PostgreSQL server and an MLflow tracking server
on 127.0.0.1, started by the tests themselves and stopped afterwards."""
from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster; yields a SQLAlchemy URL. Skips where PostgreSQL is absent."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries not installed (CI installs them: apt-get install postgresql)")
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="pgtest-", dir="/tmp"))
    if os.geteuid() == 0:  # postgres refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        base.chmod(0o755)
        shutil.chown(base, "postgres")
    data, port = base / "data", free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)
    run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    run(pg_ctl, "-D", str(data), "-w", "-l", str(base / "log"), "-o",
        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        run(_pg_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna")
        run(_pg_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def wait_http(url: str, timeout: float = 90, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server process; kill it if it does not go within 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, *, ui: bool = False, auth: dict[str, str] | None = None,
                  host_name: str | None = None) -> Iterator[str]:
    """`mlflow server` (or `mlflow ui`) on a free 127.0.0.1 port; yields its http URL.

    auth: the `[mlflow]` settings of an auth.ini; the server runs MLflow's basic-auth app with
    them (MLFLOW_AUTH_CONFIG_PATH and a secret key in its environment only).
    host_name: the name clients use; the server allows only `<host_name>:<port>` as Host header
    (`--allowed-hosts`) and the URL names it."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "ui" if ui else "server", "--backend-store-uri", backend_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if not ui:
        cmd += ["--artifacts-destination", str(artifacts)]
    env, conf = dict(os.environ), None
    if auth is not None:
        conf = Path(tempfile.mkdtemp(prefix="mlflow-auth-", dir="/tmp"))
        (conf / "auth.ini").write_text("[mlflow]\n" + "".join(f"{k} = {v}\n" for k, v in auth.items()))
        (conf / "auth.ini").chmod(0o600)
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(conf / "auth.ini"), MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32))
        cmd += ["--app-name", "basic-auth"]
    if host_name is not None:
        cmd += ["--allowed-hosts", f"{host_name}:{port}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://{host_name or '127.0.0.1'}:{port}"
    try:
        wait_http(url + "/health", proc=proc)  # /health needs neither credentials nor an allowed Host
        yield url
    finally:
        stop(proc)
        if conf is not None:
            shutil.rmtree(conf, ignore_errors=True)
