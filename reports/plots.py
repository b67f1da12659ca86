"""Plotly figures for the report, one function per chart, each built from plain records (kvbench.records).

Every function takes the records of its suite and a colour per method label, and returns a Figure, or None when
the records hold nothing it can draw (the page then says "no records for this section"). Failed and out-of-memory
cells are drawn as red crosses with their error in the hover text, never dropped. Every hover text names the machine
and commit the number came from (`origin`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from collections import defaultdict
from typing import Any, Callable, Iterable

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kvbench.api import Method
from kvbench.records import machine_label

FAIL_COLOR = "#d62728"
TEMPLATE = "plotly_white"
FIDELITY_METRICS = ("topk_recall", "attn_mass", "out_rel_err")


# --- reading records --------------------------------------------------------------------------------------------


def cell(r: dict, key: str, default: Any = None) -> Any:
    c = r.get("cell")
    return c.get(key, default) if isinstance(c, dict) else default


def metric(r: dict, key: str) -> float | None:
    """A numeric metric, or None when it is missing, null or not a number (a bool is not a number here)."""
    m = r.get("metrics")
    v = m.get(key) if isinstance(m, dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def short_commit(env: dict | None) -> str:
    c = (env or {}).get("commit") or "unknown commit"
    sha, _, dirty = str(c).partition("-")
    return sha[:10] + ("-" + dirty if dirty else "")


def origin(r: dict) -> str:
    """Where a number came from: machine and commit."""
    env = r.get("env") if isinstance(r.get("env"), dict) else {}
    return f"{machine_label(env)} @ {short_commit(env)}"


def model_of(r: dict) -> str:
    """The model (or attention shape) a record measured, under one name whichever suite wrote it: the accuracy suite
    says "embedded", the memory suite the shape "smollm2-135m"; "synthetic:llama-3.1-8b" has llama-3.1-8b's shape."""
    from kvbench.models import EMBEDDED_NAMES

    name = str(cell(r, "model") or cell(r, "shape") or "?").removeprefix("synthetic:")
    return "smollm2-135m" if name in EMBEDDED_NAMES else name


