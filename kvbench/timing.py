"""Time GPU work you can trust: warm-up and repeat counts from millisecond budgets, CUDA events around each call,
medians and quantiles, L2 defeated, and a copy bandwidth to put every time next to its floor.

The recipe follows triton's `do_bench` (python/triton/testing.py): run once, estimate the cost of one call, derive the
warm-up and repeat counts from time budgets (25 ms and 100 ms there), clear L2 before each timed call, time each call
with its own pair of CUDA events and summarise the per-call times by quantiles. Differences here:

- L2 is cleared by *reading* a buffer several times its size, not by zeroing one: zeroing leaves up to 50 MB of dirty
  lines in L2 (H100) whose write-back would then be billed to a small bandwidth-bound kernel. A reduction leaves clean
  lines that are simply dropped.
- Instead of flushing, a caller may hand over several closures over distinct copies of its inputs; calls rotate
  among them, which defeats L2 with no flush when their total size is well above L2.
- Repeat counts are capped, and a slow call is estimated once rather than five times.
- Without CUDA, the same loop times calls with time.perf_counter, so every suite runs (slowly, small) on the CPU.

    t = bench(lambda: attention(q, k, v))          # Timing(median_us=..., p20_us=..., ...)
    bw = copy_bandwidth()                          # {'copy_gbs': ..., ...}: the floor's denominator
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import torch

H100_L2_BYTES = 50 * 2**20  # used when torch cannot tell the L2 size
ROTATE_FACTOR = 3  # rotation defeats L2 once the rotated inputs total this many times its size


@dataclass(frozen=True)
class Timing:
    """Per-call times of one benchmarked callable, in microseconds."""

    median_us: float
    p20_us: float
    p80_us: float
    min_us: float
    mean_us: float
    n_warmup: int
    n_repeat: int
    clock: str  # "cuda-events" or "perf_counter"
    l2: str  # how L2 was defeated: "flush", "rotate:N" (N input sets >= 3x L2 in all), "none"
    graph_fallback: str | None = None  # why graph timing was asked for but the calls were timed eagerly

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _device_of(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    device = _device_of(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_bytes(device: torch.device | str | None = None) -> int:
    """The GPU's L2 size (0 on the CPU)."""
    device = _device_of(device)
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or H100_L2_BYTES)


class _Flusher:
    """Evicts L2 by reading a buffer 5x its size (at least 256 MB, as triton's do_bench uses)."""

    def __init__(self, device: torch.device):
        n = max(256 * 2**20, 5 * l2_bytes(device))
        self.buf = torch.empty(n // 4, dtype=torch.float32, device=device).fill_(1.0)

    def __call__(self) -> None:
        self.buf.sum()


_flushers: dict[torch.device, _Flusher] = {}


def _quantile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times_us: Sequence[float], n_warmup: int, clock: str, l2: str) -> Timing:
    xs = sorted(times_us)
    return Timing(median_us=statistics.median(xs), p20_us=_quantile(xs, 0.2), p80_us=_quantile(xs, 0.8),
                  min_us=xs[0], mean_us=statistics.fmean(xs), n_warmup=n_warmup, n_repeat=len(xs), clock=clock,
                  l2=l2)


