"""The report's first screen: per machine and model, which method, at what cost, with what saving.

One table per (machine, model): a row is one method at one parameter setting (its label), and every number in a row
was measured at that setting on that machine and model; a number measured at other parameters is never put beside
it, and a CPU's numbers never share a table with a GPU's. Speeds are read at one named reference cell per table
(REFERENCE when measured, else the cell most methods measured), never at the best cell of the grid. The grid behind
each table is one click away, in a <details> block.

    summary_html(records) -> str
"""

from __future__ import annotations

import html
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from kvbench.intervals import Interval, mean_interval, paired_against
from kvbench.records import machine_label
from kvbench.reports.plots import (budget_fraction, cell, median, mean, method_family, method_name, method_of, metric,
                                   model_of, ok, origins, short_commit, short_num, task_cell)

E = html.escape
REFERENCE = (32768, 8)  # context x batch a GPU's speeds are read at when measured (long-context decode)
CPU_REFERENCE = (256, 1)  # a CPU's: the quick profile's kernel and throughput cell (suites/kernels.py, throughput.py)
NOT_HERE = "<span class='n'>not measured at these settings</span>"
SNAPKV_DEFAULTS = ("SnapKV's default pooling here (max, kernel 7, window 32: the paper's LongBench setting) differs "
                   "from kvpress's default (avg, kernel 5, window 64), so the two libraries' default numbers are not "
                   "comparable.")
PROTOCOLS = ("query-aware", "query-agnostic")


@dataclass
class Row:
    """One method at one setting, on one machine and model: what it costs and saves."""

    label: str
    family: str = ""
    budget: float | None = None  # share of the context a decode step attends, at the table's context
    accuracy: dict[str, tuple[float, int]] = field(default_factory=dict)  # protocol -> (mean score, cells)
    interval: dict[str, Interval] = field(default_factory=dict)  # protocol -> the mean's bootstrap 95% interval
    vs_full: dict[str, Interval] = field(default_factory=dict)  # protocol -> paired difference from full, same cells
    ppl: tuple[float, int] | None = None  # (median perplexity, cells)
    bpt: float | None = None  # KV bytes per token
    bpt_from: str = ""  # "memory" or "accuracy"
    time_us: float | None = None  # decode-attention time at the reference cell
    speedup: float | None = None  # full's time / this time, same cell
    tok_s: float | None = None  # decode tokens/s at the reference cell
    tok_mode: str = ""  # the decode mode those tokens/s ran in: "graph", "eager" or both
    fit: tuple[int, float] | None = None  # (largest batch that fits at the reference context, its tokens/s)
    sources: list[dict] = field(default_factory=list)

    def score(self) -> float | None:
        vals = [v for v, _ in self.accuracy.values()]
        return mean(vals) if vals else None


@dataclass
class Table:
    machine: str
    model: str
    records: list[dict]
    kernel_cell: tuple[int, int] | None = None
    thr_cell: tuple[int, int] | None = None
    acc_context: int | None = None
    acc_cells: set | None = None  # the accuracy cells full measured: every row's score is over these (None: all)
    mem_context: int | None = None
    rows: dict[str, Row] = field(default_factory=dict)


def _suite(recs: list[dict], name: str) -> list[dict]:
    return [r for r in ok(recs) if r["suite"] == name]


def _cells(recs: list[dict], value: str) -> Counter:
    """(context, batch) -> how many methods measured `value` there."""
    seen = {(r["method"], cell(r, "context"), cell(r, "batch")) for r in recs if metric(r, value) is not None
            and isinstance(cell(r, "context"), (int, float)) and isinstance(cell(r, "batch"), (int, float))}
    return Counter((int(c), int(b)) for _, c, b in seen)


def reference_for(machine: str) -> tuple[int, int]:
    """The named reference cell of a machine: CPU_REFERENCE on a CPU, REFERENCE on a GPU."""
    return CPU_REFERENCE if machine.startswith("CPU") else REFERENCE


