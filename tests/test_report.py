"""The HTML report: built from synthetic records that follow the schema (kvbench/records.py), every section present,
record strings escaped, malformed lines reported with file:line while the rest is still built, nothing loaded from
the network."""

import json
import random
import re

import pytest
from typer.testing import CliRunner

pytest.importorskip("plotly", reason="the report needs plotly (the GPU machine has none)")
from kvbench.cli import app
from kvbench.reports.build import SECTIONS, build_report, script_json

GPU_ENV = {"host": "gpu-box", "gpu": "NVIDIA H100 80GB HBM3", "driver": "580.65", "cuda": "12.8", "torch": "2.11.0",
           "transformers": "5.17.0", "flash_attn": None, "python": "3.11.9", "platform": "Linux",
           "commit": "0123456789abcdef0123456789abcdef01234567"}
CPU_ENV = {"host": "ci-runner", "gpu": None, "driver": None, "cuda": None, "torch": "2.13.0", "transformers": "5.23.0",
           "flash_attn": None, "python": "3.11.7", "platform": "Linux", "commit": "fedcba9876543210fedcba9876543210fedcba98"}
METHODS = {"full": ({}, 1.0), "selfindex:budget=0.1": ({"budget": 0.1, "setting": "2+1"}, 0.96),
           "selfindex:budget=0.05": ({"budget": 0.05, "setting": "2+1"}, 0.9),
           "kivi:bits=2": ({"bits": 2, "group": 32, "residual": 128}, 0.97),
           "snapkv:capacity=0.1": ({"capacity": 0.1, "window": 32}, 0.8)}
BPT = {"full": 23040.0, "selfindex:budget=0.1": 5040.0, "selfindex:budget=0.05": 5040.0, "kivi:bits=2": 4680.0,
       "snapkv:capacity=0.1": 2304.0}


def rec(suite, method, cell, metrics=None, status="ok", error=None, env=CPU_ENV, params=None):
    return {"schema": 1, "suite": suite, "method": method, "params": params if params is not None else
            METHODS.get(method, ({}, 1))[0], "cell": cell, "status": status, "error": error, "metrics": metrics or {},
            "env": env, "started_at": "2026-01-01T00:00:00+00:00", "duration_s": 1.5}


