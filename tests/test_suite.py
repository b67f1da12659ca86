"""The suite contract (kvbench/suite.py): declarations import no torch, options follow their profile, and a run can be
taken apart: list the cells, group them, measure a group in another process, get the same records."""

import json
import pickle
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest

from kvbench.api import KVBenchError
from kvbench.suite import all_suites, get_suite, group_cells, measure_group


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_cli_and_every_declaration_import_no_torch():
    r = _python("import sys, kvbench.cli\nfrom kvbench.suite import all_suites\nall_suites()\n"
                "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_bad_option_fails_before_torch_is_imported():
    r = _python("import sys\nfrom kvbench.suite import get_suite\nfrom kvbench.errors import KVBenchError\n"
                "try:\n    get_suite('memory').plan(['full'], contexts='lots')\nexcept KVBenchError as e:\n"
                "    print(e)\nprint('torch' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["--contexts: 'lots' is not a size; use e.g. 4096, 32K, 1M", "False"]


@pytest.mark.parametrize("gpu, quick, contexts, steps", [
    (True, False, [4096, 32768], 16), (True, True, [32768], 16), (False, False, [256, 1024], 4),
    (False, True, [256], 2)])
def test_defaults_follow_the_device_and_the_profile(gpu, quick, contexts, steps):
    opts = get_suite("throughput").fill_options({}, gpu, quick)
    assert (opts.contexts, opts.steps, opts.fill, opts.q_tail) == (contexts, steps, "auto", 1)
    given = get_suite("throughput").check_options({"steps": 3, "contexts": "1K,256"})
    assert get_suite("throughput").fill_options(given, gpu, quick).steps == 3  # what is given wins
    assert get_suite("throughput").fill_options(given, gpu, quick).contexts == [256, 1024]


def test_options_are_checked_by_name_type_choice_and_minimum():
    kernels = get_suite("kernels")
    for bad, needle in [({"colour": 1}, "has no option 'colour'"),
                        ({"spread": "yes"}, "--spread: 'yes' must be true or false"),
                        ({"mode": "sideways"}, "unknown mode 'sideways'"), ({"layer": -1}, "below its minimum"),
                        ({"contexts": "4Q"}, "--contexts: '4Q' is not a size")]:
        with pytest.raises(KVBenchError, match=needle):
            kernels.check_options(bad)
    assert kernels.check_options({"warmup_ms": 1})["warmup_ms"] == 1.0  # an int where a float is asked is fine


def test_every_suite_declares_what_the_cli_and_report_need():
    for name, suite in all_suites().items():
        assert suite.name == name and suite.help and suite.columns
        assert all(f.metadata["help"] for f in suite.option_fields())


def _strip(rec: dict) -> str:
    rec = {k: v for k, v in rec.items() if k not in ("started_at", "duration_s", "env")}
    rec["metrics"] = {k: v for k, v in rec["metrics"].items() if k != "telemetry"}
    return json.dumps(rec, sort_keys=True)


def test_cells_grouped_and_measured_in_another_process_give_the_serial_records():
    memory = get_suite("memory")
    plan = memory.plan(["full", "streaming:window=32"], model="embedded", contexts="64,128", search=False,
                       device="cpu")
    cells = memory.cells(plan)
    groups = group_cells(plan, cells)
    assert list(groups) == [("memory", "smollm2-135m", "full"), ("memory", "smollm2-135m", "streaming:window=32")]
    assert [len(g) for g in groups.values()] == [2, 2]
    plan2, group = pickle.loads(pickle.dumps((plan, list(groups.values())[1])))  # what a driver ships to a worker
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        remote = pool.submit(measure_group, plan2, group).result(timeout=300)
    local = list(memory.records(plan, list(groups.values())[1]))
    assert [_strip(r) for r in remote] == [_strip(r) for r in local]
    assert [r["cell"]["context"] for r in remote] == [64, 128] and all(r["status"] == "ok" for r in remote)
    assert {r["method_family"] for r in remote} == {"window"}
    assert [r["metrics"]["budget_fraction"] for r in remote] == [min(1.0, 36 / 64), 36 / 128]
