"""Run a grid of cells: one record per cell, a rerun skips finished cells, a failing or out-of-memory cell is recorded
and the sweep goes on, and a progress display says how long is left (kvbench.console: rich's live bar on a terminal,
a plain line at least every 30 s elsewhere)."""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from rich.progress import (BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from kvbench.records import RecordWriter, cell_key, make_record, now_iso
from kvbench.console import make_console, progress_display  # noqa: I001 - kept apart from the lines above

console = make_console(stderr=True)


@dataclass
class Cell:
    """One unit of work: a method (label and parameters) applied to one configuration."""

    method: str  # the method's label, e.g. "selfindex:budget=0.1"
    params: dict[str, Any]
    cell: dict[str, Any]
    context: Any = field(default=None, repr=False)  # whatever the runner needs (method object, model, ...)


class Skip(Exception):
    """Raise from a runner to record a cell as 'skipped' with the reason (e.g. needs a GPU)."""


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class SweepResult:
    ok: int = 0
    failed: int = 0
    oom: int = 0
    skipped: int = 0
    already_done: int = 0
    records: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.ok} ok, {self.failed} failed, {self.oom} out of memory, {self.skipped} skipped, "
                f"{self.already_done} already done")


def run_sweep(suite: str, cells: list[Cell], runner: Callable[[Cell], dict], writer: RecordWriter,
              description: str | None = None, rerun: bool = False, show_progress: bool = True) -> SweepResult:
    """Run `runner(cell) -> metrics` for every cell not done yet and append one record per cell."""
    done = set() if rerun else writer.done()
    result = SweepResult()
    todo = []
    for c in cells:
        if cell_key(suite, c.method, c.cell) in done:
            result.already_done += 1
        else:
            todo.append(c)
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[now]}")]
    with progress_display(console, columns, enabled=show_progress) as progress:
        task = progress.add_task(description or suite, total=len(todo), now="")
        for c in todo:
            progress.update(task, now=f"{c.method} {_short(c.cell)}")
            started, t0 = now_iso(), time.perf_counter()
            metrics, error, status = {}, None, "ok"
            try:
                metrics = runner(c) or {}
            except KeyboardInterrupt:
                raise
            except Skip as e:
                status, error = "skipped", str(e)
            except Exception as e:  # noqa: BLE001 - every failure becomes a record; the sweep goes on
                status = "oom" if is_oom(e) else "failed"
                error = f"{type(e).__name__}: {e}"
                if status == "failed":
                    error += "\n" + "".join(traceback.format_exception(e)[-4:])
                free_memory()
            rec = make_record(suite, c.method, c.params, c.cell, status, metrics, error, started,
                              round(time.perf_counter() - t0, 3))
            writer.append(rec)
            result.records.append(rec)
            setattr(result, status, getattr(result, status) + 1)
            if status in ("failed", "oom"):
                console.print(f"[yellow]{status}[/]: {c.method} {_short(c.cell)}: {error.splitlines()[0]}")
            progress.advance(task)
    return result


def _short(cell: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cell.items() if k not in ("model", "shape") and v is not None)[:80]
