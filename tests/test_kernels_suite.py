import pytest
import torch

from kvbench.api import LayerCache, LayerSpec, Method
from kvbench import cache_timing
from kvbench.records import read_records
from kvbench.registry import available_methods, parse_method
from kvbench.suites import kernels
from kvbench.suites.kernels import measure_decode

FAST = dict(warmup_ms=1, rep_ms=5)  # CPU: a few calls are enough to check the plumbing


def _records(path):
    records, problems = read_records([path])
    assert not problems and records
    return records


@pytest.mark.slow  # every registered method's CPU reference, decode and prefill
def test_tiny_grid_on_cpu_with_every_registered_method(tmp_path):
    names = list(available_methods())
    res = kernels.run(names, tmp_path, contexts="64,128", batches="1,2", mode="both", show_progress=False, **FAST)
    records = _records(tmp_path / "kernels.jsonl")
    decode = [r for r in records if r["cell"]["mode"] == "decode"]
    prefill = [r for r in records if r["cell"]["mode"] == "prefill"]
    assert len(decode) == 4 * len(names) and len(prefill) == 2 * len(names)  # prefill: batch 1 only
    assert res.ok == len(records), [r["error"] for r in records if r["status"] != "ok"]
    for r in decode:
        m = r["metrics"]
        assert m["time_us"] > 0 and m["floor_us"] > 0 and m["bandwidth_gbs"] > 0 and m["copy_gbs"] > 0
        assert m["floor_us"] == pytest.approx(m["decode_bytes"] / (m["copy_gbs"] * 1e3))
        assert m["speedup_vs_full"] == pytest.approx(m["full_time_us"] / m["time_us"])
        assert isinstance(m["stage_us"], dict) and m["clock"] == "perf_counter"
    for r in prefill:
        m = r["metrics"]
        assert m["overhead_pct"] is not None and m["floor_us"] == max(m["floor_compute_us"], m["floor_memory_us"]) > 0
        assert m["prefill_flops"] == 2 * r["cell"]["batch"] * 9 * r["cell"]["context"] ** 2 * 64
    assert all(r["metrics"]["speedup_vs_full"] == 1.0 for r in records if r["method"] == "full")


def test_full_reference_is_measured_when_full_is_not_asked_for(tmp_path, monkeypatch):
    seen = []
    real = kernels.measure_decode

    def spy(method, *a, **k):
        seen.append(method.label())
        return real(method, *a, **k)

    monkeypatch.setattr(kernels, "measure_decode", spy)
    kernels.run(["full:grow=8"], tmp_path, contexts="64", batches="1", spread=True, show_progress=False, **FAST)
    (r,) = _records(tmp_path / "kernels.jsonl")
    assert seen == ["full", "full:grow=8"]  # the reference first, then the method
    m = r["metrics"]
    assert m["full_time_us"] > 0 and m["speedup_vs_full"] > 0
    assert m["time_us_repeat"] > 0 and m["spread_pct"] >= 0  # measured twice, spread recorded


def test_out_of_memory_cell_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    real = kernels.measure_decode

    def fake(method, spec, batch, context, **kw):
        if batch == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 34.00 GiB")
        return real(method, spec, batch, context, **kw)

    monkeypatch.setattr(kernels, "measure_decode", fake)
    res = kernels.run(["full"], tmp_path, contexts="64", batches="1,2,4", show_progress=False, **FAST)
    status = {r["cell"]["batch"]: r["status"] for r in _records(tmp_path / "kernels.jsonl")}
    assert status == {1: "ok", 2: "oom", 4: "ok"} and res.oom == 1
    # a rerun skips what is done (oom included) and measures nothing again
    res2 = kernels.run(["full"], tmp_path, contexts="64", batches="1,2,4", show_progress=False, **FAST)
    assert res2.already_done == 3 and res2.ok == 0


class _NoHooks(Method):
    """A method without decode_fns: the suite must time extend() instead."""

    name = "nohooks-test"

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        inner = parse_method("full").make_layer(spec)

        class Layer(LayerCache):
            prefill, extend, nbytes, seq_len = inner.prefill, inner.extend, inner.nbytes, inner.seq_len

        return Layer()


def test_method_without_decode_fns_times_extend_and_says_so():
    spec = LayerSpec(0, 1, 4, 2, 16, torch.float32, torch.device("cpu"))
    m = measure_decode(_NoHooks(), spec, 1, 64, l2="flush", bench_kw=dict(FAST, device=spec.device), spread=False,
                       q_tail=8, seed=0)
    assert m["timed"] == "extend" and m["bytes_from"] == "nbytes" and m["time_us"] > 0
    assert 0 < m["context_growth"] <= cache_timing.EXTEND_MAX_CALLS + 1


def test_bad_mode_fails_before_any_work(tmp_path):
    from kvbench.api import KVBenchError

    with pytest.raises(KVBenchError, match="--mode"):
        kernels.run(["full"], tmp_path, mode="sideways")
    assert not (tmp_path / "kernels.jsonl").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("l2, graph", [("flush", False), ("rotate", False), ("rotate", True)])
def test_gpu_kernel_cells_sit_next_to_their_floor(tmp_path, l2, graph):
    kernels.run(["full"], tmp_path, contexts="4K", batches="1,4", mode="both", l2=l2, spread=True,
                show_progress=False, graph=graph)
    for r in _records(tmp_path / "kernels.jsonl"):
        assert r["status"] == "ok", r["error"]
        m = r["metrics"]
        decode_graph = graph and r["cell"]["mode"] == "decode"
        assert m["clock"].startswith("cuda-graph" if decode_graph else "cuda-events")
        assert m["time_us"] > 0 and m["spread_pct"] is not None
        if r["cell"]["mode"] == "decode":
            assert m["floor_us"] > 0 and m["l2"] == ("flush" if l2 == "flush" and not graph
                                                     else f"rotate:{m['copies']}")
            assert m["telemetry"]["available"] in (True, False)