def synthetic_records(seed=0):
    """{suite: [record, ...]} covering every chart, with failed and oom cells, from a CPU and a GPU machine."""
    rnd = random.Random(seed)
    out = {"accuracy": [], "memory": [], "kernels": [], "throughput": []}
    for m, (params, quality) in METHODS.items():
        for protocol in ("query-aware", "query-agnostic"):
            drop = 0.0 if protocol == "query-aware" or not m.startswith("snapkv") else 0.3
            for task in ("passkey", "niah_single"):
                for ctx in (512, 1024, 2048):
                    for depth in (0.1, 0.5, 0.9):
                        score = float(rnd.random() < quality - drop)
                        out["accuracy"].append(rec("accuracy", m, {
                            "model": "embedded", "task": task, "context": ctx, "depth": depth, "protocol": protocol,
                            "seed": 0}, {"score": score, "bytes_per_token": BPT[m], "topk_recall": quality,
                                         "attn_mass": quality, "out_rel_err": 1 - quality,
                                         "topk_recall_per_layer": [min(1, quality + rnd.uniform(-.1, .05))
                                                                   for _ in range(30)],
                                         "attn_mass_per_layer": [min(1, quality + rnd.uniform(-.05, .03))
                                                                 for _ in range(30)],
                                         "out_rel_err_per_layer": [max(1e-4, 1 - quality + rnd.uniform(0, .02))
                                                                   for _ in range(30)]}))
            out["accuracy"].append(rec("accuracy", m, {"model": "embedded", "task": "variable_tracking",
                                                       "context": 1024, "protocol": protocol, "seed": 0},
                                       {"score": quality - drop, "bytes_per_token": BPT[m]}))
        out["accuracy"].append(rec("accuracy", m, {"model": "embedded", "task": "ppl", "context": 2048, "seed": 0},
                                   {"ppl": 12.0 / quality}))
        for ctx in (1024, 4096):
            out["memory"].append(rec("memory", m, {"shape": "llama-3.1-8b", "context": ctx, "batch": 1},
                                     {"nbytes": BPT[m] * ctx * 6, "bytes_per_token": BPT[m] * 6,
                                      "allocated_bytes": None}, env=GPU_ENV))
        out["memory"].append(rec("memory", m, {"shape": "llama-3.1-8b", "search": "max_context", "batch": 1},
                                 {"max_context": int(4e6 / BPT[m] * 100)}, env=GPU_ENV))
        out["memory"].append(rec("memory", m, {"shape": "llama-3.1-8b", "search": "max_batch", "context": 32768},
                                 {"max_batch": int(2e4 / BPT[m])}, env=GPU_ENV))
        for b in (1, 8):
            for ctx in (4096, 32768, 131072):
                cell = {"shape": "llama-3.1-8b", "context": ctx, "batch": b, "mode": "decode"}
                if m == "full" and ctx == 131072 and b == 8:
                    out["kernels"].append(rec("kernels", m, cell, status="oom", env=GPU_ENV,
                                              error="OutOfMemoryError: CUDA out of memory. Tried to allocate 8 GiB"))
                    continue
                t = BPT[m] * ctx * b / 2.9e6 + 8
                out["kernels"].append(rec("kernels", m, cell, {
                    "time_us": t, "floor_us": t * 0.8, "bandwidth_gbs": 2300.0,
                    "speedup_vs_full": (BPT["full"] * ctx * b / 2.9e6 + 8) / t, "stage_us": {"attention": t}},
                    env=GPU_ENV))
            out["kernels"].append(rec("kernels", m, {"shape": "llama-3.1-8b", "context": 32768, "batch": b,
                                                     "mode": "prefill"}, {"time_us": 9000.0 * b}, env=GPU_ENV))
        for b in (1, 4, 16):
            cell = {"model": "synthetic:llama-3.1-8b", "context": 32768, "batch": b, "fill": "synthetic"}
            if m == "full" and b == 16:
                out["throughput"].append(rec("throughput", m, cell, status="oom", env=GPU_ENV,
                                             error="OutOfMemoryError: CUDA out of memory"))
                continue
            out["throughput"].append(rec("throughput", m, cell, {
                "ttft_s": 2.5, "decode_tok_s": 30.0 * b * 23040 / BPT[m] ** 0.9, "latency_ms": 30.0,
                "batch": b}, env=GPU_ENV))
    out["accuracy"].append(rec("accuracy", "snapkv:capacity=0.1", {
        "model": "embedded", "task": "passkey", "context": 4096, "depth": 0.5, "protocol": "query-aware", "seed": 0},
        status="failed", error="RuntimeError: boom\nTraceback (most recent call last):\n  File x.py, line 1"))
    return out


