"""The throughput suite's step accounting as a chart: each method's decode step time beside its floor and its GPU
busy time, per machine, context and batch (issue 11: "the report shows step time against floor per method").

The floor (floor_ms) is the bytes one step must read (weights plus what the method's attention reads) over the copy
bandwidth measured in the same run; gpu_busy_ms is the kernel time of one step from the profiler. A step far above its
floor with a small busy share is bound by the host (Python, launches), not by the method; graph mode removes that.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kvbench.records import machine_label
from kvbench.reports.plots import _grid, _layout, cell, median, metric, ok, origins, short_num

# each method in its report colour (as in every chart); the quantity by fill: the step solid, the part of it the GPU
# was busy hatched, the bytes floor dotted and pale
BARS = (("latency_ms", "step", "", 1.0), ("gpu_busy_ms", "GPU busy", "/", 0.8), ("floor_ms", "floor", ".", 0.45))


def _panels(recs: list[dict]) -> list[tuple[str, int, int]]:
    keys = {(machine_label(r.get("env")), cell(r, "context"), metric(r, "batch") or cell(r, "batch")) for r in recs}
    return sorted(keys, key=lambda k: (k[0].startswith("CPU"), k[0], k[1] or 0, k[2] or 0))


def _label(r: dict) -> str:
    mode = (r.get("metrics") or {}).get("decode_mode")
    return f"{r['method']} ({mode})" if mode else r["method"]


def step_accounting(records: list[dict], colors: dict[str, str]) -> go.Figure | None:
    """Grouped horizontal bars per panel (machine, context, batch): step, GPU busy and floor in ms, per method and
    decode mode; hover gives step / floor and busy / step."""
    recs = [r for r in ok(records) if metric(r, "floor_ms") is not None and metric(r, "latency_ms") is not None]
    if not recs:
        return None
    panels = _panels(recs)
    rows, cols = _grid(len(panels), 2)
    fig = make_subplots(rows=rows, cols=cols, vertical_spacing=0.35 / max(rows, 1) if rows > 1 else 0.1,
                        subplot_titles=[f"{m} · context {short_num(c)} · batch {b}" for m, c, b in panels])
    shown: set = set()
    for i, (machine, ctx, batch) in enumerate(panels):
        here = [r for r in recs if machine_label(r.get("env")) == machine and cell(r, "context") == ctx
                and (metric(r, "batch") or cell(r, "batch")) == batch]
        groups: dict[str, list[dict]] = {}
        for r in here:
            groups.setdefault(_label(r), []).append(r)
        labels = sorted(groups, key=lambda k: median(metric(r, "latency_ms") for r in groups[k]) or 0)
        for key, name, pattern, opacity in BARS:
            for k in labels:  # one trace per row and quantity: named by its method, so each method keeps its colour
                method = groups[k][0]["method"]
                fig.add_trace(go.Bar(
                    y=[k], x=[median(metric(r, key) for r in groups[k])], orientation="h", name=method,
                    legendgroup=method, showlegend=key == "latency_ms" and method not in shown, offsetgroup=name,
                    marker=dict(color=colors.get(method, "#636efa"), opacity=opacity,
                                pattern=dict(shape=pattern, fgcolor="#ffffff") if pattern else None),
                    hovertext=[f"{name}<br>{_hover(k, groups[k])}"], hoverinfo="text"), row=i // cols + 1,
                    col=i % cols + 1)
                if key == "latency_ms":
                    shown.add(method)
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="ms per decode step (bars: step solid, GPU busy hatched, floor dotted)",
                     title_font_size=11,
                     rangemode="tozero")
    return _layout(fig, "Decode step time against its floor (weights + attention bytes over copy bandwidth)",
                   max(330, 60 + 26 * max(len({_label(r) for r in recs}), 4)) * rows + 90)


def _hover(label: str, group: list[dict]) -> str:
    def m(k):
        return median(metric(r, k) for r in group)

    step, floor, busy = m("latency_ms"), m("floor_ms"), m("gpu_busy_ms")
    parts = [f"<b>{label}</b>", f"step {step:,.2f} ms", f"floor {floor:,.2f} ms ({step / floor:.2f}x floor)"]
    if busy is not None:
        parts.append(f"GPU busy {busy:,.2f} ms ({busy / step:.0%} of the step)")
    kernel = group[0]["metrics"].get("decode_kernel")
    why = group[0]["metrics"].get("graph_fallback")
    if kernel:
        parts.append(f"dense decode kernel {kernel}")
    if why:
        parts.append(f"eager because: {str(why)[:120]}")
    return "<br>".join(parts + [origins(group)])
