"""docs/architecture.md's worked example: the page shows suites/agreement.py whole, and that suite works with nothing
but its own file and one registry line: its command, its comparison-file checks and its records."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvbench.api import KVBenchError
from kvbench.cli import app
from kvbench.records import read_records
from kvbench.suite import SUITES
from kvbench.suites import agreement
from kvbench.suites.compare import load_comparison

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("kvbench", "suites", "methods", "kernels", "reports")


def test_the_page_shows_this_very_file():
    page = (ROOT / "docs" / "architecture.md").read_text()
    source = (ROOT / "suites" / "agreement.py").read_text()
    assert "```python\n" + source + "```" in page
    assert f"in {len(source.splitlines())} lines" in page
    assert f'"agreement": "{SUITES["agreement"]}",' in page  # the registry line, as it is


def test_nothing_but_its_file_and_one_registry_line_names_the_suite():
    mentions = []
    for d in SOURCE_DIRS:
        for f in (ROOT / d).rglob("*.py"):
            if f.name == "agreement.py":
                continue
            mentions += [(f.relative_to(ROOT).as_posix(), line.strip()) for line in f.read_text().splitlines()
                         if re.search(r"\bagreement\b", line)]
    assert mentions == [("kvbench/suite.py", '"agreement": "kvbench.suites.agreement",')]


def test_its_command_is_generated_from_the_declaration(tmp_path):
    r = CliRunner().invoke(app, ["run", "agreement", "--help"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.replace("│", " ").split())  # rich's boxes and line wrapping undone
    for flag in ("--methods", "--out", "--quick", "--contexts", "--steps", "--batch", "--q-tail", "--device"):
        assert flag in text
    assert "default GPU 4K,32K, CPU 256,1K; quick 256" in text
    r = CliRunner().invoke(app, ["run", "agreement", "--contexts", "lots", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--contexts: 'lots' is not a size" in r.output and "Traceback" not in r.output


def test_a_comparison_file_checks_its_options(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("methods = ['full']\n[suites.agreement]\ncontexts = '64'\nsteps = 2\n")
    (plan,) = load_comparison(f).suites
    assert plan.name == "agreement" and plan.options == {"contexts": "64", "steps": 2}
    for bad, needle in [("steps = 'x'", "--steps: 'x' must be a whole number"), ("steps = 0", "below its minimum"),
                        ("colour = 1", "has no option 'colour'")]:
        f.write_text(f"methods = ['full']\n[suites.agreement]\n{bad}\n")
        with pytest.raises(KVBenchError, match=needle) as e:
            load_comparison(f)
        assert "suites.agreement" in str(e.value)


def test_a_run_writes_records_that_say_how_close_each_method_is(tmp_path):
    res = agreement.run(["full", "streaming:sinks=4,window=28"], tmp_path, model="embedded", contexts="64,128",
                        steps=2, show_progress=False)
    recs, problems = read_records([tmp_path / "agreement.jsonl"])
    assert not problems and res.ok == len(recs) == 4
    for r in recs:
        m = r["metrics"]
        assert r["suite"] == "agreement" and m["steps"] == 2 and m["telemetry"]["available"] is False
        if r["method"] == "full":
            assert m["topk_recall"] == 1.0 and m["out_rel_err"] < 1e-5 and m["budget_fraction"] == 1.0
        else:  # 32 of 64 + 1 (or 128 + 1) tokens attended
            assert r["method_family"] == "window" and m["attended_frac"] < 0.6
            assert m["budget_fraction"] == pytest.approx(32 / r["cell"]["context"])
    again = agreement.run(["full", "streaming:sinks=4,window=28"], tmp_path, model="embedded", contexts="64,128",
                          steps=2, show_progress=False)
    assert again.already_done == 4 and again.ok == 0