def write_records(folder, records_by_suite):
    folder.mkdir(parents=True, exist_ok=True)
    for suite, recs in records_by_suite.items():
        with open(folder / f"{suite}.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    return folder


@pytest.fixture(scope="module")
def full_page(tmp_path_factory):
    d = tmp_path_factory.mktemp("rep")
    write_records(d / "cpu", {"accuracy": synthetic_records()["accuracy"]})
    recs = synthetic_records()
    write_records(d / "gpu", {k: v for k, v in recs.items() if k != "accuracy"})
    (d / "gpu" / "provenance.json").write_text(json.dumps({"command": "kvbench run kernels", "commit": "0123456",
                                                            "gpu": "H100", "date": "2026-01-01"}))
    bench = {"machine_info": {"node": "gpu-box", "cpu": {"brand_raw": "Xeon"}}, "commit_info": {"id": "0123456"},
             "datetime": "2026-01-01", "benchmarks": [{"name": "test_decode[kivi-32768]", "group": "decode",
                                                       "params": {"ctx": 32768},
                                                       "stats": {"median": 1.2e-4, "mean": 1.3e-4, "stddev": 1e-6,
                                                                 "min": 1.1e-4, "rounds": 50}}]}
    (d / "bench.json").write_text(json.dumps(bench))
    out, inp = build_report([d / "cpu", d / "gpu", d / "bench.json"], d / "report.html")
    return out.read_text(), inp


def test_every_section_is_present_and_every_chart_has_data(full_page):
    page, inp = full_page
    assert not inp.problems, inp.problems
    for sid, title, _ in SECTIONS:
        assert f"<section id='{sid}'>" in page
    for chart in ("pareto", "budget", "needle", "fidelity", "kernels", "prefill", "throughput", "memory"):
        assert f'id="chart-{chart}"' in page, chart
    assert "no records for this section" not in page
    assert "test_decode[kivi-32768]" in page and "kvbench run kernels" in page  # benchmark JSON and provenance


def test_numbers_are_labelled_with_machine_and_commit(full_page):
    page, _ = full_page
    assert "NVIDIA H100 80GB HBM3 @ 0123456789" in page
    assert "CPU (ci-runner) @ fedcba9876" in page
    # compression vs full from memory records: 23040 / 2304 = 10x for snapkv
    row = re.search(r"<th class='m'>snapkv:capacity=0.1</th>(.*?)</tr>", page).group(1)
    assert "10.00×" in row
    assert "1 failed" in row  # the failed accuracy cell is counted, not dropped


def test_failed_and_oom_cells_are_shown(full_page):
    page, _ = full_page
    failures = page.split("<section id='failures'>")[1].split("</section>")[0]
    assert failures.count("st-oom'>oom") == 2 and "st-failed'>failed" in failures
    assert "CUDA out of memory. Tried to allocate 8 GiB" in failures
    assert "failed / out of memory" in page  # the red-cross trace in the charts


def test_offline_no_network_loads(full_page):
    page, _ = full_page
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert not re.search(r"<(link|img|iframe)[^>]*(href|src)\s*=\s*[\"']?(https?:)?//", page, re.I)
    assert page.count("Plotly.newPlot") == 1  # plotly.js inlined once, one draw loop
    assert "default-src 'none'" in page  # the browser refuses any network load


def test_record_strings_are_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    recs = [rec("accuracy", evil, {"model": "embedded", "task": "passkey", "context": 512, "depth": 0.5,
                                   "protocol": "</script><!--", "seed": 0}, {"score": 1.0, "bytes_per_token": 9.0},
                params={"x": evil}, env={**CPU_ENV, "host": "<b>host</b>"}),
            rec("kernels", "full", {"context": 1024, "batch": 1}, status="failed",
                error="<img src=x onerror=alert(2)>")]
    write_records(tmp_path, {"mixed": recs})
    out, inp = build_report([tmp_path], tmp_path / "r.html", title="<i>title</i>")
    page = out.read_text()
    assert evil not in page and "<img src=x" not in page and "<b>host</b>" not in page and "<i>title" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown as text in the tables
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    # in the figure data: neither </script> nor <!-- can occur, so the script block cannot end early
    figs = page.split("var KV_FIGS = ")[1].split(";</script>")[0]
    assert "</" not in figs and "<!--" not in figs and "<" not in figs
    assert "\\u003cscript\\u003e" not in figs  # and strings in charts are HTML-escaped for plotly as well
    assert "&amp;lt;script&amp;gt;" not in page.split("<section id='summary'>")[1].split("</section>")[0]
    assert len(re.findall(r"<script", page)) == 4  # only ours


def test_script_json_round_trips_and_is_safe():
    obj = {"a": "</script><!-- & \u2028", "b": [1.5, None, "<>"]}
    s = script_json(obj)
    assert json.loads(s) == obj
    assert "</" not in s and "<!--" not in s and "\u2028" not in s


def test_malformed_lines_become_problems_and_the_rest_is_built(tmp_path):
    good = rec("accuracy", "full", {"model": "embedded", "task": "passkey", "context": 512, "depth": 0.5,
                                    "protocol": "query-aware", "seed": 0}, {"score": 1.0})
    no_status = {k: v for k, v in good.items() if k != "status"}
    bad_cell = {**good, "cell": "not a dict"}
    bad_value = {**good, "cell": {**good["cell"], "context": [512]}, "metrics": {"score": "high"}}
    f = tmp_path / "accuracy.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(no_status) + "\n" + json.dumps(bad_cell) + "\n"
                 + json.dumps(bad_value) + "\n"
                 + json.dumps(good)[:40])  # a truncated last line, as a killed run leaves it
    out, inp = build_report([f, tmp_path / "missing.jsonl"], tmp_path / "r.html")
    page = out.read_text()
    where = {(p.file.rsplit("/", 1)[-1], p.line) for p in inp.problems}
    assert where == {("accuracy.jsonl", 2), ("accuracy.jsonl", 3), ("accuracy.jsonl", 4), ("accuracy.jsonl", 5),
                     ("missing.jsonl", 0)}
    problems = page.split("<section id='problems'>")[1].split("</section>")[0]
    assert f"{f}:2" in problems and "missing field(s): status" in problems
    assert f"{f}:4" in problems and "cell.context = [512], metrics.score = &quot;high&quot;" in problems
    assert f"{f}:5" in problems and "truncated line?" in problems
    assert f"{f}:3" in problems and "cell should be dict" in problems
    assert len(inp.records) == 1 and 'id="chart-budget"' in page  # the good record still made its chart


