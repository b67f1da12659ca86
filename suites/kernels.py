"""kernels: one layer's decode attention (and prefill) per method, timed against its bandwidth floor and against full.

Synthetic tensors at a real model's attention shape (default Llama-3.1-8B: 32 query heads, 8 KV heads, head_dim 128,
bf16), one layer (a middle one: some methods keep their first layers dense), contexts 4K..128K x batch 1..64:

- decode: each method's LayerCache is prefilled with synthetic keys/values and a short query tail, then
  `decode_fns(q)['attention']` is timed (one decode step's attention, nothing appended), and every other key of
  decode_fns as `stage_us[key]`. A method without decode_fns has extend() timed instead (`timed: "extend"`; the
  context then grows by one token per call, which the record states).
- prefill: `make_layer(spec).prefill(q, k, v)` with full-length queries, against full's prefill at the same shape:
  the index-building or compression overhead (`overhead_pct`). Its floor is compute: causal attention's flops at the
  dense matmul rate measured in the same run (or its bytes at the copy bandwidth, if that is larger).

Times are medians of CUDA-event timed calls after warm-up (kvbench.timing.bench), with L2 evicted before each call or
defeated by rotating among copies of the cache (`--l2 rotate`). Every time sits next to its floor: `floor_us` =
decode_bytes() (else nbytes()) / the device-to-device copy bandwidth measured at the start of the same run;
`bandwidth_gbs` is what the method achieved; `speedup_vs_full` divides full's time on the same cell in the same run
by the method's. `--spread` measures every cell's attention twice and records how far the two medians differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from kvbench.cache_timing import layer_spec, measure_decode, measure_prefill
from kvbench.errors import KVBenchError
from kvbench.metrics import BANDWIDTH_GBS, FLOOR_US, SPEEDUP_VS_FULL, TIME_US
from kvbench.sizes import parse_size, parse_sizes
from kvbench.suite import METHOD, Column, Plan, Suite, SyntheticOptions, cell_value, metric, option
from kvbench.sweep import Cell, console

if TYPE_CHECKING:
    from kvbench.api import Method
    from kvbench.models import Shape

FULL = "full"  # the reference every cell's time is divided by


@dataclass
class KernelOptions(SyntheticOptions):
    contexts: list[int] = option("Contexts, e.g. 4K,32K,128K.", parse=parse_sizes, cpu="256,1K",
                                 gpu="4K,8K,16K,32K,64K,128K", quick_cpu="256", quick_gpu="4K,32K")
    batches: list[int] = option("Decode batch sizes, e.g. 1,8.", parse=parse_sizes, cpu="1,2", gpu="1,2,4,8,16,32,64",
                                quick_cpu="1", quick_gpu="1,8")
    mode: str = option("decode (one step's attention), prefill (full-length queries, against full's prefill), or "
                       "both.", "decode", choices=("decode", "prefill", "both"))
    prefill_batches: list[int] = option("Batch sizes of the prefill cells.", "1", parse=parse_sizes)
    prefill_max_tokens: int = option("Skip prefill cells above this batch x context.", parse=parse_size, cpu="1K",
                                     gpu="128K")
    l2: str = option("How L2 is kept from holding the inputs: flush (read 256 MB before each call) or rotate (cycle "
                     "through copies of the cache, > 3x L2 in all).", "flush", choices=("flush", "rotate"))
    warmup_ms: float = option("Warm-up budget per timing.", cpu=5.0, gpu=25.0, min=0)
    rep_ms: float = option("Timed-calls budget per timing.", cpu=30.0, gpu=100.0, min=0)
    spread: bool = option("Time every cell's attention twice and record the spread of the two medians (measurement "
                          "quality; target < 5%).", False)
    layer: Optional[int] = option("Layer index the caches are built for (default: the middle).", min=0)
    graph: bool = option("GPU decode: time back-to-back steps captured in a CUDA graph (over cache copies that defeat "
                         "L2), as serving engines run decode; --no-graph times single eager calls, CPU launch gaps "
                         "included.", True)


def cells(plan: Plan) -> list[Cell]:
    """Mode-major, then context, batch, and method with full first (its time is every cell's reference)."""
    from kvbench.models import resolve_dtype
    from kvbench.synthetic import resolve_shape

    o, dev = plan.options, plan.torch_device
    shape_name, shape = resolve_shape(plan.model, dev)
    base = {"model": shape_name, "dtype": str(resolve_dtype(o.dtype, dev)).removeprefix("torch."), "device": dev.type,
            "layer": layer_index(o.layer, shape_name, shape),
            "timing": "cuda-graph" if o.graph and plan.gpu else "eager"}
    ordered = sorted(plan.methods, key=lambda m: m.label() != FULL)
    out: list[Cell] = []
    for md in modes(o.mode):
        for c in o.contexts:
            batches = o.batches if md == "decode" else [b for b in o.prefill_batches if b * c <= o.prefill_max_tokens]
            out += [Cell.of(m, {**base, "mode": md, "context": c, "batch": b}) for b in batches for m in ordered]
    if "prefill" in modes(o.mode) and not any(c.cell["mode"] == "prefill" for c in out):
        console.print(f"[yellow]kernels: no prefill cell has batch x context <= {o.prefill_max_tokens}; raise "
                      "--prefill-max-tokens")
    return out


def modes(mode: str) -> list[str]:
    return ["decode", "prefill"] if mode == "both" else [mode]


def layer_index(layer: int | None, shape_name: str, shape: Shape) -> int:
    idx = shape.n_layers // 2 if layer is None else layer
    if not 0 <= idx < shape.n_layers:
        raise KVBenchError(f"--layer {layer} is invalid; valid: 0..{shape.n_layers - 1} for {shape_name}")
    return idx


class Session:
    """What a kernels run measures once: the copy bandwidth (every decode floor), the matmul rate (prefill floors),
    and full's time per (mode, context, batch), the reference of every other method's cell."""

    def __init__(self, plan: Plan):
        from kvbench.models import resolve_dtype
        from kvbench.synthetic import resolve_shape
        from kvbench.timing import copy_bandwidth, matmul_tflops

        o, dev = plan.options, plan.torch_device
        self.plan, self.device = plan, dev
        shape_name, shape = resolve_shape(plan.model, dev)
        self.spec = layer_spec(shape, layer_index(o.layer, shape_name, shape), resolve_dtype(o.dtype, dev), dev)
        self.bench_kw = dict(warmup_ms=o.warmup_ms, rep_ms=o.rep_ms, device=dev)
        console.print("[dim]kernels: measuring copy bandwidth ...[/]")
        self.bandwidth = copy_bandwidth(device=dev, warmup_ms=o.warmup_ms, rep_ms=o.rep_ms)
        self.copy_gbs = self.bandwidth["copy_gbs"]
        console.print(f"[dim]kernels: copy bandwidth {self.copy_gbs:,.0f} GB/s "
                      f"({self.bandwidth['copy_bytes'] / 2**20:.0f} MiB copies)[/]")
        self.matmul: dict[str, Any] = {}
        if "prefill" in modes(o.mode):
            self.matmul = matmul_tflops(device=dev, warmup_ms=o.warmup_ms, rep_ms=o.rep_ms)
            console.print(f"[dim]kernels: matmul {self.matmul['matmul_tflops']:.3g} TFLOP/s "
                          f"({self.matmul['matmul_dtype']}, n={self.matmul['matmul_n']})[/]")
        self.reference: dict[tuple, float | None] = {}  # (mode, context, batch) -> full's median in this process

    def time(self, method: Method, mode: str, context: int, batch: int) -> dict[str, Any]:
        o = self.plan.options
        if mode == "decode":
            return measure_decode(method, self.spec, batch, context, l2=o.l2, bench_kw=self.bench_kw, spread=o.spread,
                                  q_tail=o.q_tail, seed=o.seed, graph=o.graph and self.plan.gpu)
        return measure_prefill(method, self.spec, batch, context, l2=o.l2, bench_kw=self.bench_kw, spread=o.spread,
                               seed=o.seed)

    def full_time(self, key: tuple) -> float | None:
        """full's time on this cell: from its own cell when this process ran it, else measured now."""
        import torch

        from kvbench.device import release
        from kvbench.registry import parse_method

        if key not in self.reference:
            try:
                self.reference[key] = self.time(parse_method(FULL), *key)[TIME_US]
            except torch.OutOfMemoryError:
                self.reference[key] = None
            release(self.device)
        return self.reference[key]


def measure(s: Session, cell: Cell) -> dict[str, Any]:
    """One cell's time, its floor and its speed-up over full on the same cell."""
    import torch

    from kvbench.device import release

    method, key = cell.parsed, (cell.cell["mode"], cell.cell["context"], cell.cell["batch"])
    is_ref = method.label() == FULL
    if not is_ref:
        s.full_time(key)
    release(s.device)
    try:
        m = s.time(method, *key)
    except torch.OutOfMemoryError:
        if is_ref:
            s.reference[key] = None  # the others' cells need not try full again
        raise
    release(s.device)
    if is_ref:
        s.reference[key] = m[TIME_US]
    ref = s.reference.get(key)
    m["full_time_us"] = ref
    m[SPEEDUP_VS_FULL] = ref / m[TIME_US] if ref else None
    m.update(prefill_floor(m, ref, s) if key[0] == "prefill" else decode_floor(m, s))
    m["copy_gbs"] = s.copy_gbs
    return m


def decode_floor(m: dict, s: Session) -> dict[str, Any]:
    from kvbench.timing import floor_us

    floor = floor_us(m["decode_bytes"], s.copy_gbs)
    return {FLOOR_US: floor, BANDWIDTH_GBS: m["decode_bytes"] / (m[TIME_US] * 1e-6) / 1e9,
            "floor_fraction": floor / m[TIME_US]}


def prefill_floor(m: dict, ref: float | None, s: Session) -> dict[str, Any]:
    """Prefill is compute-bound: its floor is the larger of its flops at the measured matmul rate and its bytes at the
    measured copy bandwidth."""
    from kvbench.timing import floor_us

    rate = s.matmul["matmul_tflops"]
    compute = m["prefill_flops"] / (rate * 1e12) * 1e6
    memory = floor_us(m["prefill_bytes"], s.copy_gbs)
    floor = max(compute, memory)
    return {"overhead_pct": (m[TIME_US] / ref - 1) * 100 if ref else None, "floor_compute_us": compute,
            "floor_memory_us": memory, FLOOR_US: floor, "floor_kind": "compute" if compute >= memory else "memory",
            "tflops": m["prefill_flops"] / (m[TIME_US] * 1e-6) / 1e12, "matmul_tflops": rate,
            "floor_fraction": floor / m[TIME_US]}


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


SUITE = Suite(
    name="kernels",
    help="Decode-attention (and prefill) time per method over contexts x batches, each next to its bandwidth floor "
         "and full's time on the same cell. full is always measured: it is the reference.",
    options=KernelOptions, cells=cells, setup=Session, measure=measure,
    # NVML every 100 ms here (50 ms elsewhere): the sampler thread must not disturb the timed launches
    telemetry_s=0.1,
    provenance=lambda s: {"copy_bandwidth": {k: v for k, v in s.bandwidth.items() if k != "copy_timing"},
                          "matmul": s.matmul or None},
    columns=(METHOD, Column("mode", cell_value("mode"), left=True), Column("ctx", lambda r: _k(r["cell"]["context"])),
             Column("B", cell_value("batch")),
             Column("time_us", lambda r: r["metrics"].get(TIME_US) if r["status"] == "ok" else r["status"], ",.1f"),
             Column("floor_us", metric(FLOOR_US), ",.1f"), Column("GB/s", metric(BANDWIDTH_GBS), ",.0f"),
             Column("vs full", metric(SPEEDUP_VS_FULL), ".2f"), Column("spread%", metric("spread_pct"), ".1f")),
    report=("kernels", "prefill"),
    model_help="Attention shape: auto (llama-3.1-8b on GPU, the embedded model's on CPU), embedded, a "
               "kvbench.models.SHAPES name, or a Hugging Face id.",
)
run = SUITE.run
