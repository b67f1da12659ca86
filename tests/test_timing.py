import time

import pytest
import torch

from kvbench.timing import bench, copy_bandwidth, floor_us, l2_bytes, matmul_tflops, spread_pct, summarize


def test_summarize_quantiles_match_numpy_linear_interpolation():
    t = summarize([5.0, 1.0, 4.0, 2.0, 3.0], n_warmup=2, clock="perf_counter", l2="none")
    assert (t.min_us, t.median_us, t.mean_us) == (1.0, 3.0, 3.0)
    assert t.p20_us == pytest.approx(1.8) and t.p80_us == pytest.approx(4.2)
    assert t.n_repeat == 5 and t.n_warmup == 2


def test_bench_cpu_median_is_at_least_the_work_and_quantiles_are_ordered():
    t = bench(lambda: time.sleep(0.002), warmup_ms=4, rep_ms=30, device="cpu")
    assert t.clock == "perf_counter" and t.l2 == "none"
    assert t.median_us >= 2000  # a 2 ms sleep cannot take less (an upper bound would be a flaky timing test)
    assert t.min_us <= t.p20_us <= t.median_us <= t.p80_us
    assert t.n_warmup >= 1 and t.n_repeat >= 5


def test_bench_counts_follow_the_budgets_and_caps():
    # a 5 ms call with a 50 ms budget: at most 10 timed calls, at least min_repeat
    slow = bench(lambda: time.sleep(0.005), warmup_ms=1, rep_ms=50, min_repeat=3, device="cpu")
    assert 3 <= slow.n_repeat <= 10
    # a nearly free call is capped rather than run a million times
    fast = bench(lambda: None, warmup_ms=1, rep_ms=1000, max_repeat=40, max_warmup=7, device="cpu")
    assert fast.n_repeat == 40 and fast.n_warmup <= 7


def test_bench_rotates_among_input_sets():
    counts = [0, 0, 0]

    def make(i):
        def f():
            counts[i] += 1
        return f

    t = bench([make(0), make(1), make(2)], warmup_ms=1, rep_ms=5, max_repeat=30, device="cpu")
    total = sum(counts)
    assert total >= t.n_repeat + t.n_warmup
    assert max(counts) - min(counts) <= 1  # round robin


def test_copy_bandwidth_on_cpu_reports_bytes_moved_over_time():
    bw = copy_bandwidth(nbytes=4 * 2**20, device="cpu", warmup_ms=1, rep_ms=10)
    assert bw["copy_bytes"] == 4 * 2**20 and bw["copy_gbs"] > 0
    assert bw["copy_gbs"] == pytest.approx(2 * bw["copy_bytes"] / (bw["copy_us"] * 1e-6) / 1e9)


def test_matmul_rate_on_cpu_counts_two_n_cubed_flops():
    mm = matmul_tflops(n=128, device="cpu", warmup_ms=1, rep_ms=10)
    assert mm["matmul_n"] == 128 and mm["matmul_dtype"] == "float32"
    assert mm["matmul_tflops"] == pytest.approx(2 * 128**3 / (mm["matmul_us"] * 1e-6) / 1e12)


def test_floor_and_spread_arithmetic():
    assert floor_us(3_000_000, 3000.0) == pytest.approx(1.0)  # 3 MB at 3 TB/s: 1 us
    assert spread_pct(100.0, 104.0) == pytest.approx(4.0)
    assert spread_pct(104.0, 100.0) == pytest.approx(4.0)
    assert l2_bytes("cpu") == 0


@pytest.mark.gpu
def test_bench_on_gpu_uses_events_and_defeats_l2():
    x = torch.randn(64 * 2**20 // 4, device="cuda")  # 64 MB
    y = torch.empty_like(x)
    flushed = bench(lambda: y.copy_(x))
    assert flushed.clock == "cuda-events" and flushed.l2 == "flush" and flushed.median_us > 0
    copies = [torch.randn_like(x) for _ in range(4)]
    rotated = bench([lambda c=c: y.copy_(c) for c in copies], set_bytes=x.numel() * 4)
    assert rotated.l2 == ("rotate:4" if 4 * x.numel() * 4 >= 3 * l2_bytes() else "flush")
    bw = copy_bandwidth()
    assert bw["copy_gbs"] > 0 and bw["copy_timing"]["clock"] == "cuda-events"
    assert bw["copy_timing"]["l2"] == "rotate:1"  # one 1 GiB set: far above L2 with no flush
    assert matmul_tflops(n=2048)["matmul_tflops"] > 0


@pytest.mark.gpu
def test_graph_bench_falls_back_to_eager_on_a_host_sync_and_later_graphs_still_work():
    x = torch.randn(64 * 2**20 // 4, device="cuda")
    copies = [torch.randn_like(x) for _ in range(4)]
    set_bytes = x.numel() * 4
    syncing = bench([lambda c=c: c.sum().item() for c in copies], set_bytes=set_bytes, graph=True)
    assert syncing.graph_fallback is not None and "synchronises" in syncing.graph_fallback
    assert syncing.clock == "cuda-events"
    y = torch.empty_like(x)
    ok = bench([lambda c=c: y.copy_(c) for c in copies], set_bytes=set_bytes, graph=True)
    if 4 * set_bytes >= 3 * l2_bytes():
        assert ok.clock.startswith("cuda-graph") and ok.graph_fallback is None
    torch.randn(8, device="cuda")  # the default generator is usable: no capture state was left behind