def test_empty_sections_say_so_with_the_command(tmp_path):
    write_records(tmp_path, {"accuracy": [rec("accuracy", "full", {"model": "embedded", "task": "ppl",
                                                                   "context": 512}, {"ppl": 9.0})]})
    page = build_report([tmp_path], tmp_path / "r.html")[0].read_text()
    kernels = page.split("<section id='kernels'>")[1].split("</section>")[0]
    assert "no records for this section" in kernels and "kvbench run kernels" in kernels
    assert "no records for this section" in page.split("<section id='throughput'>")[1].split("</section>")[0]
    assert "<b>9.00</b>" in page  # the perplexity still reaches the summary


def test_cli_writes_the_report_and_rejects_missing_inputs(tmp_path):
    write_records(tmp_path / "res", synthetic_records())
    runner = CliRunner()
    r = runner.invoke(app, ["report", str(tmp_path / "res"), "-o", str(tmp_path / "out" / "r.html")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "r.html").stat().st_size > 1_000_000  # plotly.js is inside
    r = runner.invoke(app, ["report", str(tmp_path / "nothing-here"), "-o", str(tmp_path / "x.html")])
    assert r.exit_code == 2 and "none of the inputs exist" in r.output


def test_pareto_front_keeps_only_points_nothing_cheaper_beats():
    from kvbench.reports import plots

    pts = {"a": (100.0, 0.5), "b": (200.0, 0.9), "c": (300.0, 0.8), "d": (50.0, 0.2), "e": (120.0, 0.4)}
    recs = [rec("accuracy", m, {"model": "embedded", "task": "passkey", "context": 512, "protocol": "query-aware"},
                {"score": s, "bytes_per_token": b}, params={}) for m, (b, s) in pts.items()]
    fig = plots.pareto(recs, [], plots.palette(pts))
    front = next(t for t in fig.data if t.name == "Pareto front (query-aware)")
    assert list(zip(front.x, front.y)) == [(50.0, 0.2), (100.0, 0.5), (200.0, 0.9)]


def test_kernel_chart_draws_floors_and_failed_cells():
    from kvbench.reports import plots

    recs = synthetic_records()["kernels"]
    fig = plots.kernel_time(recs, plots.palette(r["method"] for r in recs))
    names = [t.name for t in fig.data]
    assert "full floor" in names and "kivi:bits=2 floor" in names
    fails = [t for t in fig.data if t.name == "failed / out of memory"]
    assert len(fails) == 1 and list(fails[0].x) == [131072] and "OUT OF MEMORY" not in fails[0].hovertext[0]
    assert "OOM" in fails[0].hovertext[0] and "Tried to allocate 8 GiB" in fails[0].hovertext[0]
    full = next(t for t in fig.data if t.name == "full" and t.xaxis == "x2")  # batch 8: 131072 is the oom cell
    assert list(full.x) == [4096, 32768]
    assert plots.kernel_time(recs, {}, "prefill") is not None and plots.throughput([], {}) is None
