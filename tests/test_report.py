"""The HTML report: built from synthetic records that follow the schema (kvbench/records.py), every section present,
record strings escaped, malformed lines reported with file:line while the rest is still built, nothing loaded from
the network."""

import json
import random
import re

import pytest
from test_fidelity_at_length import fidelity_records
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
                "floor_ms": 12.0, "gpu_busy_ms": 20.0, "decode_mode": "eager", "batch": b}, env=GPU_ENV))
    out["accuracy"].append(rec("accuracy", "snapkv:capacity=0.1", {
        "model": "embedded", "task": "passkey", "context": 4096, "depth": 0.5, "protocol": "query-aware", "seed": 0},
        status="failed", error="RuntimeError: boom\nTraceback (most recent call last):\n  File x.py, line 1"))
    out["rag"] = [rec("rag", m, {"model": "embedded", "task": "2hop", "documents": 6, "doc_tokens": 128, "seed": 0},
                      {"score": s, "ttft_s": t, "bytes_held_vs_recompute": b, "recompute_ratio": r, "kept_ratio": r})
                  for m, s, t, b, r in (("recompute", 1.0, 2.0, 1.0, 1.0), ("samkv", 0.9, 0.5, 0.2, 0.15))]
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
    write_records(d / "cpu", {"accuracy": synthetic_records()["accuracy"], "fidelity": fidelity_records()})
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
    for chart in ("pareto", "budget", "needle", "fidelity", "fidelity-length", "kernels", "prefill", "throughput",
                  "steps", "memory", "rag"):
        assert f'id="chart-{chart}"' in page, chart
    assert "no records for this section" not in page
    assert "test_decode[kivi-32768]" in page and "kvbench run kernels" in page  # benchmark JSON and provenance


def test_numbers_are_labelled_with_machine_and_commit(full_page):
    page, _ = full_page
    assert "NVIDIA H100 80GB HBM3 @ 0123456789" in page
    assert "CPU (ci-runner) @ fedcba9876" in page
    summary = page.split("<section id='summary'>")[1].split("</section>")[0]
    assert "<h3>NVIDIA H100 80GB HBM3 · llama-3.1-8b</h3>" in summary and "Commits: 0123456789" in summary
    # compression vs full from memory records: 23040 / 2304 = 10x for snapkv, in the GPU's table
    gpu = summary.split("<h3>NVIDIA H100")[1].split("<h3>")[0]
    row = re.search(r"<th class='m'[^>]*>snapkv:capacity=0.1<br>.*?</tr>", gpu).group(0)
    assert "<b>13,824</b> <span class='n'>(10.0×)</span>" in row
    assert "1 failed or out-of-memory" not in summary and "failed cells" in summary


def test_summary_is_one_table_per_machine_and_model_with_no_cpu_number_beside_a_gpu_one(full_page):
    from kvbench.reports.summary import build_tables

    _, inp = full_page
    tables = {(t.machine, t.model): t for t in build_tables(inp.records)}
    assert set(tables) == {("NVIDIA H100 80GB HBM3", "llama-3.1-8b"), ("CPU (ci-runner)", "smollm2-135m")}
    gpu, cpu = tables[("NVIDIA H100 80GB HBM3", "llama-3.1-8b")], tables[("CPU (ci-runner)", "smollm2-135m")]
    assert all(r["env"]["gpu"] for r in gpu.records) and not any(r["env"]["gpu"] for r in cpu.records)
    assert not any(row.accuracy for row in gpu.rows.values())  # accuracy was measured on the CPU only
    assert cpu.kernel_cell is None and not any(row.time_us for row in cpu.rows.values())
    assert cpu.acc_context == 1024 and cpu.rows["full"].accuracy["query-aware"][1] == 7  # 2 tasks x 3 depths + vt


