"""`--ray`: a local Ray cluster of 2 workers measures the cells a serial sweep would, the driver alone writes the
records, resume skips finished cells, and a killed or hung worker costs no finished record: its cell is recorded and
retried once on the other worker. One cluster is shared by the whole module (Ray takes seconds to start)."""

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import distributed_fakes
from distributed_fakes import FakeSource
from kvbench.cli import app
from kvbench.distributed import Cluster, import_ray, run_sources
from kvbench.errors import KVBenchError
from kvbench.records import RecordWriter, cell_key, read_records
from kvbench.sweep import run_sweep

try:
    import ray
except ImportError:  # CI installs the extra (.ci/run); without it only the first test runs
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="the Ray tests need the ray extra: pip install -e '.[ray]'")


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import fails, as where the extra is not installed
    with pytest.raises(KVBenchError, match=r'pip install -e "\.\[ray\]"'):
        import_ray()
    r = CliRunner().invoke(app, ["run", "memory", "--quick", "-m", "full", "--ray", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--ray needs Ray" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "memory.jsonl").exists()


@needs_ray
def test_an_address_where_no_cluster_answers_fails_at_once_with_the_fix():
    import socket

    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    r = CliRunner().invoke(app, ["run", "memory", "--quick", "-m", "full", "--ray-address", f"127.0.0.1:{port}"])
    assert r.exit_code == 2 and "nothing answers there" in r.output and "ray start --head" in r.output


@pytest.fixture(scope="module")
def cluster():
    ray.cloudpickle.register_pickle_by_value(distributed_fakes)  # workers do not import tests/
    with Cluster(workers=2, start_timeout_s=120) as c:
        assert c.started and c.slots == 2 and not c.gpu
        yield c
    assert not ray.is_initialized()  # the cluster kvbench started is stopped


def records(path):
    recs, problems = read_records([path])
    assert not problems
    return recs


def keys(recs, status=("ok",)):
    return sorted(cell_key(r["suite"], r["method"], r["cell"]) for r in recs if r["status"] in status)


def serial(source, out):
    cells = source.cells()
    by_method = {m: source.open(m) for m in source.methods}
    run_sweep(source.suite, cells, lambda c: by_method[c.method](c), RecordWriter(out / f"{source.suite}.jsonl"),
              show_progress=False)
    return records(out / f"{source.suite}.jsonl")


@needs_ray
def test_cells_spread_over_both_workers_with_the_serial_runs_records(cluster, tmp_path):
    source = FakeSource(methods=("a", "b", "c", "d"), per_method=3, work_s=0.3)
    (result,), _ = run_sources([source], tmp_path / "ray", cluster, show_progress=False)
    assert (result.ok, result.failed, result.oom) == (12, 0, 0)
    got = records(tmp_path / "ray" / "fake.jsonl")
    want = serial(source, tmp_path / "serial")
    assert keys(got) == keys(want)
    for r in got:  # measured on the worker, with the worker's own cell context, by one load per group
        assert r["metrics"]["parsed"] == f"{r['method']}-built-here"
        w = r["env"]["worker"]
        assert r["metrics"]["loaded_by"] == w["pid"] and w["node_id"] and w["node_ip"] and w["gpu_ids"] == []
        assert r["env"]["host"] and r["env"]["torch"]
    pids = {m: {r["env"]["worker"]["pid"] for r in got if r["method"] == m} for m in source.methods}
    assert all(len(p) == 1 for p in pids.values())  # a group stays on one worker
    assert len({r["env"]["worker"]["pid"] for r in got}) == 2  # both workers took groups
    prov = json.loads((tmp_path / "ray" / "fake.provenance.json").read_text())["runs"][-1]
    assert prov["ray"]["workers"] == 2 and len(prov["ray"]["workers_used"]) == 2
    assert prov["options"] == source.options()


@needs_ray
def test_a_rerun_dispatches_nothing_and_rerun_measures_again(cluster, tmp_path):
    source = FakeSource(per_method=2)
    run_sources([source], tmp_path, cluster, show_progress=False)
    (again,), _ = run_sources([source], tmp_path, cluster, show_progress=False)
    assert (again.ok, again.already_done) == (0, 6)
    assert len(records(tmp_path / "fake.jsonl")) == 6
    (forced,), _ = run_sources([source], tmp_path, cluster, rerun=True, show_progress=False)
    assert forced.ok == 6 and len(records(tmp_path / "fake.jsonl")) == 12


@needs_ray
def test_a_killed_worker_loses_no_record_and_its_cell_is_retried_on_the_other(cluster, tmp_path):
    source = FakeSource(methods=("a", "b", "c"), per_method=3, work_s=0.3, trap="kill",
                        trap_once=str(tmp_path / "killed-once"))
    (result,), _ = run_sources([source], tmp_path / "out", cluster, show_progress=False)
    recs = records(tmp_path / "out" / "fake.jsonl")
    failed = [r for r in recs if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["method"] == "b" and failed[0]["cell"]["i"] == 0
    assert "worker died" in failed[0]["error"] and "retried once on another worker" in failed[0]["error"]
    killed_pid = failed[0]["env"]["worker"]["pid"]
    assert keys(recs) == keys(serial(FakeSource(methods=("a", "b", "c"), per_method=3), tmp_path / "serial"))
    assert len(keys(recs)) == len(set(keys(recs)))  # nothing measured twice
    retry = next(r for r in recs if r["status"] == "ok" and r["method"] == "b" and r["cell"]["i"] == 0)
    assert retry["env"]["worker"]["pid"] != killed_pid
    assert (result.ok, result.failed) == (9, 1)


@needs_ray
def test_a_hung_cell_times_out_is_retried_once_and_the_sweep_goes_on(cluster, tmp_path):
    source = FakeSource(methods=("a", "b"), per_method=2, trap="hang")  # hangs every time it runs
    (result,), _ = run_sources([source], tmp_path, cluster, cell_timeout=2.0, show_progress=False)
    recs = records(tmp_path / "fake.jsonl")
    hung = [r for r in recs if r["method"] == "b" and r["cell"]["i"] == 0]
    assert [r["status"] for r in hung] == ["failed", "failed"]
    assert "timed out" in hung[0]["error"] and "retried once" in hung[0]["error"]
    assert "not retried again" in hung[1]["error"]
    assert {(r["method"], r["cell"]["i"]) for r in recs if r["status"] == "ok"} == {("a", 0), ("a", 1), ("b", 1)}
    assert (result.ok, result.failed) == (3, 2)


@needs_ray
def test_ctrl_c_keeps_every_record_written_and_a_rerun_finishes_the_rest(cluster, tmp_path, monkeypatch):
    source = FakeSource(methods=("a", "b", "c"), per_method=2, work_s=0.2)
    real_append, appended = RecordWriter.append, []

    def append_then_interrupt(self, record):
        real_append(self, record)
        appended.append(record)
        if len(appended) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RecordWriter, "append", append_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_sources([source], tmp_path, cluster, show_progress=False)
    monkeypatch.setattr(RecordWriter, "append", real_append)
    assert len(records(tmp_path / "fake.jsonl")) == 2
    (rest,), _ = run_sources([source], tmp_path, cluster, show_progress=False)
    assert (rest.already_done, rest.ok) == (2, 4) and len(records(tmp_path / "fake.jsonl")) == 6


@needs_ray
def test_compare_ray_runs_the_quick_memory_and_kernel_suites_with_the_serial_runs_cells(cluster, tmp_path):
    small = Path(__file__).parent / "data" / "ray-small.toml"
    runner = CliRunner()
    serial_run = runner.invoke(app, ["compare", str(small), "--out", str(tmp_path / "serial")])
    assert serial_run.exit_code == 0, serial_run.output
    on_ray = runner.invoke(app, ["compare", str(small), "--ray", "--out", str(tmp_path / "ray")])
    assert on_ray.exit_code == 0, on_ray.output
    for suite in ("memory", "kernels"):
        got, want = records(tmp_path / "ray" / f"{suite}.jsonl"), records(tmp_path / "serial" / f"{suite}.jsonl")
        assert keys(got) == keys(want) and len(got) == len(want) and got
        assert {r["status"] for r in got} == {"ok"}
        assert {r["env"]["worker"]["node_id"] for r in got} == {ray.nodes()[0]["NodeID"]}
        assert all(r["env"]["worker"]["pid"] for r in got)
    # resume: the same command again dispatches nothing
    again = runner.invoke(app, ["compare", str(small), "--ray", "--out", str(tmp_path / "ray")])
    summary = " ".join(again.output.split())  # rich's line wrapping undone
    assert again.exit_code == 0 and "memory on embedded (ray): 0 ok, 0 failed, 0 out of memory, 0 skipped, 6 already" \
        " done" in summary


@needs_ray
def test_run_suite_ray_measures_the_cells_of_a_serial_run(cluster, tmp_path):
    args = ["run", "memory", "--quick", "--no-search", "-m", "full", "-m", "streaming:window=60"]
    runner = CliRunner()
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "serial")]).exit_code == 0
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "ray"), "--ray", "--cell-timeout", "600"])
    assert r.exit_code == 0, r.output
    got, want = records(tmp_path / "ray" / "memory.jsonl"), records(tmp_path / "serial" / "memory.jsonl")
    assert keys(got) == keys(want) and len(got) == 2

    def held(recs):  # what a method holds is deterministic: the same on a worker as in the serial run
        return sorted((r["method"], r["method_family"], r["metrics"]["nbytes"], r["metrics"]["budget_fraction"])
                      for r in recs)

    assert held(got) == held(want)
