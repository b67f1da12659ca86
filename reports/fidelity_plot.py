"""The fidelity suite's chart (suites/fidelity_at_length.py): per layer, what each method's selection keeps (top-k
recall, attention mass) and what each stage loses (output error of the selection alone, what storage adds, both)."""

from __future__ import annotations

from collections import defaultdict

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kvbench.reports.plots import _layout, layer_array, mean, ok, origins, short_num

PANELS = (("topk_recall", "top-k recall (selection)"), ("attn_mass", "attention mass kept (selection)"),
          ("sel_out_err", "output error: selection alone"), ("storage_err", "output error added by storage"),
          ("out_rel_err", "output error: both stages"))


def fidelity_at_length(records: list[dict], colors: dict[str, str]) -> go.Figure | None:
    """One line per method and context, the mean over text windows of each per-layer array."""
    lines: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in ok(records):
        if layer_array(r, "out_rel_err"):
            lines[(r["method"], r["cell"].get("context") or 0)].append(r)
    if not lines:
        return None
    fig = make_subplots(rows=2, cols=3, subplot_titles=[t for _, t in PANELS], horizontal_spacing=0.07,
                        vertical_spacing=0.14)
    dashes = {n: d for n, d in zip(sorted({c for _, c in lines}), ("solid", "dash", "dot", "dashdot"))}
    for j, (name, _) in enumerate(PANELS):
        for (method, context), recs in sorted(lines.items()):
            arrays = [a for a in (layer_array(r, name) for r in recs) if a]
            if not arrays:
                continue
            label = f"{method} @ {short_num(context)}"
            ys = [mean(a[i] for a in arrays if i < len(a) and a[i] is not None) for i in range(max(map(len, arrays)))]
            fig.add_trace(go.Scatter(x=list(range(len(ys))), y=ys, mode="lines+markers", name=label,
                                     legendgroup=label, showlegend=j == 0, marker=dict(size=4),
                                     line=dict(color=colors.get(method), dash=dashes.get(context, "solid")),
                                     hovertemplate=f"<b>{label}</b> layer %{{x}}: %{{y:.4f}}<br>mean of {len(arrays)} "
                                                   f"text windows<br>{origins(recs)}<extra></extra>"),
                          row=j // 3 + 1, col=j % 3 + 1)
    fig.update_xaxes(title_text="layer", title_font_size=11)
    for col in (1, 2):
        fig.update_yaxes(range=[-0.02, 1.05], row=1, col=col)
    return _layout(fig, "Attention fidelity per layer at length (teacher-forced decode steps on real prose vs the "
                        "full cache)", 640)