class _RotatingCalls:
    """Calls fns in turn (call i runs fns[i % len(fns)]) and times n of them: CUDA events around each call (after an
    L2 flush when a flusher is given) on the GPU, time.perf_counter on the CPU."""

    def __init__(self, fns: list[Callable[[], Any]], device: torch.device, flusher):
        self.fns, self.device, self.flusher, self.calls = fns, device, flusher, 0

    def call(self) -> None:
        self.fns[self.calls % len(self.fns)]()
        self.calls += 1

    def timed(self, n: int) -> list[float]:
        """Per-call times of n calls, in microseconds."""
        if self.device.type != "cuda":
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                self.call()
                out.append((time.perf_counter() - t0) * 1e6)
            return out
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for s, e in zip(starts, ends):
            if self.flusher is not None:
                self.flusher()
            s.record()
            self.call()
            e.record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def bench(fns: Callable[[], Any] | Sequence[Callable[[], Any]], *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
          flush: bool | None = None, set_bytes: int | None = None, min_repeat: int = 5, max_repeat: int = 2000,
          max_warmup: int = 500, device: torch.device | str | None = None, graph: bool = False) -> Timing:
    """Time `fns`: one callable, or a list of equivalent callables over distinct input copies (calls rotate).

    Parameters
    ----------
    fns : callable or list of callables
        What to time; call i runs fns[i % len(fns)].
    warmup_ms, rep_ms : float, default 25 and 100
        Time budgets for warm-up and for the timed calls; the counts follow from the estimated cost of a call.
    flush : bool or None, default None
        Evict L2 before each timed call. None: flush unless the rotated copies defeat L2 on their own, i.e. unless
        set_bytes is given and len(fns) * set_bytes >= 3 x L2.
    set_bytes : int or None
        Device bytes one callable's inputs occupy (used only to decide whether rotation is enough).
    min_repeat, max_repeat, max_warmup : int
        Bounds on the counts (a median of fewer than 5 calls says little; a tiny kernel should not run 20k times).
    device : torch device, default: cuda when present
        Where the work runs: CUDA events there, time.perf_counter on the CPU.
    graph : bool, default False
        On CUDA, when the rotated copies defeat L2 without a flush: capture the calls (every callable, repeated to
        at least 8 calls) in one CUDA graph and time its replays, so back-to-back steps are measured as a serving
        engine runs them, without the CPU's launch gaps (clock "cuda-graph"). Otherwise ignored.
    """
    fns = list(fns) if isinstance(fns, (list, tuple)) else [fns]
    device = _device_of(device)
    cuda = device.type == "cuda"
    if cuda and flush is None:
        flush = not (set_bytes is not None and len(fns) * set_bytes >= ROTATE_FACTOR * l2_bytes(device))
    flush = bool(flush and cuda)
    if cuda and flush and device not in _flushers:
        _flushers[device] = _Flusher(device)
    flusher = _flushers[device] if flush else None
    # "rotate:N": N input sets, together >= 3x L2, with no flush; "none": L2 may hold inputs (or there is no GPU)
    rotated = cuda and set_bytes is not None and len(fns) * set_bytes >= ROTATE_FACTOR * l2_bytes(device)
    l2 = "flush" if flush else (f"rotate:{len(fns)}" if rotated else "none")
    fallback = None
    if graph and cuda and rotated and not flush:
        try:
            return _bench_graph(fns, device, l2, warmup_ms=warmup_ms, rep_ms=rep_ms, min_repeat=min_repeat,
                                max_repeat=max_repeat, max_warmup=max_warmup)
        except NotCapturable as e:  # timed eagerly below, and the Timing says why
            fallback = str(e)

    caller = _RotatingCalls(fns, device, flusher)
    call, timed = caller.call, caller.timed

    # first call: compilation, autotuning, allocator growth; never timed
    t0 = time.perf_counter()
    for f in fns:
        f()
    sync(device)
    first_ms = (time.perf_counter() - t0) * 1e3 / len(fns)
    # estimate the cost of one call; a slow call once is estimate enough
    estimate = timed(1 if first_ms > rep_ms / 5 else 5)
    est_ms = max(statistics.median(estimate) / 1e3, 1e-4)
    # a flush costs GPU time too; count it so the budget bounds the wall time
    per_call_ms = est_ms + (_flush_ms(device) if flusher is not None else 0.0)
    n_warmup = min(max_warmup, max(1, int(warmup_ms / per_call_ms)))
    n_repeat = min(max_repeat, max(min_repeat, int(rep_ms / per_call_ms)))
    for _ in range(n_warmup):
        call()
    times = timed(n_repeat)
    return replace(summarize(times, n_warmup, "cuda-events" if cuda else "perf_counter", l2), graph_fallback=fallback)


class NotCapturable(RuntimeError):
    """The calls cannot be captured in a CUDA graph (a host synchronisation, or the capture itself failed)."""