def test_speeds_are_read_at_the_reference_cell_not_the_best_cell(full_page):
    from kvbench.reports.summary import REFERENCE, build_tables

    _, inp = full_page
    gpu = build_tables(inp.records)[0]
    assert gpu.kernel_cell == REFERENCE == (32768, 8)
    snap = gpu.rows["snapkv:capacity=0.1"]
    at_ref = [r for r in inp.records if r["suite"] == "kernels" and r["method"] == "snapkv:capacity=0.1"
              and r["cell"].get("context") == 32768 and r["cell"].get("batch") == 8 and r["cell"]["mode"] == "decode"]
    best = max(r["metrics"]["speedup_vs_full"] for r in inp.records if r["method"] == "snapkv:capacity=0.1"
               and r["suite"] == "kernels" and "speedup_vs_full" in r["metrics"])
    assert snap.speedup == at_ref[0]["metrics"]["speedup_vs_full"] < best
    # throughput at 32K x 8 is not measured (batches 1, 4, 16): the cell most methods measured, the largest there
    assert gpu.thr_cell == (32768, 4)


def test_a_row_holds_only_numbers_measured_at_its_own_setting():
    from kvbench.reports.summary import build_tables

    recs = [rec("accuracy", "selfindex:budget=0.05", {"model": "embedded", "task": "passkey", "context": 1024,
                                                      "protocol": "query-aware"}, {"score": 0.5}, params={}),
            rec("accuracy", "full", {"model": "embedded", "task": "passkey", "context": 1024,
                                     "protocol": "query-aware"}, {"score": 1.0}, params={}),
            rec("memory", "selfindex:budget=0.1", {"shape": "smollm2-135m", "context": 1024, "batch": 1},
                {"bytes_per_token": 18450.0}, params={}),
            rec("memory", "full", {"shape": "smollm2-135m", "context": 1024, "batch": 1},
                {"bytes_per_token": 46080.0}, params={})]
    (t,) = build_tables(recs)
    low, high = t.rows["selfindex:budget=0.05"], t.rows["selfindex:budget=0.1"]
    assert low.accuracy and low.bpt is None  # its bytes were measured at another budget: not beside its score
    assert high.bpt == 18450.0 and not high.accuracy
    assert low.budget == pytest.approx(52 / 1024) and high.budget == pytest.approx(103 / 1024)


def test_scores_are_over_the_cells_full_was_scored_on():
    from kvbench.reports.summary import build_tables

    def acc(m, task, score):
        return rec("accuracy", m, {"model": "embedded", "task": task, "context": 1024, "depth": 0.5,
                                   "protocol": "query-aware"}, {"score": score}, params={})
    # the variant was also run on a harder task full never ran: that cell must not pull its mean down
    (t,) = build_tables([acc("full", "passkey", 1.0), acc("selfindex", "passkey", 1.0),
                         acc("selfindex", "niah_multikey", 0.0)])
    assert t.rows["selfindex"].accuracy["query-aware"] == (1.0, 1)


def test_best_tradeoff_is_named_by_the_stated_rule():
    from kvbench.reports.summary import best_tradeoff, build_tables

    def acc(m, score):
        return rec("accuracy", m, {"model": "embedded", "task": "passkey", "context": 1024,
                                   "protocol": "query-aware"}, {"score": score}, params={})

    def mem(m, bpt):
        return rec("memory", m, {"shape": "smollm2-135m", "context": 1024, "batch": 1}, {"bytes_per_token": bpt},
                   params={})
    # the 16+1 setting scores best but stores more than full: not a saving, so not the trade-off
    recs = [acc("full", 1.0), mem("full", 46080.0), acc("selfindex:setting=16+1", 0.95), mem("selfindex:setting=16+1",
            47000.0), acc("kivi", 0.8), mem("kivi", 26280.0), acc("snapkv:capacity=0.1", 0.6),
            mem("snapkv:capacity=0.1", 4753.0)]
    text = best_tradeoff(build_tables(recs)[0])
    assert text.startswith("<b>kivi</b>: mean score 0.800 (full 1.000), 1.75× fewer KV bytes per token")
    assert "most accurate method that stores less than full" in text