def pick_cell(counts: Counter, reference: tuple[int, int] = REFERENCE) -> tuple[int, int] | None:
    """The machine's reference cell when measured; else the cell the most methods measured, the larger context x
    batch on a tie."""
    if not counts:
        return None
    if reference in counts:
        return reference
    return max(counts, key=lambda cb: (counts[cb], cb[0] * cb[1], cb[0]))


def _nearest(values: set[int], target: int | None) -> int | None:
    if not values:
        return None
    if target is None:
        return max(values)
    return min(values, key=lambda v: (abs(math.log(v / target)), -v))


def build_tables(records: list[dict]) -> list[Table]:
    """One Table per (machine, model) that has numbers, GPUs first."""
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in ok(records):
        by[(machine_label(r.get("env")), model_of(r))].append(r)
    tables = [_table(m, model, recs) for (m, model), recs in by.items()]
    tables = [t for t in tables if t.rows]
    return sorted(tables, key=lambda t: (t.machine.startswith("CPU"), t.machine, t.model))


def _table(machine: str, model: str, recs: list[dict]) -> Table:
    t = Table(machine, model, recs)
    ker = [r for r in _suite(recs, "kernels") if str(cell(r, "mode") or "decode") == "decode"]
    thr = [r for r in _suite(recs, "throughput") if cell(r, "task", "decode") == "decode"]
    fit = [r for r in _suite(recs, "throughput") if metric(r, "max_batch") is not None]
    acc = [r for r in _suite(recs, "accuracy") if metric(r, "score") is not None]
    ppl = [r for r in _suite(recs, "accuracy") if metric(r, "ppl") is not None]
    mem = [r for r in _suite(recs, "memory") if metric(r, "bytes_per_token") is not None]
    ref = reference_for(machine)
    t.kernel_cell = pick_cell(_cells(ker, "time_us"), ref)
    tc = _cells(thr, "decode_tok_s")
    t.thr_cell = t.kernel_cell if t.kernel_cell in tc else pick_cell(tc, ref)
    contexts = Counter(int(cell(r, "context")) for r in acc if isinstance(cell(r, "context"), (int, float)))
    t.acc_context = max(contexts, key=lambda c: (contexts[c], c)) if contexts else None
    full_cells = {task_cell(r) for r in acc if r["method"] == "full" and cell(r, "context") == t.acc_context}
    t.acc_cells = full_cells or None
    target = t.kernel_cell[0] if t.kernel_cell else t.acc_context
    t.mem_context = _nearest({int(cell(r, "context")) for r in mem if isinstance(cell(r, "context"), (int, float))},
                             target)
    labels = {r["method"] for r in ker + thr + fit + acc + ppl + mem}
    for label in sorted(labels, key=lambda s: (s != "full", s)):
        t.rows[label] = row = _row(t, label, ker, thr, fit, acc, mem)
        mine = [metric(r, "ppl") for r in ppl if r["method"] == label]
        row.ppl = (median(mine), len(mine)) if mine else None
    _ratios(t)
    return t


def _at(recs: list[dict], label: str, cb: tuple[int, int] | None, value: str) -> list[dict]:
    if cb is None:
        return []
    return [r for r in recs if r["method"] == label and cell(r, "context") == cb[0] and cell(r, "batch") == cb[1]
            and metric(r, value) is not None]