def _capture_blocker(fns: list[Callable[[], Any]]) -> str | None:
    """Run the calls once with CUDA's sync debug mode set to error: a call that synchronises with the host cannot be
    captured, and finding that here keeps a failed capture (which leaves the process's RNG and allocator in capture
    state, failing every later cell) from happening."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for f in fns:
            f()
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        return f"a call synchronises with the host ({str(e).splitlines()[0][:160]})"
    finally:
        torch.cuda.set_sync_debug_mode(before)
    return None


def _recover_from_failed_capture(device: torch.device) -> None:
    """After a capture that raised, capture one tiny graph that draws random numbers, so the default generator's
    capture bookkeeping is closed again, and wait for the device (a best effort; the error is reported either way)."""
    try:
        torch.cuda.synchronize(device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            torch.randn(8, device=device)
        torch.cuda.synchronize(device)
    except RuntimeError:
        pass


def _bench_graph(fns: list[Callable[[], Any]], device: torch.device, l2: str, **kw) -> Timing:
    """One CUDA graph calls every callable in turn (repeated to >= 8 calls); per-call times = replay times / calls."""
    reps = -(-8 // len(fns))
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside the capture: workspaces and handles get allocated here
        for f in fns:
            f()
    torch.cuda.current_stream(device).wait_stream(side)
    reason = _capture_blocker(fns)
    if reason is not None:
        raise NotCapturable(reason)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            for _ in range(reps):
                for f in fns:
                    f()
    except RuntimeError as e:
        _recover_from_failed_capture(device)
        raise NotCapturable(f"capture failed: {str(e).splitlines()[0][:160]}") from e
    calls = reps * len(fns)
    t = bench(g.replay, flush=False, device=device, **kw)
    return replace(t, median_us=t.median_us / calls, p20_us=t.p20_us / calls, p80_us=t.p80_us / calls,
                   min_us=t.min_us / calls, mean_us=t.mean_us / calls, clock=f"cuda-graph:{calls}", l2=l2)


_flush_cost: dict[torch.device, float] = {}


def _flush_ms(device: torch.device) -> float:
    if device not in _flush_cost:
        f = _flushers[device]
        f()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(3):
            f()
        e.record()
        torch.cuda.synchronize(device)
        _flush_cost[device] = s.elapsed_time(e) / 3
    return _flush_cost[device]


def copy_bandwidth(nbytes: int | None = None, device: torch.device | str | None = None, **bench_kw) -> dict[str, Any]:
    """Device-to-device copy bandwidth: bytes read + written over the median time of one large copy.

    This is the floor's denominator: a bandwidth-bound kernel cannot move its bytes faster than a plain copy. Measure
    it in the same run as the kernels it is the floor for (clocks, power state and neighbours change between runs).
    Default size: 1 GiB on the GPU (20x an H100's L2, so no flush is needed; less if memory is short), 64 MiB on the
    CPU.
    """
    device = _device_of(device)
    if nbytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = max(64 * 2**20, min(2**30, free // 4))
        else:
            nbytes = 64 * 2**20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), flush=False, set_bytes=2 * nbytes, device=device, **bench_kw)
    moved = 2 * nbytes
    return {"copy_gbs": moved / (t.median_us * 1e-6) / 1e9, "copy_bytes": nbytes, "copy_us": t.median_us,
            "copy_timing": t.as_dict()}


def matmul_tflops(n: int | None = None, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  **bench_kw) -> dict[str, Any]:
    """Dense matmul throughput, 2 n^3 flops over the median time of an n x n x n product: the compute-floor
    denominator for compute-bound work such as prefill attention, measured in the same run (clocks vary by run).
    Default: n = 8192 in bf16 on the GPU, n = 512 in fp32 on the CPU."""
    device = _device_of(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 512)
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    t = bench(lambda: a @ b, flush=False, device=device, **bench_kw)
    return {"matmul_tflops": 2 * n**3 / (t.median_us * 1e-6) / 1e12, "matmul_n": n,
            "matmul_dtype": str(dtype).removeprefix("torch."), "matmul_us": t.median_us}


def floor_us(nbytes: int, copy_gbs: float) -> float:
    """The fewest microseconds moving `nbytes` can take at the measured copy bandwidth."""
    return nbytes / (copy_gbs * 1e9) * 1e6


def spread_pct(a: float, b: float) -> float:
    """Relative difference of two medians of the same cell, in percent of the smaller."""
    return abs(a - b) / min(a, b) * 100.0
