"""The README's accuracy table from accuracy records: per method and protocol the mean score with its bootstrap 95%
interval and the paired difference from `full` (suites/accuracy.py: summary_rows, the terminal table's numbers),
the interval's half-width, and the median decode step per prompt length (seconds a generated token, task cells).

Several files are read as one set of records (e.g. seeds 0-2 and seeds 3-5 of the same cells, measured apart); a
record whose method, cell and protocol came twice keeps the last file's.

    python benchmarks/accuracy_table.py reports/data/cpu/accuracy-standard.jsonl reports/data/cpu/accuracy-...jsonl
"""

import argparse
import json
import statistics
from collections import defaultdict

from kvbench.suites.accuracy import _test_key, summary_rows


def load(paths: list[str]) -> list[dict]:
    by_key: dict[tuple, dict] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    by_key[(r["method"], _test_key(r))] = r
    return list(by_key.values())


def step_seconds(records: list[dict]) -> dict[str, dict[int, float]]:
    """Median decode seconds per generated token, per method and prompt length (task cells, not ppl)."""
    steps: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        m = r.get("metrics") or {}
        if r["status"] == "ok" and r["cell"].get("task") != "ppl" and m.get("new_tokens") and m.get("decode_s"):
            steps[r["method"]][r["cell"]["context"]].append(m["decode_s"] / m["new_tokens"])
    return {k: {c: statistics.median(v) for c, v in sorted(d.items())} for k, d in steps.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    records = load(ap.parse_args().files)
    rows = summary_rows(records)
    fmt = lambda v, ci, sign="": f"{v:{sign}.3f} [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]"  # noqa: E731
    print("| method | protocol | scored cells | mean [95% CI] | half-width | vs full, paired [95% CI] |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["score"] is None:
            continue
        half = (r["score_ci"][1] - r["score_ci"][0]) / 2
        diff = fmt(r["vs_full"], r["vs_full_ci"], "+") if r["vs_full"] is not None else "-"
        print(f"| `{r['method']}` | {r['protocol']} | {r['scored']} | {fmt(r['score'], r['score_ci'])} | "
              f"{half:.3f} | {diff} |")
    steps = step_seconds(records)
    full = steps.get("full", {})
    print("\nmedian decode step, s a token (x full's at the same length):")
    for method, by_len in steps.items():
        cells = ", ".join(f"{c // 1024}K {s:.3f}" + (f" ({s / full[c]:.2f}x)" if c in full and method != "full" else "")
                          for c, s in by_len.items())
        print(f"  {method}: {cells}")


if __name__ == "__main__":
    main()