def test_budget_comes_from_the_method_not_from_parameter_names():
    from kvbench.reports import plots

    def r(method, context, **metrics):
        return rec("accuracy", method, {"context": context}, metrics, params={})
    assert plots.budget_fraction(r("streaming:sinks=4,window=60", 1024)) == pytest.approx(64 / 1024)
    assert plots.budget_fraction(r("selfindex:budget=160", 32768)) == pytest.approx(160 / 32768)
    assert plots.budget_fraction(r("kivi", 1024)) == 1.0 and plots.attends_all(r("kivi", 1024))
    assert plots.budget_fraction(r("selfindex", 1024, budget_fraction=0.25)) == 0.25  # what a new record says
    assert plots.budget_fraction(r("someplugin:x=1", 1024)) is None  # unknown here: no guess
    assert plots.method_family(r("snapkv", 1024)) == "eviction" and plots.method_family(r("nosuch", 1)) == "unknown"
    assert plots.method_family({**r("nosuch", 1), "method_family": "selection"}) == "selection"
    assert plots.line_of(r("selfindex:budget=0.05,setting=16+1", 1024)) == "selfindex:setting=16+1"
    assert plots.line_of(r("streaming:window=60", 1024)) == "streaming"
    assert plots.canonical("selfindex:budget=160.0") == "selfindex:budget=160"


def test_one_budget_gives_a_chart_of_scores_at_that_budget():
    from kvbench.reports import plots

    recs = [rec("accuracy", m, {"model": "embedded", "task": "passkey", "context": 1024, "protocol": p},
                {"score": s}, params={}) for m, s in (("full", 1.0), ("selfindex", 0.7), ("snapkv:capacity=0.1", 0.5))
            for p in ("query-aware", "query-agnostic")]
    fig = plots.accuracy_vs_budget(recs, plots.palette(r["method"] for r in recs))
    assert "one budget measured (0.1 of the context" in fig.layout.title.text
    assert fig.layout.xaxis.type == "category" and len(fig.data) == 3
    assert list(next(t for t in fig.data if t.name == "selfindex").y) == [0.7, 0.7]
    recs += [rec("accuracy", "selfindex:budget=0.2", {"model": "embedded", "task": "passkey", "context": 1024,
                                                      "protocol": "query-aware"}, {"score": 0.9}, params={})]
    fig = plots.accuracy_vs_budget(recs, plots.palette(r["method"] for r in recs))
    assert fig.layout.xaxis.type == "log"  # two budgets: a curve
    line = next(t for t in fig.data if t.name == "selfindex" and t.xaxis == "x2")  # panels: agnostic, aware
    assert list(line.x) == [0.1, 0.2] and list(line.y) == [0.7, 0.9]


def test_memory_fit_states_its_budget_and_keeps_machines_apart():
    from kvbench.reports import plots

    recs = [rec("memory", m, {"shape": "llama-3.1-8b", "task": "max_context", "batch": 1},
                {"max_context": 600000, "budget_bytes": 80 * 2**30}, env=GPU_ENV, params={}) for m in ("full", "kivi")]
    recs += [rec("memory", "full", {"shape": "smollm2-135m", "task": "max_context", "batch": 1},
                 {"max_context": 256, "budget_bytes": 16 * 2**20}, params={})]
    fig = plots.memory_fit(recs, plots.palette(["full", "kivi"]))
    titles = [a.text for a in fig.layout.annotations]
    assert "largest context that fits (tokens) in 80 GiB" in titles
    assert "largest context that fits (tokens) in 16 MiB" in titles
    assert "<b>NVIDIA H100 80GB HBM3</b>" in titles and "<b>CPU (ci-runner)</b>" in titles
    gpu_bars, cpu_bars = fig.data[0], fig.data[3]
    assert gpu_bars.yaxis != cpu_bars.yaxis and list(cpu_bars.y) == ["full"]


def test_palette_gives_distinct_colours_and_never_the_failure_red():
    from kvbench.reports import plots

    labels = ["full"] + [f"m{i}" for i in range(15)]
    colours = plots.palette(labels)
    assert colours["full"] == plots.COLORS[0] and len(set(colours.values())) == 16
    assert plots.FAIL_COLOR not in colours.values()


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
    assert "<b>9.00</b> <span class='n'>(n=1)</span>" in page  # the perplexity still reaches the summary


