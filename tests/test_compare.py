"""`kvbench compare`: the comparison file is checked whole before anything runs (errors name the file, the key and the
fix), the suites named run through the suite contract, and the report is built from their records."""

import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvbench.api import KVBenchError
from kvbench import suite
from kvbench.cli import app
from kvbench.records import RecordWriter
from kvbench.suites import compare
from kvbench.suites.compare import load_comparison, run_comparison
from kvbench.suite import Options, Suite, option
from kvbench.sweep import Cell, run_sweep

runner = CliRunner()
needs_plotly = pytest.mark.skipif(importlib.util.find_spec("plotly") is None,
                                  reason="building the report needs plotly (the GPU machine has none)")


def flat(text):
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


def write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@dataclass
class FakeOptions(Options):
    contexts: str = option("comma-separated contexts", "256")
    explode: bool = option("fail the run", False)


@pytest.fixture
def fake_suite(monkeypatch):
    """A declared suite (registered as "fake") whose run writes accuracy-like records to fake.jsonl."""
    calls = []

    class FakeSuite(Suite):
        def run(self, methods, out, *, model="embedded", quick=False, rerun=False, show_progress=True, contexts="256",
                explode=False):
            calls.append(dict(methods=methods, model=model, quick=quick, contexts=contexts))
            if explode:
                raise RuntimeError("the suite broke")
            cells = [Cell(m, {}, {"model": model, "task": "passkey", "context": int(c), "depth": 0.5,
                                  "protocol": "query-aware", "seed": 0}) for m in methods for c in contexts.split(",")]
            return run_sweep("accuracy", cells, lambda c: {"score": 1.0, "bytes_per_token": 100.0},
                             RecordWriter(Path(out) / "fake.jsonl"), rerun=rerun, show_progress=False)

    mod = types.ModuleType("kvbench.suites.fake")
    mod.SUITE = FakeSuite("fake", "a fake suite", FakeOptions, cells=lambda plan: [], measure=lambda s, c: {})
    monkeypatch.setitem(sys.modules, "kvbench.suites.fake", mod)
    monkeypatch.setitem(suite.SUITES, "fake", "kvbench.suites.fake")
    monkeypatch.setitem(suite.SUITES, "notyet", "kvbench.suites.notyet")
    return calls


@pytest.mark.parametrize("text, needles", [
    ("methods = [full]\n[suites.memory]\n", ["c.toml", "TOML syntax error", "line 1"]),
    ("methods = ['full']\ncolour = 'red'\n[suites.memory]\n", ["c.toml: colour", "unknown key", "valid top-level"]),
    ("methods = ['full']\n[suites.nosuch]\n", ["c.toml: suites.nosuch", "unknown suite 'nosuch'", "valid suites"]),
    ("methods = ['full']\n[suites.memory]\nmethods = ['full', 'nosuch:budget=0.1']\n",
     ["c.toml: suites.memory.methods[1]", "unknown method 'nosuch'", "valid names: adakv, doublesparse, full,"]),
    ("methods = ['full:grow=0']\n[suites.memory]\n", ["c.toml: methods[0]", "'grow' = 0", ">= 1"]),
    ("methods = ['full:nope=3']\n[suites.memory]\n", ["methods[0]", "no parameter 'nope'"]),
    ("methods = [{name = 'full', grow = [1, 'x']}]\n[suites.memory]\n", ["methods[0]", "grow"]),
    ("methods = [{name = 'full', nope = 1}]\n[suites.memory]\n", ["methods[0].nope", "no parameter 'nope'", "grow"]),
    ("methods = ['full']\n[suites.memory]\nno_such_option = 1\n",
     ["suites.memory.no_such_option", "has no option", "contexts", "kvbench run memory --help"]),
    ("methods = ['full']\n", ["c.toml: suites", "no suite to run"]),
    ("[suites.memory]\n", ["suites.memory.methods", "no methods"]),
    ("methods = 'full'\n[suites.memory]\n", ["c.toml: methods", "must be a list"]),
    ("methods = ['full']\nquick = 'yes'\n[suites.memory]\n", ["c.toml: quick", "must be a bool"]),
    ("methods = ['full']\n[suites.memory]\nmodel = 'a'\nmodels = ['b']\n", ["suites.memory", "both `model`"]),
])
def test_bad_files_fail_before_anything_runs_naming_file_key_and_fix(tmp_path, text, needles):
    with pytest.raises(KVBenchError) as e:
        load_comparison(write(tmp_path, text))
    msg = str(e.value)
    for n in needles:
        assert n in msg, msg
    assert "fix" in msg or "TOML syntax error" in msg