def _row(t: Table, label: str, ker, thr, fit, acc, mem) -> Row:
    row = Row(label)
    mine = [r for r in t.records if r["method"] == label]
    row.family = method_family(mine[0])
    context = t.acc_context or (t.kernel_cell or (None,))[0] or t.mem_context
    row.budget = budget_fraction(mine[0], context) if context else None
    a = [r for r in acc if r["method"] == label and cell(r, "context") == t.acc_context
         and (t.acc_cells is None or task_cell(r) in t.acc_cells)]
    full = [r for r in acc if r["method"] == "full" and cell(r, "context") == t.acc_context]
    for proto in sorted({str(cell(r, "protocol") or "-") for r in a}, key=lambda p: (p not in PROTOCOLS, p)):
        g = [metric(r, "score") for r in a if str(cell(r, "protocol") or "-") == proto]
        row.accuracy[proto] = (mean(g), len(g))
        row.interval[proto] = mean_interval(g)
        if label != "full":
            row.vs_full[proto] = paired_against(*(_scores(x, proto) for x in (a, full)))
    m = [r for r in mem if r["method"] == label and cell(r, "context") == t.mem_context]
    if m:
        row.bpt, row.bpt_from = median(metric(r, "bytes_per_token") for r in m), "memory"
    elif not [r for r in mem if r["method"] == "full"]:  # no memory records here: the accuracy cells' bytes
        b = [metric(r, "bytes_per_token") for r in a if metric(r, "bytes_per_token") is not None]
        if b:
            row.bpt, row.bpt_from = median(b), "accuracy"
    k = _at(ker, label, t.kernel_cell, "time_us")
    if k:
        row.time_us = median(metric(r, "time_us") for r in k)
        row.speedup = median(metric(r, "speedup_vs_full") for r in k)
    h = _at(thr, label, t.thr_cell, "decode_tok_s")
    asked_graph = [r for r in h if cell(r, "decode") != "eager"]  # eager runs asked for (--no-graph) stay in the grid
    h = asked_graph or h
    if h:
        row.tok_s = median(metric(r, "decode_tok_s") for r in h)
        row.tok_mode = "/".join(sorted({str((r.get("metrics") or {}).get("decode_mode") or "eager") for r in h}))
    f = [r for r in fit if r["method"] == label and t.thr_cell and cell(r, "context") == t.thr_cell[0]]
    if f:
        best = max(f, key=lambda r: metric(r, "max_batch"))
        row.fit = (int(metric(best, "best_batch") or metric(best, "batch") or metric(best, "max_batch")),
                   metric(best, "best_decode_tok_s") or metric(best, "decode_tok_s"))
    row.sources = a + m + k + h + f
    return row


def _scores(recs: list[dict], proto: str) -> dict[tuple, float]:
    """task cell -> score, one protocol (a cell measured twice: its latest record)."""
    return {task_cell(r): metric(r, "score") for r in recs if str(cell(r, "protocol") or "-") == proto}


def _ratios(t: Table) -> None:
    """full's kernel time gives the speed-up where a record did not store it."""
    full = t.rows.get("full")
    for row in t.rows.values():
        if row.speedup is None and row.time_us and full and full.time_us:
            row.speedup = full.time_us / row.time_us


def speed_notes(records: list[dict]) -> dict[str, str]:
    """label -> its decode-attention and throughput speed-ups over full at each machine's reference cell, measured at
    the label's own parameters (the Pareto chart's hover text); a label measured nowhere has no entry."""
    notes: dict[str, list[str]] = defaultdict(list)
    for t in build_tables(records):
        full = t.rows.get("full")
        for label, r in t.rows.items():
            if label == "full":
                continue
            if r.speedup:
                notes[label].append(f"decode attention {faster(r.speedup)} than full at {_cell_name(t.kernel_cell)}"
                                    f" ({t.machine})")
            if r.tok_s and full and full.tok_s:
                notes[label].append(f"decode tokens/s {times(r.tok_s / full.tok_s)} full's at "
                                    f"{_cell_name(t.thr_cell)} ({t.machine})")
    return {k: "<br>".join(v) for k, v in notes.items()}


# --- HTML ---------------------------------------------------------------------------------------------------------


def times(x: float, below: str = "slower") -> str:
    """A ratio against full: 17.3×, 4.52×, and below 1 inverted: 0.097 -> '10.3× slower' (or '× more' for bytes)."""
    if x < 1:
        return f"{1 / x:,.0f}× {below}" if x < 0.001 else f"{1 / x:.3g}× {below}"
    return f"{x:.1f}×" if x >= 10 else f"{x:.2f}×"


def faster(x: float) -> str:
    """'7.48× faster' or '10.3× slower'."""
    return f"{times(x)} faster" if x >= 1 else times(x)


def _x(v: float | None, ref: float | None, invert: bool = False, below: str = "slower") -> str:
    """' (4.52×)': full's value over this one (or this over full's), or ''."""
    if v is None or ref is None or v <= 0 or ref <= 0:
        return ""
    return f" <span class='n'>({times(ref / v if not invert else v / ref, below)})</span>"


