import pytest
import torch

from kvbench.api import KVBenchError
from kvbench.records import read_records
from kvbench.registry import available_methods
from kvbench import synthetic
from kvbench.sizes import parse_bytes, parse_size, parse_sizes, search_max
from kvbench.suites import memory


class FakeAllocator:
    """A device of `capacity` bytes: allocations past it raise torch.OutOfMemoryError, like the CUDA allocator."""

    def __init__(self, capacity: int):
        self.capacity, self.used, self.peak = capacity, 0, 0

    def alloc(self, n: int) -> int:
        if self.used + n > self.capacity:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} bytes")
        self.used += n
        self.peak = max(self.peak, self.used)
        return n

    def free(self, n: int) -> None:
        self.used -= n


def probe_with(alloc: FakeAllocator, bytes_per_unit: int, overhead: int):
    """fits(n) the way the suite's probes work: build (allocate), catch out-of-memory, free everything."""

    def fits(n: int):
        held = []
        try:
            held.append(alloc.alloc(overhead))
            held.append(alloc.alloc(n * bytes_per_unit))
            return True, {"peak": alloc.peak}
        except torch.OutOfMemoryError:
            return False, {}
        finally:
            for h in held:
                alloc.free(h)

    return fits


@pytest.mark.parametrize("capacity", [1, 999, 1000, 1001, 12_345, 64_000, 10**6])
def test_search_finds_the_largest_batch_that_fits_a_fake_allocator(capacity):
    per, overhead = 100, 50
    best, trail = search_max(probe_with(FakeAllocator(capacity), per, overhead), start=1, limit=4096)
    expected = min(4096, max(0, (capacity - overhead) // per))
    assert best == expected
    assert all(p["fits"] == (p["n"] <= expected) for p in trail)  # every probe was judged correctly
    assert len(trail) <= 2 * 13 + 1  # doubling then bisecting: logarithmic, not linear


@pytest.mark.parametrize("capacity", [3 * 2**20, 50 * 2**20, 2**30])
def test_search_context_in_steps_of_1024(capacity):
    best, _ = search_max(probe_with(FakeAllocator(capacity), 1024, 0), start=1024, limit=2**20, step=1024)
    assert best == min(2**20, capacity // 1024 // 1024 * 1024)
    assert best % 1024 == 0


@pytest.mark.parametrize("capacity", [50 * 2**20, 77 * 2**20, 2**30])
def test_relative_resolution_stays_within_its_bound_with_fewer_probes(capacity):
    exact, trail_exact = search_max(probe_with(FakeAllocator(capacity), 1024, 0), 1024, 2**22, step=1024)
    rough, trail_rough = search_max(probe_with(FakeAllocator(capacity), 1024, 0), 1024, 2**22, step=1024, rel=0.125)
    assert rough <= exact < rough * 1.125 + 1024 and rough % 1024 == 0
    assert len(trail_rough) <= len(trail_exact)


def test_search_stops_at_the_limit_when_everything_fits():
    best, trail = search_max(lambda n: (True, {}), start=1, limit=100)
    assert best == 100 and trail[-1]["n"] == 100


def test_parse_sizes_and_bytes():
    assert parse_sizes("4K,32K, 128K,4K", "--contexts") == [4096, 32768, 131072]
    assert parse_sizes([8, 1], "x") == [1, 8]
    assert parse_size("1M", "x") == 2**20
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes(None) is None and parse_bytes("free") is None
    for bad in ("", "4Q", "-1", "0.5"):
        with pytest.raises(KVBenchError):
            parse_sizes(bad, "--contexts")


def _check_valid(path):
    records, problems = read_records([path])
    assert not problems and records
    return records


@pytest.mark.slow  # every registered method's CPU reference prefill, 30 layers each
def test_tiny_grid_on_cpu_with_every_registered_method(tmp_path):
    names = list(available_methods())
    res = memory.run(names, tmp_path, contexts="64", batches="1,2", search=False, show_progress=False)
    records = _check_valid(tmp_path / "memory.jsonl")
    assert len(records) == len(names) * 2 and res.ok == len(records), [r["error"] for r in records]
    for r in records:
        m = r["metrics"]
        assert m["nbytes"] > 0 and m["bytes_per_token"] == m["nbytes"] / (r["cell"]["context"] * r["cell"]["batch"])
        assert m["allocated_bytes"] is None and "unavailable" in m["allocator"]  # the CPU says so
        assert m["telemetry"]["available"] is False
    full = [r for r in records if r["method"] == "full"]
    # full holds exactly K and V: 30 layers x 2 x 3 KV heads x 64 dims x 4 bytes per token
    assert all(r["metrics"]["bytes_per_token"] == 30 * 2 * 3 * 64 * 4 for r in full)
    assert (tmp_path / "memory.provenance.json").exists()


def test_over_budget_cell_is_recorded_as_oom_and_the_run_goes_on(tmp_path):
    # 4 MiB: 64 tokens of full fit (2.8 MiB), 128 do not (5.6 MiB)
    res = memory.run(["full"], tmp_path, contexts="64,128,80", search=False, budget="4M", show_progress=False)
    by_ctx = {r["cell"]["context"]: r for r in _check_valid(tmp_path / "memory.jsonl")}
    assert by_ctx[64]["status"] == "ok" and by_ctx[80]["status"] == "ok"
    assert by_ctx[128]["status"] == "oom" and "budget" in by_ctx[128]["error"]
    assert res.oom == 1 and res.ok == 2


def test_max_context_and_batch_search_with_full_on_cpu(tmp_path):
    budget = 40 * 2**20
    memory.run(["full"], tmp_path, contexts="64", search=True, budget=budget, search_context="256", max_batch=64,
               show_progress=False)
    recs = {r["cell"]["task"]: r for r in _check_valid(tmp_path / "memory.jsonl")}
    per_token = 30 * 2 * 3 * 64 * 4  # full, all layers
    q_tail = 9 * synthetic.Q_TAIL * 64 * 4  # the last layer's query tail, held while it is built
    # the last layer's inputs are counted before it is built: 29 layers held + 1 layer of inputs = 30 layers' worth
    want_ctx = (budget - q_tail) // per_token // 256 * 256
    assert recs["max_context"]["metrics"]["max_context"] == want_ctx == 768
    assert recs["max_batch"]["metrics"]["max_batch"] == budget // (256 * per_token + q_tail) == 3
    assert recs["max_batch"]["metrics"]["probes"][-1]["n"] in (3, 4)


def test_cli_rejects_a_bad_size_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from kvbench.cli import app

    r = CliRunner().invoke(app, ["run", "memory", "--contexts", "lots", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--contexts: 'lots' is not a size" in r.output and "Traceback" not in r.output


@pytest.mark.gpu
def test_gpu_memory_views_side_by_side(tmp_path):
    memory.run(["full"], tmp_path, contexts="4K", search=False, show_progress=False)
    (r,) = _check_valid(tmp_path / "memory.jsonl")
    m = r["metrics"]
    assert r["status"] == "ok"
    # full holds exactly what it says; the allocator sees at least that; the peak adds one layer's inputs
    assert m["allocated_bytes"] >= m["nbytes"] and m["peak_bytes"] >= m["allocated_bytes"]
    assert m["telemetry"].get("available") is not None
