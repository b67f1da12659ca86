"""Consoles and sweep progress for a terminal and for everything else (CI logs, `| tee`, nohup).

On a terminal: rich's live progress bar. Elsewhere rich draws nothing until the end and cuts tables to 80 columns, so
a non-terminal console is wide (tables are never truncated) and progress is a plain line at the start, at least every
`every` seconds while cells run (a background thread, so one long cell still shows), and at the end:

    accuracy: 12/40 cells done, 28 left, about 14m 05s left (6m 02s so far); now: selfindex task=passkey context=1024
"""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

WIDE = 240  # columns of a console that is not a terminal: wide enough for every table kvbench prints
EVERY_S = 30.0  # seconds between progress lines when not on a terminal (the target is at most 60)


def make_console(stderr: bool = False) -> Console:
    """A rich Console: as rich makes it on a terminal, WIDE columns otherwise."""
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=WIDE)


def duration(s: float) -> str:
    """Seconds as '1h 02m', '14m 30s' or '42s'."""
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


class PlainProgress:
    """Progress as plain lines, with the part of rich's Progress API a sweep uses (add_task, update, advance); `line()`
    is what each line says. The periodic thread starts with the task and stops when the context ends."""

    def __init__(self, console: Console, every: float = EVERY_S, clock=time.monotonic):
        self.console, self.every, self.clock = console, every, clock
        self.description, self.total, self.done, self.current, self.t0 = "", 0, 0, "", clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def line(self) -> str:
        elapsed, left = self.clock() - self.t0, self.total - self.done
        eta = f"about {duration(elapsed / self.done * left)} left" if self.done and left else (
            "estimate after the first cell" if left else "finished")
        now = f"; now: {self.current}" if self.current and left else ""
        return (f"{self.description}: {self.done}/{self.total} cells done, {left} left, {eta} "
                f"({duration(elapsed)} so far){now}")

    def emit(self) -> None:
        self.console.print(escape(self.line()), soft_wrap=True, highlight=False)

    def add_task(self, description: str, total: int, now: str = "") -> int:
        self.description, self.total, self.current, self.t0 = description, total, now, self.clock()
        self.emit()
        self._thread = threading.Thread(target=self._run, name="kvbench-progress", daemon=True)
        self._thread.start()
        return 0

    def update(self, task: int, now: str = "") -> None:
        self.current = now

    def advance(self, task: int) -> None:
        self.done += 1

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.emit()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.emit()


def progress_display(console: Console, columns, enabled: bool = True,
                     every: float | None = None) -> Progress | PlainProgress:
    """What a sweep shows its progress with, used as rich's Progress (`with ... as p: t = p.add_task(...)`): rich's
    live bar of `columns` on a terminal, plain lines elsewhere; nothing when not `enabled`."""
    if enabled and not console.is_terminal:
        return PlainProgress(console, EVERY_S if every is None else every)
    return Progress(*columns, console=console, disable=not enabled, transient=False)