def test_cli_writes_the_report_and_rejects_missing_inputs(tmp_path):
    write_records(tmp_path / "res", synthetic_records())
    runner = CliRunner()
    r = runner.invoke(app, ["report", str(tmp_path / "res"), "-o", str(tmp_path / "out" / "r.html")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "r.html").stat().st_size > 1_000_000  # plotly.js is inside
    r = runner.invoke(app, ["report", str(tmp_path / "nothing-here"), "-o", str(tmp_path / "x.html")])
    assert r.exit_code == 2 and "none of the inputs exist" in r.output


def test_report_of_an_empty_folder_or_a_garbage_file_fails_clearly(tmp_path):
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["report", str(tmp_path / "empty"), "-o", str(tmp_path / "a.html")])
    assert r.exit_code == 2 and "no records in" in r.output and "0 .jsonl file(s) read" in r.output
    (tmp_path / "junk.jsonl").write_text("hello\nworld\n")
    r = runner.invoke(app, ["report", str(tmp_path / "junk.jsonl"), "-o", str(tmp_path / "b.html")])
    assert r.exit_code == 2 and "2 problem(s)" in r.output and "junk.jsonl:1: not valid JSON" in r.output
    assert not (tmp_path / "a.html").exists() and not (tmp_path / "b.html").exists()


def test_paths_in_the_page_are_clean(tmp_path, monkeypatch):
    write_records(tmp_path / "data", {"accuracy": synthetic_records()["accuracy"][:3]})
    (tmp_path / "comparisons").mkdir()
    monkeypatch.chdir(tmp_path)
    page = build_report(["comparisons/../data"], "r.html")[0].read_text()
    assert "comparisons/.." not in page and "data/accuracy.jsonl:1" in page


def test_old_labels_are_read_as_this_kvbench_writes_them(tmp_path):
    old = rec("memory", "selfindex:budget=160.0", {"shape": "llama-3.1-8b", "context": 4096, "batch": 1},
              {"bytes_per_token": 29008.0}, env=GPU_ENV)
    new = {**old, "method": "selfindex:budget=160", "cell": {**old["cell"], "context": 32768}}
    write_records(tmp_path, {"memory": [old, new]})
    _, inp = build_report([tmp_path], tmp_path / "r.html")
    assert {r["method"] for r in inp.records} == {"selfindex:budget=160"}
    assert inp.records[0]["method_recorded"] == "selfindex:budget=160.0"


def test_pareto_front_keeps_only_points_nothing_cheaper_beats():
    from kvbench.reports import plots

    pts = {"a": (100.0, 0.5), "b": (200.0, 0.9), "c": (300.0, 0.8), "d": (50.0, 0.2), "e": (120.0, 0.4)}
    recs = [rec("accuracy", m, {"model": "embedded", "task": "passkey", "context": 512, "protocol": "query-aware"},
                {"score": s, "bytes_per_token": b}, params={}) for m, (b, s) in pts.items()]
    fig = plots.pareto(recs, [], plots.palette(pts))
    front = next(t for t in fig.data if t.name == "Pareto front (query-aware)")
    assert list(zip(front.x, front.y)) == [(50.0, 0.2), (100.0, 0.5), (200.0, 0.9)]


def test_pareto_pairs_like_with_like():
    from kvbench.reports import plots

    def acc(m, task, score, bpt):
        return rec("accuracy", m, {"model": "embedded", "task": task, "context": 1024, "protocol": "query-aware"},
                   {"score": score, "bytes_per_token": bpt}, params={})
    recs = [acc("full", "passkey", 1.0, 50000.0), acc("kivi", "passkey", 0.5, 26000.0),
            acc("kivi", "niah_multikey", 0.0, 26000.0), acc("selfindex:fixed=scored", "passkey", 0.9, 9000.0)]
    mem = [rec("memory", m, {"shape": "smollm2-135m", "context": 256, "batch": 1}, {"bytes_per_token": b}, params={})
           for m, b in (("full", 46080.0), ("kivi", 26280.0))]
    fig = plots.pareto(recs, mem, plots.palette(["full", "kivi", "selfindex:fixed=scored"]))
    points = {t.name: (t.x[0], t.y[0]) for t in fig.data if "Pareto" not in t.name}
    # kivi's mean is over the cell full ran (passkey), its bytes the memory suite's; the variant the memory suite
    # did not measure has no point rather than an accuracy-cell byte count beside memory-suite ones
    assert points == {"full (query-aware)": (46080.0, 1.0), "kivi (query-aware)": (26280.0, 0.5)}


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


