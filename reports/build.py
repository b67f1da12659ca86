"""Build one self-contained, offline HTML report from JSONL records, provenance JSON and pytest-benchmark JSON.

    build_report(["results/", "reports/data/"], "report.html")

The page: a summary table per method, accuracy against KV bytes per token (Pareto view), accuracy against budget per
task and protocol, a needle heat map, per-layer attention fidelity, kernel time against context with its bandwidth
floor, throughput against batch, what fits in memory, failed and out-of-memory cells, pytest-benchmark results, the
environment and provenance of every number, problems found in the inputs, and every record in a sortable table.

Safety: every string that comes from a record or a file is HTML-escaped (`html.escape`) where it enters the page; the
figures and data handed to JavaScript are JSON with `<`, `>` and `&` written as \\u escapes, so no `</script>` or
`<!--` can end a script block early; strings inside figures are escaped too, because plotly renders a subset of HTML
in text. A Content-Security-Policy forbids loading anything from the network: plotly.js is inlined once.
"""

from __future__ import annotations

import copy
import html
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from plotly.offline import get_plotlyjs
from plotly.utils import PlotlyJSONEncoder

from kvbench import rag_report
from kvbench.api import KVBenchError
from kvbench.records import Problem, machine_label, now_iso, read_records
from kvbench.reports import plots
from kvbench.reports.fidelity_plot import fidelity_at_length
from kvbench.reports.plots import bad, first_line, origin
from kvbench.reports.steps import step_accounting
from kvbench.reports.summary import speed_notes, summary_html

SECTIONS = [  # id, title, the command that produces its records
    ("summary", "Summary: which method, at what cost, with what saving", "kvbench compare"),
    ("pareto", "Accuracy against KV bytes per token", "kvbench run accuracy --quick  (plus kvbench run memory)"),
    ("budget", "Accuracy against budget", "kvbench run accuracy --quick"),
    ("needle", "Needle heat map", "kvbench run accuracy  (needle/passkey tasks over depths and lengths)"),
    ("fidelity", "Attention fidelity per layer", "kvbench run accuracy  (records per-layer fidelity arrays)"),
    ("fidelity-length", "Attention fidelity per layer at 4K-8K tokens", "kvbench run fidelity"),
    ("kernels", "Kernel time against context", "kvbench run kernels"),
    ("prefill", "Prefill time against context", "kvbench run kernels --mode prefill"),
    ("throughput", "Throughput against batch", "kvbench run throughput"),
    ("steps", "Decode step against its floor", "kvbench run throughput  (GPU: step accounting from the profiler)"),
    ("memory", "Memory fit", "kvbench run memory"),
    ("rag", "RAG: documents cached apart, reused together", "kvbench run rag --quick"),
    ("failures", "Failed and out-of-memory cells", "any suite"),
    ("benchmarks", "pytest-benchmark results",
     "pytest benchmarks --benchmark-json=bench.json, then kvbench report RESULTS bench.json"),
    ("environment", "Environment and provenance", "any suite"),
    ("problems", "Problems in the inputs", "-"),
    ("records", "All records", "any suite"),
]
FIELD_TYPES = {"suite": str, "method": str, "cell": dict, "params": dict, "metrics": dict, "env": dict}
NUMBER = (int, float)
# the cell keys and metrics the charts group and plot by (records.py's docstring): a wrong type there is a problem
CELL_TYPES = {"context": NUMBER, "batch": NUMBER, "depth": NUMBER, "seed": NUMBER, "task": str, "protocol": str,
              "model": str, "shape": str, "mode": str}
METRIC_TYPES = {**{k: NUMBER for k in (
    "score", "ppl", "topk_recall", "attn_mass", "out_rel_err", "nbytes", "bytes_per_token", "allocated_bytes",
    "peak_bytes", "nvml_used_bytes", "max_context", "max_batch", "time_us", "floor_us", "bandwidth_gbs",
    "speedup_vs_full", "ttft_s", "decode_tok_s", "latency_ms", "batch")}, "stage_us": dict}
E = html.escape


