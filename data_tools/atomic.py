"""Files and folders that appear whole or not at all: write into a temporary sibling, then
rename or swap it in.

Used for stores, checkpoints, generator weights, training state and prediction files, so a
killed process never leaves a half-written file or folder under the final name. Replacing an
existing folder is one atomic step where the kernel offers it (Linux `renameat2(RENAME_EXCHANGE)`:
the two folders swap names), two renames elsewhere. Staging folders are named `.<name>.<kind>-<host>-<pid>-<random>`, so
a later process can tell the leftovers of a dead one (`clean_leftovers`) from a live one's.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Iterator

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40]
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|scratch|old)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def staging_path(out: Path, kind: str = "tmp") -> Path:
    """A fresh sibling name of `out` for a folder being written (kind: tmp | scratch | old)."""
    return out.parent / f".{out.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names of two existing paths in one atomic step; False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # e.g. a file system without exchange support
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`; an existing `out` is swapped out atomically
    (or, without kernel support, renamed aside first: `clean_leftovers` restores it if a
    kill comes between the two renames) and then removed."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):  # `tmp` now holds the old folder
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = staging_path(out, "old")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _alive(host: str, pid: int) -> bool:
    """Whether the writer may still be running (another machine's process is not ours to judge)."""
    if host != _HOST:
        return True
    try:
        os.kill(pid, 0)  # PermissionError: alive, someone else's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def clean_leftovers(out: str | Path) -> list[str]:
    """Remove what killed writers of `out` on this machine left beside it (staging and scratch
    folders); put back a previous `out` that a kill left renamed aside. Returns what was done."""
    out = Path(out)
    done = []
    if not out.parent.is_dir():
        return done
    for path in sorted(out.parent.iterdir()):
        m = _LEFTOVER.match(path.name)
        if not m or m["name"] != out.name or _alive(m["host"], int(m["pid"])):
            continue
        if m["kind"] == "old" and not out.exists():
            os.replace(path, out)
            done.append(f"restored {out} from {path.name} (a replacement was interrupted)")
        else:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            done.append(f"removed {path.name} (left by an interrupted write)")
    return done


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path of the file `path` to write; when the block succeeds it
    replaces `path` in one rename, else it is removed. Every writer of a single file uses this."""
    path = Path(path)
    tmp = staging_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staging_dir(out: str | Path, kind: str = "tmp") -> Iterator[Path]:
    """A new temporary sibling of `out`, removed when the block ends whatever happened."""
    path = staging_path(Path(out), kind)
    try:  # mkdir inside: a SIGTERM (SystemExit) right after it must not leave the folder behind
        path.mkdir(parents=True)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; when the block succeeds it becomes `out`."""
    out = Path(out)
    with staging_dir(out) as tmp:
        yield tmp
        replace_dir(tmp, out)
