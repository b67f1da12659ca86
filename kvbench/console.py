"""Consoles and sweep progress for a terminal and for everything else (CI logs, `| tee`, nohup).

On a terminal: rich's live progress bar. Elsewhere rich draws nothing until the end and cuts tables to 80 columns, so
a non-terminal console is wide (tables are never truncated) and progress is a plain line at the start, at least every
`every` seconds while cells run (a background thread, so one long cell still shows), and at the end:

    accuracy: 12/40 cells done, 28 left, about 14m 30s left (6m 2s so far); now: selfindex task=passkey context=1024
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

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
    """Progress as plain lines; `line()` is what each one says, `start()` begins the periodic thread."""

    def __init__(self, console: Console, description: str, total: int, every: float = EVERY_S,
                 clock=time.monotonic):
        self.console, self.description, self.total, self.every, self.clock = console, description, total, every, clock
        self.done, self.current, self.t0 = 0, "", clock()
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

    def now(self, text: str) -> None:
        self.current = text

    def advance(self) -> None:
        self.done += 1

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.emit()

    def start(self) -> None:
        self.emit()
        self._thread = threading.Thread(target=self._run, name="kvbench-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.emit()


class _RichProgress:
    """The terminal's live bar, behind the same now()/advance() as PlainProgress."""

    COLUMNS = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[now]}"))

    def __init__(self, progress: Progress, task):
        self.progress, self.task = progress, task

    def now(self, text: str) -> None:
        self.progress.update(self.task, now=escape(text))

    def advance(self) -> None:
        self.progress.advance(self.task)


@contextmanager
def progress(console: Console, description: str, total: int, enabled: bool = True,
             every: float = EVERY_S) -> Iterator[PlainProgress | _RichProgress]:
    """Progress over `total` cells: call now(text) as a cell starts and advance() when it ends."""
    if enabled and not console.is_terminal:
        plain = PlainProgress(console, description, total, every)
        plain.start()
        try:
            yield plain
        finally:
            plain.stop()
        return
    with Progress(*_RichProgress.COLUMNS, console=console, disable=not enabled, transient=False) as bar:
        yield _RichProgress(bar, bar.add_task(description, total=total, now=""))
