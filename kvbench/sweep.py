"""Run a grid of cells: one record per cell, a rerun skips finished cells, a failing or out-of-memory cell is recorded
and the sweep goes on, and a progress display says how long is left (kvbench.console: rich's live bar on a terminal,
a plain line at least every 30 s elsewhere). `measure_cell` turns one cell into its record (the part a worker process
runs); `run_sweep` adds the skipping, the writing and the progress."""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from rich.progress import (BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from kvbench.device import free_memory
from kvbench.metrics import BUDGET_FRACTION
from kvbench.records import RecordWriter, cell_key, make_record, now_iso
from kvbench.console import make_console, progress_display  # noqa: I001 - kept apart from the lines above

console = make_console(stderr=True)


@dataclass
class Cell:
    """One unit of work: a method (label and parameters) applied to one configuration."""

    method: str  # the method's label, e.g. "selfindex:budget=0.1"
    params: dict[str, Any]
    cell: dict[str, Any]
    parsed: Any = field(default=None, repr=False)  # the Method itself (or an Unavailable one, recorded as failed)

    @classmethod
    def of(cls, method: Any, cell: dict[str, Any]) -> "Cell":
        """The cell of `method` (a Method, or anything with label() and params()) on the configuration `cell`."""
        return cls(method.label(), method.params(), cell, method)


class Skip(Exception):
    """Raise from a runner to record a cell as 'skipped' with the reason (e.g. needs a GPU)."""


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


@dataclass
class SweepResult:
    ok: int = 0
    failed: int = 0
    oom: int = 0
    skipped: int = 0
    already_done: int = 0
    records: list[dict] = field(default_factory=list)

    def add(self, record: dict) -> None:
        self.records.append(record)
        setattr(self, record["status"], getattr(self, record["status"]) + 1)

    def summary(self) -> str:
        return (f"{self.ok} ok, {self.failed} failed, {self.oom} out of memory, {self.skipped} skipped, "
                f"{self.already_done} already done")


def pending(suite: str, cells: list[Cell], writer: RecordWriter, rerun: bool = False) -> list[Cell]:
    """The cells the records in `writer` do not have yet (all of them with rerun)."""
    done = set() if rerun else writer.done()
    return [c for c in cells if cell_key(suite, c.method, c.cell) not in done]


def measure_cell(suite: str, c: Cell, runner: Callable[[Cell], dict]) -> dict:
    """Run `runner(c) -> metrics` and return the cell's record; every failure becomes a record, never an exception."""
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
    family, fraction = method_facts(c)
    if fraction is not None:
        metrics = {**metrics, BUDGET_FRACTION: fraction}
    return make_record(suite, c.method, c.params, c.cell, status, metrics, error, started,
                       round(time.perf_counter() - t0, 3), family=family)


def method_facts(c: Cell) -> tuple[str | None, float | None]:
    """What the report needs from the method itself: its family and, where the cell has a context, the share of it
    that one decode step attends."""
    family = getattr(c.parsed, "family", None)
    context = c.cell.get("context")
    if family is None or not isinstance(context, int) or context < 1:
        return family, None
    return family, float(c.parsed.budget_fraction(context))


def run_sweep(suite: str, cells: list[Cell], runner: Callable[[Cell], dict], writer: RecordWriter,
              description: str | None = None, rerun: bool = False, show_progress: bool = True) -> SweepResult:
    """Run `runner(cell) -> metrics` for every cell not done yet and append one record per cell."""
    todo = pending(suite, cells, writer, rerun)
    result = SweepResult(already_done=len(cells) - len(todo))
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[now]}")]
    with progress_display(console, columns, enabled=show_progress) as progress:
        task = progress.add_task(description or suite, total=len(todo), now="")
        for c in todo:
            progress.update(task, now=f"{c.method} {_short(c.cell)}")
            rec = measure_cell(suite, c, runner)
            writer.append(rec)
            result.add(rec)
            if rec["status"] in ("failed", "oom"):
                first_line = rec["error"].splitlines()[0]
                console.print(f"[yellow]{rec['status']}[/]: {c.method} {_short(c.cell)}: {first_line}")
            progress.advance(task)
    return result


def _short(cell: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cell.items() if k not in ("model", "shape") and v is not None)[:80]