def test_cli_reports_a_bad_file_in_one_line_with_exit_code_2(tmp_path):
    r = runner.invoke(app, ["compare", str(write(tmp_path, "methods = ['nosuch']\n[suites.memory]\n"))])
    assert r.exit_code == 2 and "unknown method 'nosuch'" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    r = runner.invoke(app, ["compare", str(tmp_path / "missing.toml")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_methods_expand_and_suite_settings_override(tmp_path, fake_suite):
    comp = load_comparison(write(tmp_path, """
title = "t"
methods = ["full", {name = "full", grow = [8, 16]}, "full:grow=256"]
models = ["m1", "m2"]
quick = true
[suites.fake]
contexts = "256,512"
[suites.memory]
methods = ["full"]
model = "embedded"
quick = false
"""))
    fake, mem = comp.suites
    assert fake.methods == ["full", "full:grow=8", "full:grow=16"]  # grow=256 is the default: the same method
    assert fake.models == ["m1", "m2"] and fake.quick and fake.options == {"contexts": "256,512"}
    assert mem.methods == ["full"] and mem.models == ["embedded"] and not mem.quick


@needs_plotly
def test_compare_runs_suites_then_builds_the_report(tmp_path, fake_suite):
    extra = tmp_path / "extra.jsonl"
    extra.write_text('{"schema": 1, "suite": "kernels", "method": "full", "cell": {}, "status": "oom", '
                     '"error": "CUDA out of memory"}\n')
    f = write(tmp_path, f"""
title = "my <comparison>"
methods = ["full"]
include = ["{extra}"]
[suites.fake]
contexts = "256,512"
[suites.notyet]
""")
    r = runner.invoke(app, ["compare", str(f), "--out", str(tmp_path / "res")])
    assert r.exit_code == 0, r.output
    report = Path(r.output.strip().splitlines()[-1])  # the last line is the report's path
    assert report == tmp_path / "res" / "report.html" and report.exists()
    assert fake_suite == [dict(methods=["full"], model="embedded", quick=False, contexts="256,512")]
    assert "suite 'notyet' skipped: kvbench.suites.notyet does not exist" in flat(r.output)  # reported, not fatal
    page = report.read_text()
    assert "my &lt;comparison&gt;" in page and 'id="chart-budget"' in page and "CUDA out of memory" in page
    # a rerun skips the cells already done
    r = runner.invoke(app, ["compare", str(f), "--out", str(tmp_path / "res")])
    assert r.exit_code == 0 and "2 already done" in flat(r.output)


@needs_plotly
def test_a_failing_suite_is_reported_the_rest_still_runs_and_exit_is_2(tmp_path, fake_suite):
    f = write(tmp_path, "methods = ['full']\n[suites.fake]\nexplode = true\n[suites.memory]\nquick = true\n"
                        "search = false\ncontexts = '64'\n")
    comp = load_comparison(f)
    report, errors = run_comparison(comp, tmp_path / "res")
    assert len(errors) == 1 and "the suite broke" in errors[0]
    assert (tmp_path / "res" / "memory.jsonl").exists() and report.exists()  # the real memory suite still ran
    assert 'id="chart-memory"' in report.read_text()
    r = runner.invoke(app, ["compare", str(f), "--out", str(tmp_path / "res2")])
    assert r.exit_code == 2 and "the report was still built" in flat(r.output)


def test_check_prints_the_plan_and_runs_nothing(tmp_path, fake_suite):
    r = runner.invoke(app, ["compare", str(write(tmp_path, "methods = ['full']\n[suites.fake]\n")), "--check",
                            "--out", str(tmp_path / "res")])
    assert r.exit_code == 0 and "fake" in r.output and not fake_suite and not (tmp_path / "res").exists()


def test_the_plan_names_every_parameter_of_each_method(tmp_path, fake_suite):
    """A method at its defaults is shown with them: `selfindex:budget=0.1` must not read as a bare `selfindex`."""
    f = write(tmp_path, "methods = ['selfindex:budget=0.1', 'snapkv:capacity=160']\n[suites.fake]\n")
    r = runner.invoke(app, ["compare", str(f), "--check", "--out", str(tmp_path / "res")])
    out = flat(r.output).replace(" ", "")
    assert r.exit_code == 0 and "selfindex:budget=0.1,setting=2+1" in out and "snapkv:capacity=160," in out


@pytest.mark.parametrize("name", ["quick-cpu.toml", "h100.toml"])
def test_shipped_comparison_files_are_valid(name):
    comp = load_comparison(compare.DEFAULT_FILE.parent / name)
    assert comp.suites and all(p.methods for p in comp.suites)


def test_without_plotly_the_records_stay_and_no_report_is_claimed(tmp_path, fake_suite, monkeypatch):
    monkeypatch.setitem(sys.modules, "kvbench.reports.build", None)  # import fails, as on a machine without plotly
    r = runner.invoke(app, ["compare", str(write(tmp_path, "methods = ['full']\n[suites.fake]\n")),
                            "--out", str(tmp_path / "res")])
    assert r.exit_code == 0, r.output
    assert "no report built here" in flat(r.output) and "kvbench report" in flat(r.output)
    assert (tmp_path / "res" / "fake.jsonl").exists() and not (tmp_path / "res" / "report.html").exists()


def test_only_runs_the_named_suites_and_rejects_others(tmp_path, fake_suite):
    f = write(tmp_path, "methods = ['full']\n[suites.fake]\n[suites.memory]\nquick = true\n")
    r = runner.invoke(app, ["compare", str(f), "--only", "fake", "--out", str(tmp_path / "res"), "--check"])
    assert r.exit_code == 0 and "memory" not in r.output and "fake" in r.output
    r = runner.invoke(app, ["compare", str(f), "--only", "kernels"])
    assert r.exit_code == 2 and "not a suite of" in r.output and "fake, memory" in r.output
