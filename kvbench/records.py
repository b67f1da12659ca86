"""Results records: one JSON object per line, one line per sweep cell.

Top-level keys: schema, suite, method, method_family, params, cell, status (ok | failed | oom | skipped), error,
metrics, env, started_at, duration_s. The metric names shared across suites are defined in kvbench/metrics.py.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import socket
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from kvbench.metrics import METHOD_FAMILY

SCHEMA = 1
STATUSES = ("ok", "failed", "oom", "skipped")
REQUIRED = ("schema", "suite", "method", "cell", "status")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@functools.cache
def git_commit() -> str | None:
    """The commit of the kvbench checkout this code runs from (KVBENCH_COMMIT overrides, e.g. on a copy)."""
    if os.environ.get("KVBENCH_COMMIT"):
        return os.environ["KVBENCH_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


@functools.cache
def environment() -> dict[str, Any]:
    """Where a number came from: machine, GPU, driver, CUDA and library versions, git commit."""
    import torch
    import transformers

    from kvbench.attention import flash_attn_version

    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "flash_attn": flash_attn_version(),
        "cuda": torch.version.cuda,
        "gpu": None,
        "driver": None,
        "commit": git_commit(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}")
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as e:  # NVML missing or refused: say so rather than guess
            env["driver"] = f"unknown (NVML: {type(e).__name__})"
    return env


def machine_label(env: dict[str, Any] | None) -> str:
    """Short 'where it ran' label: the GPU name, or the CPU host."""
    env = env or {}
    return env.get("gpu") or f"CPU ({env.get('host', '?')})"


def _clean(x: Any) -> Any:
    """JSON cannot hold NaN or infinity; records store null instead."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy or torch scalars
        return _clean(x.item())
    if hasattr(x, "is_floating_point") or type(x).__name__ == "dtype":
        return str(x)
    return x


def make_record(suite: str, method: str, params: dict, cell: dict, status: str, metrics: dict | None = None,
                error: str | None = None, started_at: str | None = None, duration_s: float | None = None, *,
                family: str | None = None) -> dict:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
    return _clean({
        "schema": SCHEMA, "suite": suite, "method": method, METHOD_FAMILY: family, "params": params, "cell": cell,
        "status": status,
        "error": error, "metrics": metrics or {}, "env": environment(), "started_at": started_at or now_iso(),
        "duration_s": duration_s,
    })


def cell_key(suite: str, method: str, cell: dict) -> str:
    """Identity of a sweep cell, to skip it on a rerun. `method` is the method's label (name and parameters)."""
    return json.dumps([suite, method, _clean(cell)], sort_keys=True)


class RecordWriter:
    """Appends records to a JSONL file, one atomic write per line, and knows which cells are already done."""

    def __init__(self, path: str | Path):
        self.path = Path(path)  # its folder is made by the first append: a run that stops first leaves nothing

    def done(self, statuses: Iterable[str] = ("ok", "oom", "skipped")) -> set[str]:
        """Keys of cells that finished (a failed cell is retried on a rerun)."""
        keep = set(statuses)
        records, _ = read_records([self.path]) if self.path.exists() else ([], [])
        return {cell_key(r["suite"], r["method"], r["cell"]) for r in records if r.get("status") in keep}

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=False, default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write on an O_APPEND descriptor: the line lands whole or not at all
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class Problem:
    """A record that could not be read: which file and line, and why."""

    file: str
    line: int
    reason: str


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.rglob("*.jsonl")))
        else:
            files.append(p)
    return files


def read_records(paths: Iterable[str | Path]) -> tuple[list[dict], list[Problem]]:
    """Read every record from JSONL files and folders (recursively). Unreadable lines become Problems, not errors."""
    records, problems = [], []
    for f in _expand(paths):
        if not f.exists():
            problems.append(Problem(str(f), 0, "no such file"))
            continue
        with open(f, encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append(Problem(str(f), i, f"not valid JSON ({e.msg}); truncated line?"))
                    continue
                if not isinstance(rec, dict):
                    problems.append(Problem(str(f), i, "not a JSON object"))
                    continue
                missing = [k for k in REQUIRED if k not in rec]
                if missing:
                    problems.append(Problem(str(f), i, f"missing field(s): {', '.join(missing)}"))
                    continue
                if rec["status"] not in STATUSES:
                    problems.append(Problem(str(f), i, f"unknown status {rec['status']!r}"))
                    continue
                rec.setdefault("metrics", {})
                rec.setdefault("params", {})
                rec.setdefault("env", {})
                rec["_source"] = f"{f}:{i}"
                records.append(rec)
    return records, problems
