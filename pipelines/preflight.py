"""Checks before anything is queued on a cluster: what a job on another node needs and cannot
fix once it runs. Each failure is one line that says what to do.

- Store paths (the data the workflow reads, the folder it writes): absolute and present. A job
  starts in another directory on another machine: a relative path means something else there.
- The tracking URI: a server (`http(s)://`, or a database such as `postgresql://`). A `sqlite:`
  file or a local folder cannot be shared by processes on many nodes.
- Credentials, for an `http(s)://` server: both MLFLOW_TRACKING_USERNAME and
  MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, or the `[mlflow]` settings of
  ~/.mlflow/credentials (read on the nodes too where the home folder is shared). With none of
  these, the server is asked once without credentials: HTTP 401 or 403 means it wants a login
  the jobs would lack. sbatch passes the submitting shell's environment on to its jobs, so
  exporting the variables before `main` is enough.
"""
from __future__ import annotations

import configparser
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Mapping

from data_tools.errors import ConfigError

USER, PASSWORD, TOKEN = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"


def check_paths(inputs: Mapping[str, str], outputs: Mapping[str, str]) -> None:
    """`inputs` (name -> path) must exist, `outputs` must be creatable; both absolute."""
    for name, path in {**inputs, **outputs}.items():
        if path and not Path(path).is_absolute():
            raise ConfigError(f"{name}={path} is relative: a job starts elsewhere on another node; give the absolute "
                              f"path on storage every node mounts, e.g. {name}={Path(path).resolve()}")
    for name, path in inputs.items():
        if path and not Path(path).exists():
            raise ConfigError(f"{name}={path} does not exist here: the jobs would not find it either (put it on "
                              f"storage every node mounts)")
    for name, path in outputs.items():
        if path and not Path(path).parent.exists():
            raise ConfigError(f"{name}={path}: its folder {Path(path).parent} does not exist")


def check_tracking(uri: str, env: Mapping[str, str] = os.environ, timeout: float = 10.0) -> None:
    """The tracking URI is one every node can reach, and the jobs will have what it asks to log in."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("", "file", "sqlite"):
        raise ConfigError(f"tracking URI {uri!r}: processes on other nodes cannot share a {scheme or 'local'} store; "
                          f"run a tracking server (docs/scaling.md) and export MLFLOW_TRACKING_URI=http://<host>:5000")
    if scheme not in ("http", "https"):
        return  # a database (postgresql://...) that the nodes reach as this machine does
    if bool(env.get(USER)) != bool(env.get(PASSWORD)):
        raise ConfigError(f"set both {USER} and {PASSWORD} (only {USER if env.get(USER) else PASSWORD} is set)")
    if env.get(TOKEN) or env.get(USER) or _credentials_file():
        return
    status = _status_without_login(uri, timeout)
    if status in (401, 403):
        raise ConfigError(f"the tracking server {uri} asks for a login (HTTP {status}): export {USER} and {PASSWORD} "
                          f"(or {TOKEN}) before submitting; the jobs get this shell's environment")


def _credentials_file() -> bool:
    """~/.mlflow/credentials names a user and password (MLflow reads it when the variables are unset)."""
    path = Path.home() / ".mlflow" / "credentials"
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return False
    section = parser["mlflow"] if parser.has_section("mlflow") else {}
    return bool(section.get("mlflow_tracking_username") and section.get("mlflow_tracking_password"))


def _status_without_login(uri: str, timeout: float) -> int:
    """HTTP status of one read-only request without credentials; an unreachable server is an error."""
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError) as e:
        raise ConfigError(f"cannot reach the tracking server {uri}: {getattr(e, 'reason', e)}") from None
