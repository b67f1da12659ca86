"""The step-accounting chart (reports/steps.py): step, GPU busy and floor per method, from throughput records."""

import pytest

pytest.importorskip("plotly")  # the GPU machine has no plotly: the chart is drawn where the report is built

from kvbench.reports.steps import step_accounting  # noqa: E402


def _rec(method, mode, step, floor, busy, batch=8, gpu="NVIDIA H200"):
    return {"suite": "throughput", "method": method, "status": "ok", "params": {},
            "cell": {"context": 32768, "batch": batch, "decode": mode},
            "metrics": {"batch": batch, "latency_ms": step, "floor_ms": floor, "gpu_busy_ms": busy,
                        "decode_mode": mode, "graph_fallback": None if mode == "graph" else "--no-graph"},
            "env": {"gpu": gpu, "commit": "abc1234"}}


def test_step_chart_has_one_row_per_method_and_mode_and_the_ratios_in_hover():
    recs = [_rec("full", "graph", 16.0, 11.6, 15.0), _rec("full", "eager", 53.0, 11.6, 14.6),
            _rec("snapkv:capacity=0.1", "eager", 47.0, 4.3, 7.7), _rec("full", "graph", 8.2, 4.5, 7.6, batch=1)]
    fig = step_accounting(recs, {"full": "#1f77b4", "snapkv:capacity=0.1": "#ff7f0e"})
    assert len(fig.data) == 3 * 4  # three quantities for each of the four rows (batch 1: one, batch 8: three)
    steps = [t for t in fig.data if t.offsetgroup == "step"]
    assert [t.y[0] for t in steps] == ["full (graph)", "full (graph)", "snapkv:capacity=0.1 (eager)", "full (eager)"]
    floors = {t.y[0]: t.x[0] for t in fig.data if t.offsetgroup == "floor" and t.xaxis == steps[1].xaxis}
    assert floors == {"full (graph)": 11.6, "snapkv:capacity=0.1 (eager)": 4.3, "full (eager)": 11.6}
    assert {t.marker.color for t in fig.data if t.name == "full"} == {"#1f77b4"}  # a method keeps its colour
    hover = steps[1].hovertext[0]
    assert "1.38x floor" in hover and "94% of the step" in hover


def test_step_chart_is_absent_without_step_accounting():
    rec = _rec("full", "eager", 1.0, 1.0, 1.0)
    del rec["metrics"]["floor_ms"]  # CPU records have no floor
    assert step_accounting([rec], {}) is None