@dataclass
class Inputs:
    """Everything read from the paths given: records, the problems met on the way, provenance and benchmark JSON."""

    records: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    provenance: list[tuple[str, dict]] = field(default_factory=list)
    benchmarks: list[tuple[str, dict]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def collect(paths: Iterable[str | Path]) -> Inputs:
    """Read JSONL record files and folders (recursively), provenance JSON found beside them, and pytest-benchmark JSON.
    Nothing raises for bad input: unreadable files, lines and fields become Problems with file and line."""
    inp = Inputs()
    jsonl: list[Path] = []
    json_files: list[Path] = []
    for p in map(clean_path, paths):
        if p.is_dir():
            jsonl += sorted(p.rglob("*.jsonl"))
            json_files += sorted(p.rglob("*.json"))
        elif not p.exists():
            inp.problems.append(Problem(str(p), 0, "no such file or folder"))
        elif p.suffix == ".json":
            json_files.append(p)
        else:
            jsonl.append(p)
            json_files += sorted(p.parent.glob("*provenance*.json"))  # provenance written next to the records
    jsonl = list(dict.fromkeys(jsonl))
    inp.files = [str(f) for f in jsonl]
    records, problems = read_records(jsonl)
    inp.problems += problems
    for r in records:
        wrong = [k for k, t in FIELD_TYPES.items() if k in r and r[k] is not None and not isinstance(r[k], t)]
        if r.get("suite") is None or r.get("method") is None:
            wrong += [k for k in ("suite", "method") if r.get(k) is None]
        file, _, line = r["_source"].rpartition(":")
        if wrong:
            inp.problems.append(Problem(file, int(line), "malformed field(s): " + ", ".join(
                f"{k} should be {FIELD_TYPES[k].__name__}, is {type(r.get(k)).__name__}" for k in wrong)))
            continue
        bad_values = [f"{part}.{k}" for part, types in (("cell", CELL_TYPES), ("metrics", METRIC_TYPES))
                      for k, t in types.items() if (v := (r.get(part) or {}).get(k)) is not None
                      and (not isinstance(v, t) or isinstance(v, bool))]
        if bad_values:
            inp.problems.append(Problem(file, int(line), "malformed value(s): " + ", ".join(
                f"{k} = {json.dumps((r.get(k.split('.')[0]) or {}).get(k.split('.')[1]), default=str)[:60]}"
                for k in bad_values)))
            continue
        for k in ("cell", "params", "metrics", "env"):
            if r.get(k) is None:
                r[k] = {}
        label = plots.canonical(r["method"])  # 'selfindex:budget=160.0' (older commits) is 'selfindex:budget=160'
        if label != r["method"]:
            r["method_recorded"], r["method"] = r["method"], label
        inp.records.append(r)
    for f in dict.fromkeys(json_files):
        try:
            data = json.loads(f.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            inp.problems.append(Problem(str(f), e.lineno, f"not valid JSON ({e.msg})"))
            continue
        if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
            inp.benchmarks.append((str(f), data))
        elif isinstance(data, dict):
            inp.provenance.append((str(f), data))
        else:
            inp.problems.append(Problem(str(f), 1, "neither provenance (a JSON object) nor pytest-benchmark JSON"))
    return inp


def clean_path(p: str | Path) -> Path:
    """A path as a footer should show it: `comparisons/../reports/data` is `reports/data`, relative to the working
    folder when inside it, else absolute."""
    full = Path(os.path.abspath(os.path.expanduser(str(p))))
    try:
        return full.relative_to(Path.cwd())
    except ValueError:
        return full


class NoRecords(KVBenchError):
    """The inputs hold no record: a report of nothing would only hide the mistake."""


def build_report(paths: Iterable[str | Path], out: str | Path, title: str | None = None,
                 require_records: bool = False) -> tuple[Path, Inputs]:
    """Read `paths` and write the report to `out`. Returns the path written and what was read. With
    `require_records`, inputs that hold no record raise NoRecords (naming the files and their first problem) and
    nothing is written."""
    paths = list(paths)
    inp = collect(paths)
    if require_records and not inp.records:
        first = f"; first problem: {inp.problems[0].file}:{inp.problems[0].line}: {inp.problems[0].reason}" \
            if inp.problems else ""
        raise NoRecords(f"no records in {', '.join(str(clean_path(p)) for p in paths)} ({len(inp.files)} .jsonl "
                        f"file(s) read, {len(inp.problems)} problem(s){first}); pass the folder a suite wrote, e.g. "
                        "`kvbench report results/`")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(inp, title or "kvbench report"), encoding="utf-8")
    return out, inp


# --- safe embedding ------------------------------------------------------------------------------------------------


def script_json(obj: Any) -> str:
    """JSON that is safe inside <script>: `<`, `>`, `&` and the JS line separators become \\u escapes, so the text
    can hold no `</script>` or `<!--`, and it still parses as the same JSON/JS value."""
    s = json.dumps(obj, cls=PlotlyJSONEncoder, separators=(",", ":"))
    for ch, rep in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        s = s.replace(ch, rep)
    return s


def _escape_strings(x: Any) -> Any:
    """Every string (keys too) HTML-escaped: plotly renders <b>, <a>, <br> ... in text, so record text must not be
    able to add markup to a chart."""
    if isinstance(x, str):
        return html.escape(x, quote=False)
    if isinstance(x, dict):
        return {_escape_strings(k): _escape_strings(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_escape_strings(v) for v in x]
    return x


# --- page pieces ----------------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        v = int(v)  # a batch of 4.0 reads as 4
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        if abs(v) >= 10 ** digits:
            return f"{v:,.0f}"
        return f"{v:,.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _none(section: str) -> str:
    cmd = next(c for s, _, c in SECTIONS if s == section)
    return f'<p class="none">no records for this section; produce them with <code>{E(cmd)}</code></p>'


def _by_suite(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        out[r["suite"]].append(r)
    return out


def summary_section(records: list[dict]) -> str:
    body = summary_html(records)
    if not body:
        return _none("summary")
    nbad = sum(r["status"] in ("failed", "oom") for r in records)
    return body + (f"<p class='warn'>{nbad} failed or out-of-memory cell(s) are not in these tables: see "
                   "<a href='#failures'>failed cells</a>.</p>" if nbad else "")


def failures_table(records: list[dict]) -> str:
    fails = [r for r in records if r["status"] in ("failed", "oom", "skipped")]
    if not fails:
        return f"<p class='none'>no failed, out-of-memory or skipped cells among {len(records)} records.</p>"
    rows = "".join(
        f"<tr><td><span class='st st-{E(r['status'])}'>{E(r['status'])}</span></td><td>{E(r['suite'])}</td>"
        f"<td>{E(r['method'])}</td><td>{E(plots._cell_text(r))}</td><td>{_error_html(r.get('error'))}</td>"
        f"<td>{E(origin(r))}</td><td class='file'>{E(r['_source'])}</td></tr>" for r in fails)
    return ("<div class='scroll'><table class='sortable'><thead><tr><th>status</th><th>suite</th><th>method</th>"
            "<th>cell</th><th>error</th><th>machine @ commit</th><th>file:line</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></div>")


def _error_html(err: Any) -> str:
    if not err:
        return ""
    text = str(err)
    head = E(first_line(text))
    if "\n" in text.strip() or len(text) > 160:
        return f"<details><summary>{head}</summary><pre>{E(text)}</pre></details>"
    return head


def benchmarks_html(benchmarks: list[tuple[str, dict]]) -> str:
    if not benchmarks:
        return _none("benchmarks")
    out = []
    for path, data in benchmarks:
        mi = data.get("machine_info") if isinstance(data.get("machine_info"), dict) else {}
        ci = data.get("commit_info") if isinstance(data.get("commit_info"), dict) else {}
        cpu = mi.get("cpu", {}).get("brand_raw") if isinstance(mi.get("cpu"), dict) else None
        where = " · ".join(str(x) for x in (mi.get("node"), cpu, ci.get("id", "unknown commit"),
                                            "dirty" if ci.get("dirty") else None, data.get("datetime")) if x)
        rows = []
        for b in data["benchmarks"]:
            if not isinstance(b, dict):
                continue
            st = b.get("stats") if isinstance(b.get("stats"), dict) else {}

            def us(k):
                v = st.get(k)
                return f"{v * 1e6:,.2f}" if isinstance(v, (int, float)) else "–"

            extra = b.get("extra_info") or {}
            rows.append(f"<tr><td>{E(str(b.get('name', '?')))}</td><td>{E(str(b.get('group') or ''))}</td>"
                        f"<td>{E(json.dumps(b.get('params') or {}, default=str))}</td><td>{us('median')}</td>"
                        f"<td>{us('mean')}</td><td>{us('stddev')}</td><td>{us('min')}</td>"
                        f"<td>{E(str(st.get('rounds', '–')))}</td>"
                        f"<td>{E(json.dumps(extra, default=str)) if extra else ''}</td></tr>")
        out.append(f"<h3>{E(path)}</h3><p class='src'>{E(where)}</p><div class='scroll'><table class='sortable'>"
                   "<thead><tr><th>benchmark</th><th>group</th><th>params</th><th>median µs</th><th>mean µs</th>"
                   "<th>stddev µs</th><th>min µs</th><th>rounds</th><th>extra</th></tr></thead>"
                   f"<tbody>{''.join(rows)}</tbody></table></div>")
    return "".join(out)


ENV_KEYS = ("gpu", "driver", "cuda", "torch", "transformers", "flash_attn", "python", "platform", "host", "cpu",
            "cpu_count", "capability", "gpu_memory_bytes")


def environment_html(records: list[dict], provenance: list[tuple[str, dict]]) -> str:
    parts = []
    if records:
        envs: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            envs[json.dumps(r.get("env") or {}, sort_keys=True, default=str)].append(r)
        rows = []
        for key, recs in sorted(envs.items(), key=lambda kv: -len(kv[1])):
            env = recs[0].get("env") or {}
            files = sorted({r["_source"].rpartition(":")[0] for r in recs})
            suites = Counter(r["suite"] for r in recs)
            rows.append("<tr><td><b>" + E(machine_label(env)) + "</b></td><td><code title='"
                        + E(str(env.get("commit") or "unknown")) + "'>" + E(plots.short_commit(env)) + "</code></td>"
                        + "".join(f"<td{' class=wrap' if k == 'platform' else ''}>{E(str(env.get(k, '–')))}</td>"
                                  for k in ENV_KEYS[1:9])
                        + f"<td>{E(', '.join(f'{s}: {n}' for s, n in sorted(suites.items())))}</td>"
                        + f"<td class='file'>{'<br>'.join(E(f) for f in files)}</td></tr>")
        parts.append("<div class='scroll'><table class='sortable env'><thead><tr><th>machine</th><th>commit</th>"
                     + "".join(f"<th>{k}</th>" for k in ENV_KEYS[1:9])
                     + "<th>records</th><th>files</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")
    else:
        parts.append(_none("environment"))
    if provenance:
        for path, data in provenance:
            # a suite appends one entry per run to {"runs": [...]}; any other object is shown as it is
            runs = data["runs"] if isinstance(data.get("runs"), list) else [data]
            parts.append(f"<h3>provenance: {E(path)} ({len(runs)} run(s))</h3>")
            for run in runs:
                if not isinstance(run, dict):
                    continue
                rows = "".join(f"<tr><th>{E(str(k))}</th>"
                               f"<td>{E(v if isinstance(v, str) else json.dumps(v, default=str))}"
                               "</td></tr>" for k, v in run.items())
                parts.append(f"<table class='kv'>{rows}</table>")
    else:
        parts.append("<p class='none'>no provenance JSON found next to the records (the performance suites can write "
                     "one beside their records: command, commit, GPU, date).</p>")
    return "".join(parts)


def problems_html(problems: list[Problem]) -> str:
    if not problems:
        return "<p class='none'>none: every line of every input was read.</p>"
    rows = "".join(f"<tr><td class='file'>{E(p.file)}:{p.line}</td><td>{E(p.reason)}</td></tr>" for p in problems)
    return (f"<p>{len(problems)} input line(s) or file(s) could not be used; the rest of the report is built "
            "without them.</p><div class='scroll'><table class='sortable'><thead><tr><th>file:line</th><th>problem"
            f"</th></tr></thead><tbody>{rows}</tbody></table></div>")


def records_html(records: list[dict]) -> str:
    if not records:
        return _none("records")
    rows = []
    for i, r in enumerate(records, 1):
        metrics = "  ".join(f"{k}={_fmt(v)}" for k, v in r["metrics"].items()
                            if isinstance(v, (int, float, str)) and not isinstance(v, bool))
        rows.append(f"<tr><td>{i}</td><td>{E(r['suite'])}</td><td>{E(r['method'])}</td>"
                    f"<td><span class='st st-{E(r['status'])}'>{E(r['status'])}</span></td>"
                    f"<td>{E(plots._cell_text(r))}</td><td class='metrics'>{E(metrics)}</td>"
                    f"<td>{_error_html(r.get('error'))}</td><td>{E(machine_label(r.get('env')))}</td>"
                    f"<td><code>{E(plots.short_commit(r.get('env')))}</code></td><td>{E(str(r.get('started_at')))}</td>"
                    f"<td>{E(_fmt(r.get('duration_s')))}</td><td class='file'>{E(r['_source'])}</td></tr>")
    return ("<p><input id='filter' type='search' placeholder='filter rows (any text)' size='40'> "
            f"<span id='shown'>{len(records)}</span> of {len(records)} records; click a column header to sort.</p>"
            "<div class='scroll tall'><table class='sortable' id='raw'><thead><tr><th>#</th><th>suite</th>"
            "<th>method</th><th>status</th><th>cell</th><th>metrics</th><th>error</th><th>machine</th><th>commit</th>"
            "<th>started</th><th>s</th><th>file:line</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table></div>")


def _sources_line(recs: list[dict]) -> str:
    """Which machines, commits and files a section's records came from."""
    if not recs:
        return ""
    by = Counter((origin(r), r["_source"].rpartition(":")[0]) for r in recs)
    return ("<p class='src'>records: " + "; ".join(f"{n} from {E(o)} ({E(f)})" for (o, f), n in sorted(by.items()))
            + "</p>")


# --- the page -------------------------------------------------------------------------------------------------------


def render(inp: Inputs, title: str) -> str:
    records = inp.records
    suites = _by_suite(records)
    # figures are built from escaped copies of the records: plotly would render markup inside record strings
    view = _by_suite(_escape_strings(copy.deepcopy(records)))
    acc, mem, ker, thr = (view.get(s, []) for s in ("accuracy", "memory", "kernels", "throughput"))
    colors = plots.palette([r["method"] for rs in view.values() for r in rs] + [plots.line_of(r) for r in acc])
    makers = {
        "pareto": lambda: plots.pareto(acc, mem, colors, speed_notes(_escape_strings(copy.deepcopy(records)))),
        "budget": lambda: plots.accuracy_vs_budget(acc, colors),
        "needle": lambda: plots.needle_heatmap(acc),
        "fidelity": lambda: plots.fidelity(acc, colors),
        "fidelity-length": lambda: fidelity_at_length(view.get("fidelity", []), colors),
        "kernels": lambda: plots.kernel_time(ker, colors, "decode"),
        "prefill": lambda: plots.kernel_time(ker, colors, "prefill"),
        "throughput": lambda: plots.throughput(thr, colors),
        "steps": lambda: step_accounting(thr, colors),
        "memory": lambda: plots.memory_fit(mem, colors),
        "rag": lambda: rag_report.figure(view.get("rag", []), colors),  # the rag suite's own figure (issue 15)
    }
    figs, broken = {}, {}
    for sid, make in makers.items():
        try:
            figs[sid] = make()
        except Exception as e:  # noqa: BLE001 - records nobody foresaw must cost one chart, not the page
            figs[sid], broken[sid] = None, f"{type(e).__name__}: {e}"
    from kvbench.suite import all_suites

    # which suite's records each chart draws, as each suite's declaration says (Suite.report)
    section_suite = {sid: suite.name for suite in all_suites().values() for sid in suite.report}
    bodies = {
        "summary": summary_section(records),
        "failures": failures_table(records),
        "benchmarks": benchmarks_html(inp.benchmarks),
        "environment": environment_html(records, inp.provenance),
        "problems": problems_html(inp.problems),
        "records": records_html(records),
    }
    fig_json = {}
    for sid, fig in figs.items():
        src = suites.get(section_suite.get(sid, ""), [])
        if sid in broken:
            bodies[sid] = (f"<p class='warn'>this chart could not be drawn from these records ({E(broken[sid])}); "
                           "the records are listed under <a href='#records'>all records</a>.</p>")
        elif fig is None:
            bodies[sid] = _none(sid)
        else:
            fig_json[f"chart-{sid}"] = fig.to_plotly_json()
            nfail = len(bad(src))
            bodies[sid] = (f'<div class="chart" id="chart-{sid}"></div>' + _sources_line(src)
                           + (f"<p class='warn'>{nfail} failed or out-of-memory cell(s) in this suite are drawn as "
                              "red crosses; hover for the error, or see <a href='#failures'>failed cells</a>.</p>"
                              if nfail else ""))
    machines = sorted({origin(r) for r in records})
    status = Counter(r["status"] for r in records)
    nav = " ".join(f"<a href='#{sid}'>{E(t)}</a>" for sid, t, _ in SECTIONS)
    sections = "".join(f"<section id='{sid}'><h2>{E(t)}</h2>{bodies[sid]}</section>" for sid, t, _ in SECTIONS)
    head_info = (f"{len(records)} records ({', '.join(f'{n} {s}' for s, n in sorted(status.items())) or 'none'}) from "
                 f"{len(inp.files)} file(s); machines: {E(', '.join(machines)) or 'none'}; "
                 f"{len(inp.problems)} problem(s). Built {E(now_iso())}.")
    problems_banner = (f"<p class='warn'>{len(inp.problems)} input problem(s): see <a href='#problems'>problems</a>."
                       "</p>" if inp.problems else "")
    return PAGE.format(title=E(title), head_info=head_info, nav=nav, sections=sections, banner=problems_banner,
                       plotly=get_plotlyjs(), figs=script_json(fig_json), css=CSS, js=JS, errjs=ERROR_JS)


CSP = ("default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
       "img-src data: blob:; font-src data:; connect-src 'none'")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#f6f7f9}
header{background:#1f2a44;color:#fff;padding:14px 24px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d3e6;font-size:13px}
nav{position:sticky;top:0;z-index:10;background:#fff;border-bottom:1px solid #dde1e6;padding:6px 24px;font-size:13px}
nav a{margin-right:12px;color:#2456a6;text-decoration:none;white-space:nowrap}nav a:hover{text-decoration:underline}
main{padding:8px 24px 40px;max-width:1600px}
section{background:#fff;border:1px solid #e1e4e8;border-radius:8px;margin:16px 0;padding:8px 18px 14px}
h2{font-size:18px;margin:8px 0}h3{font-size:14px;margin:12px 0 4px}
table{border-collapse:collapse;font-size:13px}th,td{border-bottom:1px solid #eceef1;padding:5px 8px;text-align:left;
vertical-align:top}thead th{background:#f0f2f5;position:sticky;top:0}
table.sortable thead th{cursor:pointer;user-select:none}table.sortable thead th:after{content:" \\2195";color:#aab}
table.summary td,table.summary th.m{min-width:90px}th.m{font-family:ui-monospace,monospace;font-weight:600}
table.summary td b{font-size:14px}.lead{font-size:14px;margin:4px 0 8px}.best{margin:4px 0 8px}.ref{margin:2px 0}
div.machine{border-left:4px solid #2456a6;padding:2px 0 6px 12px;margin:14px 0}
div.machine h3{font-size:16px;margin:6px 0 2px}details{margin:8px 0}h4{font-size:13px;margin:10px 0 4px}
table.grid td{white-space:nowrap;font-size:12px}
table.env td{white-space:nowrap}table.env td.file,table.env td.wrap{white-space:normal;overflow-wrap:anywhere;
min-width:160px;max-width:260px}
tbody tr:nth-child(even){background:#fafbfc}
.src{color:#6a737d;font-size:11.5px}.n{color:#6a737d;font-size:12px}.none{color:#6a737d;font-style:italic}
.warn{color:#9a3b00}.file{font-family:ui-monospace,monospace;font-size:11.5px;color:#555}
.metrics{font-family:ui-monospace,monospace;font-size:11.5px;max-width:520px}
.st{border-radius:10px;padding:1px 7px;font-size:12px;white-space:nowrap}.st-ok{background:#dcf5e3;color:#17612f}
.st-failed{background:#fde2e1;color:#a11}.st-oom{background:#fdebd3;color:#8a4b00}
.st-skipped{background:#eceef1;color:#555}
.scroll{overflow:auto;max-width:100%}.tall{max-height:640px}
pre{white-space:pre-wrap;font-size:11.5px;margin:4px 0}details summary{cursor:pointer}
#kv-errors{display:none;background:#fde2e1;color:#a11;padding:8px 24px}
.chart{width:100%;min-height:300px}table.kv{margin:6px 0 12px}table.kv th{background:#f0f2f5;width:160px}
table.kv td{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
"""

# Shown on the page if any script fails, so a broken chart is never silent (the browser test reads it too).
ERROR_JS = """
window.kvErrors=[];
function kvError(msg){window.kvErrors.push(String(msg));var b=document.getElementById('kv-errors');
if(b){b.style.display='block';b.textContent='Script error(s) while drawing this page: '+window.kvErrors.join(' | ');}}
window.addEventListener('error',function(e){kvError(e.message||e);});
window.addEventListener('unhandledrejection',function(e){kvError(e.reason);});
"""

JS = """
(function(){
  var figs = KV_FIGS, n = 0;
  Object.keys(figs).forEach(function(id){
    try { Plotly.newPlot(id, figs[id].data, figs[id].layout, {responsive:true, displaylogo:false}); n++; }
    catch(e){ kvError(id+': '+e); document.getElementById(id).textContent='this chart failed to draw: '+e; }
  });
  function key(td){ var t=td.textContent.trim(), x=parseFloat(t.replace(/,/g,''));
    return (/^-?[\\d,]*\\.?\\d+(e[-+]?\\d+)?$/i.test(t) && isFinite(x)) ? [0,x,''] : [1,0,t.toLowerCase()]; }
  document.querySelectorAll('table.sortable').forEach(function(table){
    table.querySelectorAll('thead th').forEach(function(th, i){
      th.addEventListener('click', function(){
        var asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function(a, b){ var x=key(a.cells[i]), y=key(b.cells[i]);
          var c = x[0]-y[0] || x[1]-y[1] || (x[2]<y[2]?-1:x[2]>y[2]?1:0); return asc ? c : -c; });
        rows.forEach(function(r){ body.appendChild(r); });
      });
    });
  });
  var f = document.getElementById('filter');
  if (f) f.addEventListener('input', function(){
    var q = f.value.toLowerCase(), shown = 0;
    document.querySelectorAll('#raw tbody tr').forEach(function(tr){
      var hit = tr.textContent.toLowerCase().indexOf(q) >= 0; tr.style.display = hit ? '' : 'none'; shown += hit; });
    document.getElementById('shown').textContent = shown;
  });
  document.body.setAttribute('data-charts-drawn', String(n));
})();
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<script>{errjs}</script>
<style>{css}</style>
</head><body>
<div id="kv-errors"></div>
<header><h1>{title}</h1><p>{head_info}</p></header>
<nav>{nav}</nav>
<main>{banner}{sections}</main>
<script>{plotly}</script>
<script>var KV_FIGS = {figs};</script>
<script>{js}</script>
</body></html>
""".replace("{csp}", CSP)
