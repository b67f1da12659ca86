"""A tiny suite for the Ray tests: cells that take a moment, and cells that kill or hang their worker on purpose."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from kvbench.sweep import Cell


@dataclass(frozen=True)
class FakeSource:
    """`methods` x `per_method` cells of suite `suite`; the cell (`trap_method`, 0) kills its worker (trap "kill") or
    hangs (trap "hang") while the file `trap_once` does not exist yet (it is created first), or always (no file)."""

    suite: str = "fake"
    model: str = "fake"
    methods: tuple[str, ...] = ("a", "b", "c")
    per_method: int = 2
    work_s: float = 0.05
    trap: str | None = None
    trap_method: str = "b"
    trap_once: str | None = None

    def cells(self) -> list[Cell]:
        return [Cell(m, {"p": 1}, {"model": "fake", "i": i}, parsed=f"{m}-built-here")
                for m in self.methods for i in range(self.per_method)]

    def open(self, method: str):
        loaded = {"method": method, "pid": os.getpid()}  # what a real group shares: a model load

        def runner(cell: Cell) -> dict:
            if self.trap and cell.method == self.trap_method and cell.cell["i"] == 0 and self._armed():
                if self.trap == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)
            time.sleep(self.work_s)
            return {"value": cell.cell["i"], "parsed": cell.parsed, "loaded_by": loaded["pid"]}

        return runner

    def _armed(self) -> bool:
        if self.trap_once is None:
            return True
        marker = Path(self.trap_once)
        if marker.exists():
            return False
        marker.touch()
        return True

    def options(self) -> dict:
        return {"methods": list(self.methods), "per_method": self.per_method}

    def group_of(self, cell: Cell) -> str:
        return cell.method
