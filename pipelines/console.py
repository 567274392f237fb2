"""main's console: one line when a step starts and one when it ends (duration, headline result),
one live status line for the whole workflow, and each step's own output in a log file.

On a terminal the status line is redrawn in place every second; piped to a file it is printed
as a plain line once a minute, so a CI log holds whole lines only. A step's progress in the
status line is the last progress bar its log shows ("fold 2 epoch 3/4").
"""
from __future__ import annotations

import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

_BAR = re.compile(r"^(?P<desc>[^:|]*?):?\s*\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)")
_CLEAR = "\r\x1b[2K"


def last_progress(log: Path, width: int = 40) -> str:
    """The newest progress bar (or line) a log ends with, shortened: 'fold 2 epoch 3/4'."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    pieces = [p.strip() for p in re.split(r"[\r\n]", tail) if p.strip()]
    if not pieces:
        return ""
    m = _BAR.match(pieces[-1])
    text = f"{m['desc'].strip()} {m['n']}/{m['total']}".strip() if m else pieces[-1]
    return text if len(text) <= width else text[:width - 1] + "…"


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class Console:
    """Start/end lines and the status line of a workflow of `total` steps (thread-safe)."""

    def __init__(self, total: int, stream: TextIO = sys.stdout, every: float | None = None):
        self.total, self.done, self.stream = total, 0, stream
        self.tty = stream.isatty()
        self.every = every if every is not None else (1.0 if self.tty else 60.0)
        self.running: dict[str, Path] = {}
        self.started = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def __enter__(self) -> "Console":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._clear()

    def line(self, text: str) -> None:
        """A permanent line (above the status line on a terminal)."""
        with self._lock:
            self._clear()
            self.stream.write(text + "\n")
            self._draw()

    def start(self, label: str, log: Path) -> None:
        with self._lock:
            self.running[label] = log
        self.line(f"[main] {label}: started (log {log})")

    def finish(self, label: str, result: str, seconds: float) -> None:
        with self._lock:
            self.running.pop(label, None)
            self.done += 1
        self.line(f"[main] {label}: {result} ({minutes(seconds)})")

    def reuse(self, label: str, run_id: str) -> None:
        with self._lock:
            self.done += 1
        self.line(f"[main] reuse {label}: run {run_id}")

    def fail(self, label: str, log: Path, run_id: str, tail: int = 15) -> None:
        with self._lock:
            self.running.pop(label, None)
        lines = Path(log).read_text(errors="replace").replace("\r", "\n").splitlines() if Path(log).is_file() else []
        last = [ln for ln in lines if ln.strip()][-tail:]
        self.line(f"[main] {label}: FAILED (run {run_id}); its log: {log}; last lines:\n"
                  + "\n".join(f"    {ln[:300]}" for ln in last))

    def status(self) -> str:
        running = ", ".join(f"{label} {last_progress(log)}".strip() for label, log in self.running.items())
        busy = f"{len(self.running)} running: {running}" if self.running else "waiting"
        return f"[{self.done}/{self.total}] {busy} · {minutes(time.time() - self.started)} elapsed"

    def _clear(self) -> None:
        if self.tty:
            self.stream.write(_CLEAR)
            self.stream.flush()

    def _draw(self) -> None:
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            self.stream.write(self.status()[:width])
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                if self.tty:
                    self._clear()
                    self._draw()
                elif self.running:
                    self.stream.write(self.status()[:300] + "\n")
                    self.stream.flush()