def _acc(m, seed, score, ctx=1024, protocol="query-aware"):
    return rec("accuracy", m, {"model": "embedded", "task": "passkey", "context": ctx, "depth": 0.5, "seed": seed,
                               "protocol": protocol}, {"score": score, "bytes_per_token": 1000.0}, params={})


def _ker(m, ctx, batch, t, speedup, env=CPU_ENV):
    return rec("kernels", m, {"shape": "smollm2-135m", "context": ctx, "batch": batch, "mode": "decode"},
               {"time_us": t, "speedup_vs_full": speedup}, env=env, params={})


def test_a_speed_measured_at_other_parameters_is_never_beside_an_accuracy():
    """Accuracy at selfindex's 10% budget, kernel time only at its 160-token budget: the 10% row says 'not measured
    at these settings' where the speed would be, in the table and in the Pareto chart's hover."""
    from kvbench.reports import plots
    from kvbench.reports.summary import NOT_HERE, build_tables, speed_notes, table_html

    recs = [_acc("full", s, 1.0) for s in range(5)] + [_acc("selfindex", s, float(s > 0)) for s in range(5)]
    recs += [_ker("full", 256, 1, 100.0, 1.0), _ker("selfindex:budget=160", 256, 1, 20.0, 5.0)]
    (t,) = build_tables(recs)
    aware, other = t.rows["selfindex"], t.rows["selfindex:budget=160"]
    assert aware.accuracy and aware.time_us is None and aware.speedup is None
    assert other.speedup == 5.0 and not other.accuracy
    html_ = table_html(t)
    row = re.search(r"<th class='m'[^>]*>selfindex<br>.*?</tr>", html_).group(0)
    assert NOT_HERE in row and "20.0 µs" not in row and "5.00×" not in row
    assert "vs full -0.200 [" in row and "(n=5)" in row  # the paired difference over the 5 cells both scored
    notes = speed_notes(recs)
    assert "selfindex" not in notes and "5.00× faster" in notes["selfindex:budget=160"]
    fig = plots.pareto(recs, [], plots.palette(r["method"] for r in recs), notes)
    hover = next(tr for tr in fig.data if tr.name == "selfindex (query-aware)").hovertext[0]
    assert "not measured at these settings" in hover and "5.00" not in hover
    assert next(tr for tr in fig.data if tr.name == "selfindex (query-aware)").error_y.arrayminus[0] > 0


def test_cpu_speeds_are_read_at_the_cpu_reference_cell_not_the_most_measured_or_best():
    from kvbench.reports.summary import CPU_REFERENCE, build_tables

    recs = [_acc("full", 0, 1.0), _acc("kivi", 0, 1.0)]
    recs += [_ker(m, 256, 1, t, full_t / t) for m, t, full_t in (("full", 50.0, 50.0), ("kivi", 40.0, 50.0))]
    for batch in (2, 4):  # more methods measured 1K x 2 and 1K x 4, and kivi is faster there
        recs += [_ker(m, 1024, batch, t, 200.0 / t) for m, t in (("full", 200.0), ("kivi", 50.0), ("qjl", 80.0))]
    (t,) = build_tables(recs)
    assert t.kernel_cell == CPU_REFERENCE == (256, 1)
    assert t.rows["kivi"].speedup == pytest.approx(1.25)


def test_budget_sweep_has_interval_bars_and_an_all_tasks_panel_per_context():
    from kvbench.reports import plots

    recs = []
    for ctx in (1024, 2048):
        for s in range(6):
            recs += [_acc("full", s, 1.0, ctx), _acc("selfindex:budget=0.05", s, float(s % 2), ctx),
                     _acc("selfindex", s, float(s % 3 != 0), ctx)]
    fig = plots.accuracy_vs_budget(recs, plots.palette(r["method"] for r in recs))
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:2] == ["all tasks · 1K · query-aware", "all tasks · 2K · query-aware"]
    line = next(tr for tr in fig.data if tr.name == "selfindex" and tr.xaxis == "x")
    assert list(line.y) == [0.5, pytest.approx(4 / 6)]
    assert all(a > 0 for a in line.error_y.array) and all(a > 0 for a in line.error_y.arrayminus)
