"""How much faster `kvbench compare --ray` runs 8 independent cells with 2 workers than the serial `kvbench compare`.

    python benchmarks/ray_speedup.py                      # 8 memory-suite cells (KIVI variants) at 8K, 2 workers
    python benchmarks/ray_speedup.py --context 4K --workers 2 --out benchmarks/records/ray_speedup-cpu.json

The comparison is 8 groups of one cell (the memory suite's `hold` cell of 8 KIVI settings: bits x group x residual,
built at the embedded model's shape): nothing is shared between them, so 2 workers can at best halve the time. Both
runs are whole commands, timed from outside (Ray's start-up, the report and every import included), on the same
file into fresh folders; both must hold the same 8 `ok` cells. The serial run uses torch's default threads (one per
core); each Ray worker gets one core. The machine's load (`uptime` before and after) goes into the result, since a
shared machine's neighbours change both times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvbench.records import cell_key, environment, read_records

COMPARISON = """title = "ray speed-up: 8 independent memory cells"
methods = [{{name = "kivi", bits = [2, 4], group = [32, 64], residual = [128, 256]}}]
model = "embedded"
[suites.memory]
contexts = "{context}"
search = false
budget = "2G"
"""


def timed(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def ok_cells(folder: Path) -> list[str]:
    records, _ = read_records([folder / "memory.jsonl"])
    return sorted(cell_key(r["suite"], r["method"], r["cell"]) for r in records if r["status"] == "ok")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", default="8K", help="context of each cell (default 8K)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the result as JSON here too")
    args = ap.parse_args()
    kvbench = [sys.executable, "-m", "kvbench.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "c.toml").write_text(COMPARISON.format(context=args.context))
        load_before = uptime()
        serial_s = timed([*kvbench, "compare", str(tmp / "c.toml"), "--out", str(tmp / "serial")], tmp / "serial.log")
        ray_s = timed([*kvbench, "compare", str(tmp / "c.toml"), "--out", str(tmp / "ray"), "--ray", "--workers",
                       str(args.workers)], tmp / "ray.log")
        load_after = uptime()
        serial_cells, ray_cells = ok_cells(tmp / "serial"), ok_cells(tmp / "ray")
    if len(serial_cells) != 8 or serial_cells != ray_cells:
        sys.exit(f"the two runs disagree: serial {len(serial_cells)} ok cells, ray {len(ray_cells)}")
    env = environment()
    result = {"benchmark": "ray_speedup", "cells": 8, "context": args.context, "workers": args.workers,
              "serial_s": round(serial_s, 1), "ray_s": round(ray_s, 1), "speedup": round(serial_s / ray_s, 2),
              "cpu_count": os.cpu_count(), "host": env["host"], "commit": env["commit"], "torch": env["torch"],
              "uptime_before": load_before, "uptime_after": load_after,
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    print(f"8 cells at {args.context}: serial {serial_s:.1f} s, ray ({args.workers} workers) {ray_s:.1f} s, "
          f"{serial_s / ray_s:.2f}x | load before: {load_before} | after: {load_after}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