def percent(share: float | None) -> str:
    """0.1 -> '10%', 0.00488 -> '0.49%', 1.0 -> 'all'."""
    if share is None:
        return "–"
    return "all" if share >= 1 else f"{share * 100:.2g}%" if share < 0.1 else f"{share * 100:.3g}%"


def _num(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def best_tradeoff(t: Table) -> str:
    """Names the best trade-off, by a rule the page states: the most accurate method that stores less than full
    (fewer bytes per token as the tie-break); where no accuracy was measured, the fastest at the reference cell."""
    full = t.rows.get("full")
    others = [r for r in t.rows.values() if r.label != "full"]
    scored = [r for r in others if r.score() is not None]
    if full is not None and full.bpt is not None and any(r.bpt for r in scored):  # bytes known: only savers
        scored = [r for r in scored if r.bpt is not None and r.bpt < full.bpt]
    if scored:
        b = max(scored, key=lambda r: (round(r.score(), 6), -(r.bpt or math.inf)))
        parts = [f"mean score {b.score():.3f}" + (f" (full {full.score():.3f})" if full and full.score() is not None
                                                 else "")]
        if b.bpt and full and full.bpt:
            parts.append(f"{times(full.bpt / b.bpt)} fewer KV bytes per token")
        if b.speedup:
            parts.append(f"decode attention {faster(b.speedup)} at the reference cell")
        return (f"<b>{E(b.label)}</b>: " + ", ".join(parts) + ". <span class='n'>Rule: the most accurate method that "
                "stores less than full.</span>")
    fast = [r for r in others if r.speedup]
    if fast:
        b = max(fast, key=lambda r: r.speedup)
        saving = f", {times(full.bpt / b.bpt)} fewer KV bytes per token" if b.bpt and full and full.bpt else ""
        return (f"<b>{E(b.label)}</b>: decode attention {faster(b.speedup)} at the reference cell{saving}. "
                "<span class='n'>No accuracy was measured on this machine and model: the rule here is the fastest "
                "at the reference cell; its accuracy at the same setting, where measured, is in the CPU table.</span>")
    return "<span class='n'>not enough numbers here to name one.</span>"


def _cell_name(cb: tuple[int, int] | None) -> str:
    return f"{short_num(cb[0])} tokens × batch {cb[1]}" if cb else "–"


def table_html(t: Table) -> str:
    full = t.rows.get("full")
    protos = [p for p in PROTOCOLS if any(p in r.accuracy for r in t.rows.values())] + sorted(
        {p for r in t.rows.values() for p in r.accuracy if p not in PROTOCOLS})
    ctx = t.acc_context or (t.kernel_cell or (None,))[0] or t.mem_context
    head = ["method", f"attends per step{f' at {short_num(ctx)}' if ctx else ''}"]
    head += [f"accuracy {E(p)}" + (f" at {short_num(t.acc_context)}" if t.acc_context else "") for p in protos]
    if any(r.ppl for r in t.rows.values()):
        head.append("perplexity <span class='n'>(median)</span>")
    if any(r.bpt for r in t.rows.values()):
        head.append("KV bytes per token" + (f" at {short_num(t.mem_context)}" if t.mem_context else "")
                    + " <span class='n'>(× less than full)</span>")
    cols = {"time": any(r.time_us for r in t.rows.values()), "tok": any(r.tok_s for r in t.rows.values()),
            "fit": any(r.fit for r in t.rows.values())}
    if cols["time"]:
        head.append(f"decode attention at {_cell_name(t.kernel_cell)} <span class='n'>(× faster than full)</span>")
    if cols["tok"]:
        head.append(f"decode tokens/s at {_cell_name(t.thr_cell)} <span class='n'>(× full)</span>")
    if cols["fit"]:
        head.append(f"largest batch in memory at {short_num(t.thr_cell[0])}: tokens/s <span class='n'>(× full)</span>")
    rows = []
    for r in t.rows.values():
        spec = method_of(r.label).spec() if method_of(r.label) is not None else r.label
        tds = [f"<th class='m' title='{E(spec)}'>{E(r.label)}<br><span class='n'>{E(r.family)}</span></th>",
               f"<td>{percent(r.budget)}</td>"]
        for p in protos:
            tds.append(f"<td>{_accuracy_text(r, p)}</td>")
        if any(x.ppl for x in t.rows.values()):
            tds.append(f"<td><b>{r.ppl[0]:.2f}</b> <span class='n'>(n={r.ppl[1]})</span></td>" if r.ppl
                       else f"<td>{NOT_HERE}</td>")
        if any(x.bpt for x in t.rows.values()):
            note = " <span class='n'>from the accuracy cells</span>" if r.bpt_from == "accuracy" else ""
            tds.append(f"<td><b>{_num(r.bpt)}</b>{_x(r.bpt, full.bpt if full else None, below='more')}{note}</td>"
                       if r.bpt is not None else f"<td>{NOT_HERE}</td>")
        if cols["time"]:
            sp = f" <span class='n'>({times(r.speedup)})</span>" if r.speedup and r.label != "full" else ""
            tds.append(f"<td><b>{_num(r.time_us, '{:,.1f} µs')}</b>{sp}</td>" if r.time_us is not None
                       else f"<td>{NOT_HERE}</td>")
        if cols["tok"]:
            mode = f" <small>{E(r.tok_mode)}</small>" if r.tok_s and r.tok_mode else ""
            tds.append(f"<td><b>{_num(r.tok_s, '{:,.1f}')}</b>{mode}"
                       f"{_x(r.tok_s, full.tok_s if full else None, True) if r.label != 'full' else ''}</td>"
                       if r.tok_s is not None else f"<td>{NOT_HERE}</td>")
        if cols["fit"]:
            ff = full.fit[1] if full and full.fit else None
            tds.append(f"<td><b>{_num(r.fit[1], '{:,.1f}')}</b> at batch {r.fit[0]}"
                       f"{_x(r.fit[1], ff, True) if r.label != 'full' else ''}</td>" if r.fit
                       else f"<td>{NOT_HERE}</td>")
        rows.append(f"<tr title='{E(origins(r.sources))}'>" + "".join(tds) + "</tr>")
    return ("<div class='scroll'><table class='summary'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")


def _accuracy_text(r: Row, proto: str) -> str:
    """'<b>0.722</b> [0.61, 0.83] (n=108)' and, below it, the paired difference from full on the same cells."""
    v, iv, d = r.accuracy.get(proto), r.interval.get(proto), r.vs_full.get(proto)
    if v is None:
        return NOT_HERE
    text = f"<b>{v[0]:.3f}</b>" + (f" <span class='ci'>[{iv.lo:.2f}, {iv.hi:.2f}]</span>" if iv else "")
    text += f" <span class='n'>(n={v[1]})</span>"
    if d is not None:
        text += (f"<br><span class='n'>vs full {d.mean:+.3f} [{d.lo:+.2f}, {d.hi:+.2f}] on {d.n} paired cells"
                 "</span>")
    return text


def _reference_text(t: Table) -> str:
    parts = []
    if t.kernel_cell:
        ref = reference_for(t.machine)
        why = (f"this machine's reference cell" if t.kernel_cell == ref else
               f"the cell most methods measured; the reference {_cell_name(ref)} was not measured")
        parts.append(f"speeds at {_cell_name(t.kernel_cell)} ({why})")
    if t.thr_cell and t.thr_cell != t.kernel_cell:
        parts.append(f"throughput at {_cell_name(t.thr_cell)}")
    if t.acc_context:
        parts.append(f"accuracy at {short_num(t.acc_context)}-token prompts, the mean score with its bootstrap 95% "
                     "interval over cells, and its paired difference from full on the same cells")
        if t.acc_cells:
            parts.append(f"every score over the {len(t.acc_cells)} cells full was scored on (the same tasks, depths "
                         "and seeds)")
    elif any(r["suite"] != "accuracy" for r in t.records):
        parts.append("accuracy not measured on this machine and model")
    if t.mem_context:
        parts.append(f"bytes per token at {short_num(t.mem_context)}")
    commits = sorted({short_commit(r.get("env")) for r in t.records})
    snap = any(method_name(r.label) in ("snapkv", "pyramidkv", "adakv") for r in t.rows.values())
    return ("Reference: " + "; ".join(parts) + ". A number measured at other parameters than its row's is never "
            "shown in it: such cells say \"not measured at these settings\"." + (f" {SNAPKV_DEFAULTS}" if snap else "")
            + f" <span class='src'>Commits: {E(', '.join(commits))}.</span>")


def grid_html(t: Table) -> str:
    """Every cell behind a table: one pivot per suite, method by cell."""
    parts = []
    specs = (("kernels", "decode attention µs (× faster than full)", "time_us",
              lambda r: f"{short_num(cell(r, 'context'))}×{cell(r, 'batch')}", "speedup_vs_full"),
             ("throughput", "decode tokens/s", "decode_tok_s",
              lambda r: f"{short_num(cell(r, 'context'))}×{cell(r, 'batch') or 'largest batch in memory'}", None),
             ("memory", "KV bytes per token", "bytes_per_token", lambda r: short_num(cell(r, "context") or 0), None),
             ("accuracy", "mean score (cells)", "score",
              lambda r: f"{cell(r, 'task')} · {cell(r, 'protocol') or '-'} · {short_num(cell(r, 'context') or 0)}",
              None))
    for suite, what, value, col, extra in specs:
        recs = [r for r in _suite(t.records, suite) if metric(r, value) is not None
                and (suite != "kernels" or str(cell(r, "mode") or "decode") == "decode")]
        if not recs:
            continue
        cols = sorted({col(r) for r in recs}, key=_colkey)
        labels = sorted({r["method"] for r in recs}, key=lambda s: (s != "full", s))
        body = []
        for label in labels:
            tds = []
            for c in cols:
                g = [r for r in recs if r["method"] == label and col(r) == c]
                if not g:
                    tds.append("<td>–</td>")
                    continue
                v = (mean if suite == "accuracy" else median)(metric(r, value) for r in g)
                x = median(metric(r, extra) for r in g) if extra else None
                text = f"{v:.3f} ({len(g)})" if suite == "accuracy" else f"{v:,.1f}" if v < 100 else f"{v:,.0f}"
                tds.append(f"<td>{text}{f' <span class=n>({times(x)})</span>' if x else ''}</td>")
            body.append(f"<tr><th class='m'>{E(label)}</th>{''.join(tds)}</tr>")
        parts.append(f"<h4>{E(suite)}: {E(what)}</h4><div class='scroll'><table class='grid'><thead><tr><th>method"
                     "</th>" + "".join(f"<th>{E(c)}</th>" for c in cols) + "</tr></thead><tbody>" + "".join(body)
                     + "</tbody></table></div>")
    n = len(t.records)
    return f"<details><summary>The grid behind this table ({n} records)</summary>{''.join(parts)}</details>"


def _colkey(c: str) -> tuple:
    """Sort '4K×8' and '32K×1' by number, not by text."""
    def num(s: str) -> float:
        s = s.strip()
        mult = 1024 if s.endswith("K") else 1
        try:
            return float(s.rstrip("Kk")) * mult
        except ValueError:
            return math.inf
    pieces = c.replace("·", "×").split("×")
    return tuple((num(p), p) for p in pieces)


def summary_html(records: list[dict]) -> str:
    tables = build_tables(records)
    if not tables:
        return ""
    out = ["<p class='lead'>Which method, at what cost, with what saving: one table per machine and model. A row "
           "is one method at one parameter setting, and every number in it was measured at that setting; speeds are "
           "read at the reference cell named above each table, never at the best cell of the grid.</p>"]
    for t in tables:
        out.append(f"<div class='machine'><h3>{E(t.machine)} · {E(t.model)}</h3>"
                   f"<p class='ref'>{_reference_text(t)}</p><p class='best'>Best trade-off here: {best_tradeoff(t)}"
                   f"</p>{table_html(t)}{grid_html(t)}</div>")
    return "".join(out)