def ok(records: Iterable[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok"]


def bad(records: Iterable[dict]) -> list[dict]:
    """Cells that did not produce numbers and must still be shown: failed and out of memory."""
    return [r for r in records if r.get("status") in ("failed", "oom")]


def first_line(text: Any, limit: int = 160) -> str:
    s = str(text or "").strip().splitlines()
    s = s[0] if s else ""
    return s if len(s) <= limit else s[: limit - 1] + "…"


def median(xs: Iterable[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def mean(xs: Iterable[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def origins(recs: Iterable[dict]) -> str:
    return ", ".join(sorted({origin(r) for r in recs}))


def method_name(label: str) -> str:
    return label.partition(":")[0]


@functools.lru_cache(maxsize=None)
def method_of(label: str):
    """The Method a record's label names (kvbench.registry.parse_method), or None for a method this kvbench does not
    have (a plugin not installed here, a renamed parameter): the report then falls back to what the record says."""
    from kvbench.registry import parse_method

    try:
        return parse_method(label)
    except Exception:  # noqa: BLE001 - any label a record holds must cost a fallback, not the page
        return None


def canonical(label: str) -> str:
    """The label as this kvbench writes it ('selfindex:budget=160.0' -> 'selfindex:budget=160'), so records of one
    setting written by different commits are one method in the report."""
    m = method_of(label)
    return m.label() if m is not None else label


def method_family(r: dict) -> str:
    """'dense', 'quantization', 'selection', 'eviction', 'window' ...: the record's `method_family`, else the method's
    declared family (kvbench.api.Method.family), else 'unknown'."""
    if isinstance(r.get("method_family"), str):
        return r["method_family"]
    m = method_of(r["method"])
    return m.family if m is not None else "unknown"


def budget_fraction(r: dict, context: Any = None) -> float | None:
    """The share of the context one decode step attends: the record's metrics.budget_fraction, else the method's own
    answer (Method.budget_fraction) at the record's context (or `context`); None when neither is known."""
    v = metric(r, "budget_fraction")
    if v is not None and context is None:
        return v
    ctx = context if context is not None else cell(r, "context")
    m = method_of(r["method"])
    if m is None or not isinstance(ctx, (int, float)) or ctx <= 0:
        return v
    try:
        return float(m.budget_fraction(int(ctx)))
    except Exception:  # noqa: BLE001 - a plugin's budget_fraction may fail on an odd context
        return v


def attends_all(r: dict) -> bool:
    """The method attends every token at every context (full, a quantizer): a reference level, not a budget point."""
    m = method_of(r["method"])
    return m is not None and type(m).budget_fraction is Method.budget_fraction


def line_of(r: dict) -> str:
    """The label without the parameters that set the budget, so one line of the budget chart is one method at its
    other settings: a parameter is a budget parameter when putting its default back changes budget_fraction."""
    m = method_of(r["method"])
    if m is None:
        return r["method"]
    ctx = cell(r, "context") if isinstance(cell(r, "context"), (int, float)) and cell(r, "context") > 0 else 4096
    keep = {}
    for f in dataclasses.fields(m):
        v = getattr(m, f.name)
        if v == f.default:
            continue
        try:
            moves = dataclasses.replace(m, **{f.name: f.default}).budget_fraction(int(ctx)) != m.budget_fraction(
                int(ctx))
        except Exception:  # noqa: BLE001 - a combination the method refuses: keep the parameter in the line
            moves = False
        if not moves:
            keep[f.name] = v
    return type(m)(**{**{f.name: f.default for f in dataclasses.fields(m)}, **keep}).label()


# Colours far apart (CIE Lab distance over 20 between any two of the first 16), none of them the red that marks
# failed cells; `full` is always the first, near-black, as the reference every chart compares with.
COLORS = ("#222222", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#17becf", "#e377c2", "#8c564b", "#bcbd22",
          "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#009e73", "#393b79", "#f7b6d2", "#637939", "#9edae5",
          "#843c39", "#dbdb8d")


def palette(labels: Iterable[str]) -> dict[str, str]:
    """A colour per method label (and per budget-chart line), `full` always the first: one method keeps its colour in
    every chart of the page."""
    ordered = sorted(set(labels), key=lambda s: (s != "full", s))
    return {label: COLORS[i % len(COLORS)] for i, label in enumerate(ordered)}


def _by(records: Iterable[dict], key: Callable[[dict], Any]) -> dict[Any, list[dict]]:
    out: dict[Any, list[dict]] = defaultdict(list)
    for r in records:
        out[key(r)].append(r)
    return dict(out)


def _sortkey(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def _several_machines(records: list[dict]) -> bool:
    return len({machine_label(r.get("env")) for r in records}) > 1


def _line_label(r: dict, with_machine: bool) -> str:
    return r["method"] + (f" · {machine_label(r.get('env'))}" if with_machine else "")


def _fail_hover(r: dict) -> str:
    return (f"<b>{r['status'].upper()}</b> {r['method']}<br>{_cell_text(r)}<br>{first_line(r.get('error'), 120)}"
            f"<br>{origin(r)}")


def _cell_text(r: dict) -> str:
    c = r.get("cell") if isinstance(r.get("cell"), dict) else {}
    return " ".join(f"{k}={v}" for k, v in c.items() if v is not None and k != "model")


def _layout(fig: go.Figure, title: str, height: int = 420, **kw) -> go.Figure:
    fig.update_layout(template=TEMPLATE, title=dict(text=title, x=0, xanchor="left"), height=height,
                      margin=dict(l=60, r=20, t=70, b=50), legend=dict(font=dict(size=11)),
                      hoverlabel=dict(align="left"), **kw)
    return fig


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(max_cols, max(1, n))
    return (n + cols - 1) // cols, cols


def short_num(v: float) -> str:
    """4096 -> 4K, 131072 -> 128K (token counts are powers of two), 20000 -> 20k, 0.05 -> 0.05."""
    if v >= 1024 and float(v).is_integer() and int(v) % 1024 == 0:
        return f"{int(v) // 1024}K"
    if v >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def compact(v: float) -> str:
    """Three significant digits with a k or M suffix: 1960960 -> 1.96M, 25040 -> 25k, 4753.1 -> 4.75k, 59 -> 59."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def log_ticks(values: Iterable[Any], at_data: bool = True) -> dict:
    """Tick values and labels for a log axis: the data values themselves when there are few (contexts, batches,
    budgets), else 1-2-5 steps; plotly's default labels every minor digit, which is hard to read."""
    vals = sorted({float(v) for v in values if isinstance(v, (int, float)) and v > 0})
    if not vals:
        return {}
    if not (at_data and len(vals) <= 10):
        lo, hi = math.floor(math.log10(vals[0])), math.ceil(math.log10(vals[-1]))
        vals = [m * 10 ** e for e in range(lo, hi + 1) for m in (1, 2, 5) if vals[0] / 2 <= m * 10 ** e <= vals[-1] * 2]
    return dict(tickmode="array", tickvals=vals, ticktext=[short_num(v) for v in vals])


def _fail_trace(recs: list[dict], x: Callable[[dict], Any], y: Callable[[dict], Any], show: bool) -> go.Scatter:
    return go.Scatter(x=[x(r) for r in recs], y=[y(r) for r in recs], mode="markers", name="failed / out of memory",
                      legendgroup="failed", showlegend=show,
                      marker=dict(symbol="x", size=11, color=FAIL_COLOR, line=dict(width=1)),
                      hovertext=[_fail_hover(r) for r in recs], hoverinfo="text")


# --- accuracy -----------------------------------------------------------------------------------------------------


def task_cell(r: dict) -> tuple:
    """What makes two accuracy records the same test: task, context, depth, seed, protocol (not model or dtype)."""
    return tuple(sorted((k, str(v)) for k, v in (r.get("cell") or {}).items() if k not in ("model", "dtype", "device")))


def same_cells_as_full(scored: list[dict]) -> list[dict]:
    """Per model, the scored records on the cells `full` was scored on too (all of them where full has none), so
    every method's mean is over the same tests."""
    out = []
    for _, recs in _by(scored, model_of).items():
        full = {task_cell(r) for r in recs if r["method"] == "full"}
        out += [r for r in recs if not full or task_cell(r) in full]
    return out


def bytes_per_token_for(model: str, accuracy: list[dict], memory: list[dict]) -> tuple[dict[str, float], str]:
    """Median KV bytes per token per method label for one model: from the memory suite's records of that model (a
    cache of exactly the context) when it has any, else from the accuracy records themselves (the cache at the end
    of the cell, decode headroom included). Never a mix: the two count different things. Returns ({label: bytes},
    where the numbers come from)."""
    for recs, what in ((memory, "memory"), (accuracy, "accuracy")):
        vals: dict[str, list[float]] = defaultdict(list)
        for r in ok(recs):
            if model_of(r) == model and metric(r, "bytes_per_token") is not None:
                vals[r["method"]].append(metric(r, "bytes_per_token"))
        if vals:
            return {k: median(v) for k, v in vals.items()}, f"{what} records of {model}"
    return {}, ""


def score_interval(group: list[dict]):
    """The bootstrap 95% interval of the group's mean score over its cells (kvbench.intervals)."""
    from kvbench.intervals import mean_interval

    return mean_interval([metric(r, "score") for r in group])


def error_bars(ivs: list) -> dict:
    """Plotly's asymmetric error bars from intervals (None: no bar)."""
    return dict(type="data", symmetric=False, thickness=1.2, width=3,
                array=[iv.hi - iv.mean if iv else 0 for iv in ivs], arrayminus=[iv.mean - iv.lo if iv else 0
                                                                                 for iv in ivs])


def pareto(accuracy: list[dict], memory: list[dict], colors: dict[str, str],
           speeds: dict[str, str] | None = None) -> go.Figure | None:
    """Mean task score (with its bootstrap 95% interval) against KV bytes per token, one point per method and
    protocol; each protocol's Pareto front dashed (a method's score depends on the protocol, so one front across both
    would compare unlike things). `speeds`: label -> its speed-ups at the reference cell, measured at the same
    parameters (reports/summary.speed_notes); a label without them says so."""
    scored = same_cells_as_full([r for r in ok(accuracy) if metric(r, "score") is not None])
    if not scored:
        return None
    fig = go.Figure()
    front_pts: dict[str, list[tuple[float, float]]] = defaultdict(list)
    sources = []
    for model, recs in sorted(_by(scored, model_of).items()):
        bpt, source = bytes_per_token_for(model, accuracy, memory)
        if not bpt:
            continue
        sources.append(source)
        for (label, protocol), group in sorted(_by(recs, lambda r: (r["method"], str(cell(r, "protocol") or "-")))
                                               .items()):
            if label not in bpt:
                continue
            score = mean(metric(r, "score") for r in group)
            iv = score_interval(group)
            front_pts[protocol].append((bpt[label], score))
            speed = (speeds or {}).get(label, "kernel and throughput speed-ups: not measured at these settings")
            fig.add_trace(go.Scatter(
                x=[bpt[label]], y=[score], mode="markers", error_y=error_bars([iv]),
                name=f"{label} ({protocol})", legendgroup=label,
                marker=dict(size=13, color=colors.get(label), symbol="diamond" if protocol == "query-agnostic"
                            else "circle", line=dict(width=1, color="#333")),
                hovertext=[f"<b>{label}</b> ({protocol}, {model})<br>mean score {score:.3f} [{iv.lo:.2f}, "
                           f"{iv.hi:.2f}] over {len(group)} cells<br>{bpt[label]:,.0f} bytes/token<br>{speed}<br>"
                           f"{origins(group)}"], hoverinfo="text"))
    if not front_pts:
        return None
    for protocol, pts in sorted(front_pts.items()):
        front, best = [], float("-inf")
        for x, y in sorted(pts, key=lambda p: (p[0], -p[1])):
            if y > best:  # fewer bytes and a higher score than everything cheaper: on the front
                front.append((x, y))
                best = y
        fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines",
                                 name=f"Pareto front ({protocol})", line=dict(dash="dash" if protocol !=
                                 "query-agnostic" else "dot", color="#888", shape="hv"), hoverinfo="skip"))
    fig.update_xaxes(title="KV bytes per token (log)", type="log",
                     **log_ticks((p[0] for pts in front_pts.values() for p in pts), False))
    fig.update_yaxes(title="mean score", range=[-0.05, 1.08])
    return _layout(fig, f"Accuracy against KV bytes per token <sup>(bytes from {'; '.join(sources)}; "
                        f"circle: query-aware, diamond: query-agnostic; bars: bootstrap 95% intervals over cells)"
                        f"</sup>", 480)


def accuracy_vs_budget(accuracy: list[dict], colors: dict[str, str]) -> go.Figure | None:
    """Mean score (with its bootstrap 95% interval over cells) against the share of the context a decode step attends
    (Method.budget_fraction): first one panel per context and protocol over all tasks (the cells full was scored on),
    then one per task and protocol. Methods that attend every token are a dashed reference level. With one budget
    measured there is no curve to draw: the chart is then the score of each method at that budget, with the
    reference levels beside it."""
    recs = [r for r in accuracy if r.get("status") in ("ok", "failed", "oom")]
    recs = [r for r in recs if (r.get("status") != "ok" or metric(r, "score") is not None)
            and budget_fraction(r) is not None]
    if not ok(recs):
        return None
    by_panel = _by(recs, lambda r: (str(cell(r, "task") or "?"), str(cell(r, "protocol") or "-")))
    panels = sorted(by_panel)
    budgets = sorted({_share(r) for r in ok(recs) if not attends_all(r)})
    if len(budgets) <= 1:
        return _accuracy_at_one_budget(by_panel, panels, budgets, colors)
    overview = _by(same_cells_as_full(ok(recs)), lambda r: (f"all tasks · {short_num(cell(r, 'context') or 0)}",
                                                            str(cell(r, "protocol") or "-")))
    order = sorted(overview, key=lambda k: (k[1], _colnum(k[0]))) + panels
    by_panel = {**overview, **by_panel}
    rows, cols = _grid(len(order))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{t} · {p}" for t, p in order],
                        vertical_spacing=0.5 / max(rows, 1) if rows > 1 else 0.1, horizontal_spacing=0.06)
    lo, shown = budgets[0] / 1.5, set()
    for i, panel in enumerate(order):
        row, col = i // cols + 1, i % cols + 1
        for line, frecs in sorted(_by(ok(by_panel[panel]), line_of).items()):
            trace = _budget_line(line, frecs, lo, colors)
            trace.update(name=line, legendgroup=line, showlegend=line not in shown)
            fig.add_trace(trace, row=row, col=col)
            shown.add(line)
        fails = bad(by_panel[panel])
        if fails:
            fig.add_trace(_fail_trace(fails, _share, lambda r: 0.0, "failed" not in shown), row=row, col=col)
            shown.add("failed")
    fig.update_xaxes(type="log", title_text="share of the context attended per step (log)", title_font_size=11,
                     range=[math.log10(lo), math.log10(1.15)], **log_ticks(budgets + [1.0]))
    fig.update_yaxes(range=[-0.05, 1.08], title_text="score", title_font_size=11)
    return _layout(fig, "Accuracy against budget (bars: bootstrap 95% intervals over cells), over all tasks per "
                        "context, then per task", 320 * rows + 60)


def _colnum(title: str) -> float:
    """'all tasks · 4K' -> 4096: the overview panels in context order."""
    tail = title.rpartition(" ")[2]
    try:
        return float(tail.rstrip("Kk")) * (1024 if tail.endswith("K") else 1)
    except ValueError:
        return math.inf


def _budget_line(line: str, frecs: list[dict], lo: float, colors: dict[str, str]) -> go.Scatter:
    """One method's points (mean and interval per budget), or a dashed level for a method that attends all."""
    pts = sorted(_by(frecs, _share).items())
    ivs = [score_interval(g) for _, g in pts]
    hover = [f"<b>{line}</b> attends {b:.3g} of the context<br>mean score {iv.mean:.3f} [{iv.lo:.2f}, {iv.hi:.2f}] "
             f"over {len(g)} cells<br>{origins(g)}" for (b, g), iv in zip(pts, ivs)]
    color = colors.get(line) or colors.get(frecs[0]["method"])
    if all(attends_all(r) for r in frecs):  # a reference level across the panel, not a point at 1
        level = score_interval(frecs)
        return go.Scatter(x=[lo, 1.0], y=[level.mean] * 2, mode="lines", line=dict(color=color, dash="dash"),
                          hovertext=[hover[0]] * 2, hoverinfo="text")
    return go.Scatter(x=[b for b, _ in pts], y=[iv.mean for iv in ivs], mode="lines+markers", line=dict(color=color),
                      marker=dict(size=8), error_y=error_bars(ivs), hovertext=hover, hoverinfo="text")


def _share(r: dict) -> float:
    """The budget fraction as a chart point: 10% of 512, 1,024 and 2,048 tokens (0.0508, 0.0508, 0.0503: whole tokens)
    is one point, 0.05; the shortest rounding within 3% of the value."""
    b = budget_fraction(r)
    for digits in (1, 2, 3):
        v = float(f"{b:.{digits}g}")
        if abs(v - b) <= 0.03 * b:
            return v
    return b


def _accuracy_at_one_budget(by_panel: dict, panels: list, budgets: list[float], colors: dict[str, str]) -> go.Figure:
    """One budget (or none) measured: a dot per method and panel, dashed levels for the methods that attend all."""
    at = f"{budgets[0]:.3g} of the context" if budgets else "no budget below the whole context"
    fig = go.Figure()
    labels = sorted({r["method"] for p in panels for r in ok(by_panel[p])}, key=lambda s: (s != "full", s))
    names = [f"{t} · {p}" for t, p in panels]
    for label in labels:
        pts = [(n, [r for r in ok(by_panel[p]) if r["method"] == label]) for n, p in zip(names, panels)]
        pts = [(n, g) for n, g in pts if g]
        ref = all(attends_all(r) for _, g in pts for r in g)
        fig.add_trace(go.Scatter(
            x=[n for n, _ in pts], y=[mean(metric(r, "score") for r in g) for _, g in pts], name=label,
            mode="markers", marker=dict(size=14 if ref else 12, color=colors.get(label), symbol="line-ew-open" if ref
                                        else "circle", line=dict(width=3 if ref else 1, color=colors.get(label))),
            hovertext=[f"<b>{label}</b> · {n}<br>mean score {mean(metric(r, 'score') for r in g):.3f} over {len(g)} "
                       f"cells<br>{origins(g)}" for n, g in pts], hoverinfo="text"))
    fails = [r for p in panels for r in bad(by_panel[p])]
    if fails:
        fig.add_trace(_fail_trace(fails, lambda r: f"{cell(r, 'task') or '?'} · {cell(r, 'protocol') or '-'}",
                                  lambda r: 0.0, True))
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=names, title_text="task · protocol")
    fig.update_yaxes(range=[-0.05, 1.08], title_text="mean score")
    return _layout(fig, f"Accuracy at the one budget measured ({at}; dash: methods that attend every token)<br><sup>"
                        "for a curve, give a method several budgets, e.g. {name = \"selfindex\", budget = [0.05, 0.1, "
                        "0.2]}</sup>", 420, scattermode="group")


def needle_heatmap(accuracy: list[dict]) -> go.Figure | None:
    """Needle retrieval score by depth (rows) and context length (columns), one panel per method and protocol."""
    recs = [r for r in accuracy if cell(r, "depth") is not None and cell(r, "context") is not None
            and r.get("status") in ("ok", "failed", "oom")]
    recs = [r for r in recs if r.get("status") != "ok" or metric(r, "score") is not None]
    if not ok(recs):
        return None
    panels = sorted(_by(recs, lambda r: (r["method"], str(cell(r, "protocol") or "-"))))
    rows, cols = _grid(len(panels))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{m} · {p}" for m, p in panels],
                        vertical_spacing=0.35 / max(rows, 1) if rows > 1 else 0.1, horizontal_spacing=0.08)
    groups = _by(recs, lambda r: (r["method"], str(cell(r, "protocol") or "-")))
    for i, key in enumerate(panels):
        g = groups[key]
        depths = sorted({cell(r, "depth") for r in g}, key=_sortkey)
        ctxs = sorted({cell(r, "context") for r in g}, key=_sortkey)
        z, text, hover = [], [], []
        for d in depths:
            zr, tr, hr = [], [], []
            for c in ctxs:
                here = [r for r in g if cell(r, "depth") == d and cell(r, "context") == c]
                good = [metric(r, "score") for r in ok(here)]
                fails = bad(here)
                val = mean(good)
                zr.append(val)
                label = "" if val is None else f"{val:.2f}"
                if fails:
                    label += (" " if label else "") + "/".join(sorted({r["status"] for r in fails}))
                tr.append(label)
                hr.append(f"depth {d}, context {c}<br>score {label or '-'} ({len(good)} ok, {len(fails)} failed)"
                          + "".join(f"<br>{r['status']}: {first_line(r.get('error'), 100)}" for r in fails[:2])
                          + f"<br>tasks: {', '.join(sorted({str(cell(r, 'task')) for r in here}))}"
                          + f"<br>{origins(here)}")
            z.append(zr)
            text.append(tr)
            hover.append(hr)
        fig.add_trace(go.Heatmap(z=z, x=[str(c) for c in ctxs], y=[str(d) for d in depths], text=text,
                                 texttemplate="%{text}", hovertext=hover, hoverinfo="text", zmin=0, zmax=1,
                                 colorscale="RdYlGn", showscale=i == 0, colorbar=dict(title="score", len=0.6)),
                      row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(type="category", title_text="context (tokens)", title_font_size=11)
    fig.update_yaxes(type="category", title_text="depth", title_font_size=11)
    return _layout(fig, "Needle retrieval: score by depth and context length", 300 * rows + 80)


def fidelity(accuracy: list[dict], colors: dict[str, str]) -> go.Figure | None:
    """Per-layer attention fidelity (top-k recall, attention mass, output relative error), mean over cells."""
    per: dict[str, dict[str, list[list[float]]]] = {m: defaultdict(list) for m in FIDELITY_METRICS}
    srcs: dict[str, list[dict]] = defaultdict(list)
    for r in ok(accuracy):
        for m in FIDELITY_METRICS:
            arr = layer_array(r, m)
            if arr:
                per[m][r["method"]].append(arr)
                srcs[r["method"]].append(r)
    if not any(per[m] for m in FIDELITY_METRICS):
        return None
    titles = {"topk_recall": "top-k recall", "attn_mass": "attention mass kept", "out_rel_err": "output rel. error"}
    fig = make_subplots(rows=1, cols=3, subplot_titles=[titles[m] for m in FIDELITY_METRICS],
                        horizontal_spacing=0.07)
    shown = set()
    for j, m in enumerate(FIDELITY_METRICS):
        for label, arrays in sorted(per[m].items()):
            n = max(len(a) for a in arrays)
            ys = [mean(a[i] for a in arrays if i < len(a)) for i in range(n)]
            fig.add_trace(go.Scatter(x=list(range(n)), y=ys, mode="lines+markers", name=label, legendgroup=label,
                                     showlegend=label not in shown, line=dict(color=colors.get(label)),
                                     marker=dict(size=4),
                                     hovertemplate=f"<b>{label}</b> layer %{{x}}: %{{y:.4f}}<br>mean of "
                                                   f"{len(arrays)} cells<br>{origins(srcs[label])}<extra></extra>"),
                          row=1, col=j + 1)
            shown.add(label)
    fig.update_xaxes(title_text="layer", title_font_size=11)
    fig.update_yaxes(range=[-0.02, 1.05], row=1, col=1)
    fig.update_yaxes(range=[-0.02, 1.05], row=1, col=2)
    fig.update_yaxes(rangemode="tozero", row=1, col=3)  # linear: full's error is 0, which a log axis cannot show
    return _layout(fig, "Attention fidelity per layer (decode steps vs the full cache)", 420)


def layer_array(r: dict, name: str) -> list[float] | None:
    """A per-layer array of a fidelity metric, under any of the spellings a suite may use:
    `<name>_per_layer`, `<name>_layers`, `per_layer: {name: [...]}`, `layers: {name: [...]}`, or `<name>: [...]`."""
    m = r.get("metrics") if isinstance(r.get("metrics"), dict) else {}
    candidates = [m.get(f"{name}_per_layer"), m.get(f"{name}_layers"), m.get(name)]
    for nest in ("per_layer", "layers"):
        if isinstance(m.get(nest), dict):
            candidates.append(m[nest].get(name))
    for c in candidates:
        if isinstance(c, list) and c and all(isinstance(v, (int, float)) or v is None for v in c):
            return [float(v) if v is not None else None for v in c]
    return None


# --- performance --------------------------------------------------------------------------------------------------


def _perf_lines(fig: go.Figure, recs: list[dict], x_key: Callable[[dict], Any], y_name: str, colors: dict[str, str],
                row: int, col: int, shown: set, with_machine: bool, floor: str | None = None,
                extra: Callable[[list[dict]], str] = lambda g: "") -> None:
    for line, g in sorted(_by(ok(recs), lambda r: _line_label(r, with_machine)).items()):
        pts = sorted(((x, grp) for x, grp in _by([r for r in g if metric(r, y_name) is not None], x_key).items()
                      if x is not None), key=lambda p: _sortkey(p[0]))
        if not pts:
            continue
        color = colors.get(g[0]["method"])
        ys = [median(metric(r, y_name) for r in grp) for _, grp in pts]
        fig.add_trace(go.Scatter(
            x=[x for x, _ in pts], y=ys, mode="lines+markers", name=line, legendgroup=line,
            showlegend=line not in shown, line=dict(color=color), marker=dict(size=7),
            hovertext=[f"<b>{line}</b><br>{_cell_text(grp[0])}<br>{y_name} {y:,.4g}{extra(grp)}<br>{origins(grp)}"
                       for (x, grp), y in zip(pts, ys)], hoverinfo="text"), row=row, col=col)
        if floor:
            fl = [median(metric(r, floor) for r in grp) for _, grp in pts]
            if any(v is not None for v in fl):
                # a dash marker at each floor as well: a single context would draw no line
                fig.add_trace(go.Scatter(
                    x=[x for x, _ in pts], y=fl, mode="lines+markers", name=f"{line} floor", legendgroup=line,
                    showlegend=False, line=dict(color=color, dash="dot", width=1.5),
                    marker=dict(symbol="line-ew-open", size=14, color=color, line=dict(width=2)),
                    hovertemplate=f"{line} bandwidth floor %{{y:,.4g}} {floor}<extra></extra>"), row=row, col=col)
        shown.add(line)


def _machine_panels(recs: list[dict], key: str) -> list[tuple[str, Any]]:
    """(machine, cell[key]) pairs, GPUs first, then by value."""
    pairs = {(machine_label(r.get("env")), cell(r, key)) for r in recs}
    return sorted(pairs, key=lambda p: (p[0].startswith("CPU"), p[0], _sortkey(p[1])))


def _panel_title(machine: str, key: str, value: Any, with_machine: bool) -> str:
    v = short_num(value) if isinstance(value, (int, float)) else str(value)
    return (f"{machine} · " if with_machine else "") + f"{key} {v}"


def kernel_time(kernels: list[dict], colors: dict[str, str], mode: str = "decode") -> go.Figure | None:
    """Decode-attention time against context per batch size, each method's bandwidth floor dotted beside it."""
    recs = [r for r in kernels if str(cell(r, "mode") or "decode") == mode
            and r.get("status") in ("ok", "failed", "oom")]
    if not any(metric(r, "time_us") is not None for r in ok(recs)):
        return None
    # one panel per batch size, and per machine when several: a CPU and a GPU time never share an axis
    many = _several_machines(recs)
    panels = _machine_panels(recs, "batch")
    rows, cols = _grid(len(panels), 2)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[_panel_title(m, "batch", b, many) for m, b in panels],
                        vertical_spacing=0.4 / max(rows, 1) if rows > 1 else 0.1)
    shown: set = set()
    for i, (machine, b) in enumerate(panels):
        here = [r for r in recs if machine_label(r.get("env")) == machine and cell(r, "batch") == b]
        row, col = i // cols + 1, i % cols + 1
        _perf_lines(fig, here, lambda r: cell(r, "context"), "time_us", colors, row, col, shown, False,
                    floor="floor_us" if mode == "decode" else None,
                    extra=lambda g: "".join(f"<br>{k} {median(metric(r, k) for r in g):,.3g}"
                                            for k in ("floor_us", "bandwidth_gbs", "speedup_vs_full")
                                            if median(metric(r, k) for r in g) is not None))
        ys = [metric(r, "time_us") for r in ok(here) if metric(r, "time_us")]
        fails = bad(here)
        if fails:
            fig.add_trace(_fail_trace(fails, lambda r: cell(r, "context"), lambda r: min(ys) if ys else 1.0,
                                      "failed" not in shown), row=row, col=col)
            shown.add("failed")
    fig.update_xaxes(type="log", title_text="context (tokens, log)", title_font_size=11,
                     **log_ticks(cell(r, "context") for r in recs))
    fig.update_yaxes(type="log", title_text="time (µs, log)", title_font_size=11,
                     **log_ticks((metric(r, k) for r in ok(recs) for k in ("time_us", "floor_us")), False))
    title = ("Decode attention time against context (dotted: bandwidth floor = bytes it must move / copy bandwidth)"
             if mode == "decode" else f"{mode.capitalize()} time against context")
    return _layout(fig, title, 330 * rows + 90)


def throughput(records: list[dict], colors: dict[str, str]) -> go.Figure | None:
    """End-to-end decode tokens/s against batch size, one panel per context length."""
    recs = [r for r in records if r.get("status") in ("ok", "failed", "oom")]
    if not any(metric(r, "decode_tok_s") is not None for r in ok(recs)):
        return None
    many = _several_machines(recs)
    panels = _machine_panels(recs, "context")
    rows, cols = _grid(len(panels), 2)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[_panel_title(m, "context", c, many) for m, c in panels],
                        vertical_spacing=0.4 / max(rows, 1) if rows > 1 else 0.1)
    shown: set = set()

    def batch(r):
        return cell(r, "batch") if cell(r, "batch") is not None else metric(r, "batch")

    for i, (machine, c) in enumerate(panels):
        here = [r for r in recs if machine_label(r.get("env")) == machine and cell(r, "context") == c]
        row, col = i // cols + 1, i % cols + 1
        _perf_lines(fig, here, batch, "decode_tok_s", colors, row, col, shown, False,
                    extra=lambda g: "".join(f"<br>{k} {median(metric(r, k) for r in g):,.4g}"
                                            for k in ("ttft_s", "latency_ms")
                                            if median(metric(r, k) for r in g) is not None)
                    + ("<br>cache filled with synthetic k/v" if any(cell(r, "fill") == "synthetic" for r in g)
                       else ""))
        fails = bad(here)
        if fails:
            fig.add_trace(_fail_trace(fails, batch, lambda r: 0.0, "failed" not in shown), row=row, col=col)
            shown.add("failed")
    fig.update_xaxes(type="log", title_text="batch (log)", title_font_size=11, **log_ticks(batch(r) for r in recs))
    fig.update_yaxes(title_text="decode tokens/s", title_font_size=11, rangemode="tozero")
    return _layout(fig, "End-to-end decode throughput against batch", 330 * rows + 90)


def memory_fit(memory: list[dict], colors: dict[str, str]) -> go.Figure | None:
    """The largest context and the largest batch each method fits in the memory budget, and its bytes per token: one
    row of panels per machine (a CPU's and a GPU's budgets are never on one axis), method names only on the left."""
    panels = (("max_context", "largest context that fits (tokens)"), ("max_batch", "largest batch that fits"),
              ("bytes_per_token", "KV bytes per token (median)"))
    good = [r for r in ok(memory) if any(metric(r, k) is not None for k, _ in panels)]
    if not good:
        return None
    machines = _per_machine_sorted(good)
    titles = []
    for machine in machines:
        here = [r for r in good if machine_label(r.get("env")) == machine]
        titles += [t + _budget_text(here, k) for k, t in panels]
    fig = make_subplots(rows=len(machines), cols=3, subplot_titles=titles, shared_yaxes=True,
                        horizontal_spacing=0.04, vertical_spacing=0.25 / len(machines) + 0.05)
    for i, machine in enumerate(machines):  # the machine above its row of panels, clear of the panel titles
        top = fig.get_subplot(i + 1, 1).yaxis.domain[1]
        fig.add_annotation(text=f"<b>{machine}</b>", x=0, xref="paper", xanchor="left", y=top, yref="paper",
                           yanchor="bottom", yshift=24, showarrow=False, font=dict(size=13))
    heights = []
    for i, machine in enumerate(machines):
        here = [r for r in good if machine_label(r.get("env")) == machine]
        models = {model_of(r) for r in here}
        names = sorted({(r["method"], model_of(r)) for r in here}, key=lambda x: (x[0] != "full", x))
        ylabels = [f"{m} ({model})" if len(models) > 1 else m for m, model in names]
        heights.append(len(names))
        for j, (key, _) in enumerate(panels):
            groups = _by([r for r in here if metric(r, key) is not None], lambda r: (r["method"], model_of(r)))
            items = [(n, y, groups[n]) for n, y in zip(names, ylabels) if n in groups]
            vals = [max(metric(r, key) for r in g) if key != "bytes_per_token" else median(metric(r, key) for r in g)
                    for _, _, g in items]
            fig.add_trace(go.Bar(
                y=[y for _, y, _ in items], x=vals, orientation="h", showlegend=False,
                marker_color=[colors.get(n[0]) for n, _, _ in items], text=[compact(v) for v in vals],
                textposition="outside", cliponaxis=False,
                hovertext=[f"<b>{n[0]}</b> on {n[1]}<br>{key} {v:,.0f}<br>{len(g)} cells{_budget_text(g, key, True)}"
                           f"<br>{origins(g)}" for (n, _, g), v in zip(items, vals)], hoverinfo="text"),
                row=i + 1, col=j + 1)
            top = max(vals, default=1)
            fig.update_xaxes(range=[0, top * 1.25], row=i + 1, col=j + 1)  # room for the value beside the bar
        fig.update_yaxes(categoryorder="array", categoryarray=ylabels[::-1], automargin=True, row=i + 1, col=1)
    fig.update_yaxes(type="category")  # a panel without bars must still match its row's axis, of the same type
    fig = _layout(fig, "Memory: what fits, per method", 130 * len(machines) + sum(60 + 26 * n for n in heights))
    return fig.update_layout(margin=dict(t=110))


def _per_machine_sorted(recs: list[dict]) -> list[str]:
    """Machines of the records, GPUs first."""
    return sorted({machine_label(r.get("env")) for r in recs}, key=lambda m: (m.startswith("CPU"), m))


def _budget_text(recs: list[dict], key: str, hover: bool = False) -> str:
    """' within 78.7 GiB' for the fit searches: the memory budget they searched in, stated where the number is."""
    if key == "bytes_per_token":
        return ""
    budgets = sorted({metric(r, "budget_bytes") for r in recs if metric(r, key) is not None} - {None})
    if not budgets:
        return ""
    text = " or ".join(f"{b / 2**30:.3g} GiB" if b >= 2**30 else f"{b / 2**20:.3g} MiB" for b in budgets)
    return f"<br>memory budget {text}" if hover else f" in {text}"
