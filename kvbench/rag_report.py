"""The report's RAG section (reports/build.py draws it for the rag suite's records): per method, task and number
of documents, the mean score against the median time to first token, and against the bytes held relative to
recompute. Synthetic-model records (no score) are drawn at score 0 with their TTFT and bytes in the hover."""

from __future__ import annotations

import statistics

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def _mean(xs):
    xs = [float(x) for x in xs if isinstance(x, (int, float))]
    return sum(xs) / len(xs) if xs else None


def figure(records: list[dict], colors: dict[str, str]) -> go.Figure | None:
    good = [r for r in records if r.get("status") == "ok" and r.get("metrics", {}).get("ttft_s") is not None]
    if not good:
        return None
    groups: dict[tuple, list[dict]] = {}
    for r in good:
        c = r["cell"]
        groups.setdefault((r["method"], c.get("task"), c.get("documents"), c.get("model")), []).append(r["metrics"])
    fig = make_subplots(rows=1, cols=2, subplot_titles=("score against time to first token",
                                                        "score against bytes held (x recompute's)"))
    shown: set = set()
    for (method, task, n, model), ms in sorted(groups.items(), key=lambda kv: [str(k) for k in kv[0]]):
        f1 = _mean(m.get("score") for m in ms) or 0.0
        ttft = statistics.median(m["ttft_s"] for m in ms)
        held = _mean(m.get("bytes_held_vs_recompute") for m in ms)
        hover = (f"{method}<br>{task}, {n} documents, {model}<br>score {f1:.3f} over {len(ms)} cells<br>TTFT "
                 f"{ttft:.3g} s<br>recompute {_mean(m.get('recompute_ratio') for m in ms) or 0:.3f}, kept "
                 f"{_mean(m.get('kept_ratio') for m in ms) or 1:.3f}<br>first-token error "
                 f"{_mean(m.get('first_logits_rel_err') for m in ms) or 0:.3f}")
        for col, x in ((1, ttft), (2, held)):
            if x is None:
                continue
            fig.add_trace(go.Scatter(x=[x], y=[f1], mode="markers", name=method, legendgroup=method,
                                     showlegend=method not in shown, marker=dict(size=10, color=colors.get(method)),
                                     hovertext=[hover], hoverinfo="text"), row=1, col=col)
            shown.add(method)
    fig.update_xaxes(title_text="TTFT s (median, log)", type="log", row=1, col=1)
    fig.update_xaxes(title_text="bytes held / recompute's", row=1, col=2)
    fig.update_yaxes(title_text="score (mean)", range=[-0.05, 1.05])
    fig.update_layout(title="RAG: multi-context caches", height=420, margin=dict(t=70, b=50))
    return fig
