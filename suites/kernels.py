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

import math
from pathlib import Path
from typing import Any, Optional

import torch
import typer

from kvbench.api import KVBenchError, LayerCache, LayerSpec, Method
from kvbench.models import Shape, resolve_dtype
from kvbench.records import RecordWriter
from kvbench.registry import parse_method
from kvbench.sweep import Cell, SweepResult, console, run_sweep
from kvbench.suites.memory import (Q_TAIL, parse_size, parse_sizes, release, resolve_device, resolve_methods,
                                   resolve_shape, synthetic_kv, write_run_provenance)
from kvbench.telemetry import with_telemetry
from kvbench.timing import Timing, bench, copy_bandwidth, floor_us, l2_bytes, matmul_tflops, spread_pct

SUITE = "kernels"
MAX_COPIES = 16  # rotation copies at most; small cells need ~10 at 4K x batch 1 to exceed 3x an H100's L2
EXTEND_MAX_CALLS = 100  # timing extend() grows the cache; keep the growth small next to the context


def _spec(shape: Shape, layer: int, dtype: torch.dtype, device: torch.device) -> LayerSpec:
    return LayerSpec(layer, shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.head_dim, dtype, device)


def _step_bytes(cache: LayerCache) -> tuple[int, str]:
    b = cache.decode_bytes()
    return (int(b), "decode_bytes") if b is not None else (int(cache.nbytes()), "nbytes")


def build_copies(method: Method, spec: LayerSpec, batch: int, context: int, *, rotate: bool, q_tail: int,
                 seed: int) -> list[LayerCache]:
    """One prefilled cache, or (rotate) enough copies from the same inputs that cycling through them exceeds 3x L2."""
    gen = torch.Generator(device=spec.device).manual_seed(seed)
    k, v = synthetic_kv(batch, spec.n_kv_heads, context, spec.head_dim, spec.dtype, spec.device, gen)
    q = torch.randn(batch, spec.n_heads, min(q_tail, context), spec.head_dim, generator=gen, device=spec.device,
                    dtype=spec.dtype)
    first = method.make_layer(spec)
    first.prefill(q, k, v)
    copies = [first]
    if rotate and spec.device.type == "cuda":
        per_copy, _ = _step_bytes(first)
        want = min(MAX_COPIES, max(1, math.ceil(3 * l2_bytes(spec.device) / max(per_copy, 1))))
        for _ in range(want - 1):
            free, _ = torch.cuda.mem_get_info(spec.device)
            if free < 2 * first.nbytes() + 2**30:  # keep room for the timed calls themselves
                break
            c = method.make_layer(spec)
            c.prefill(q, k, v)
            copies.append(c)
    del q, k, v
    return copies


def measure_decode(method: Method, spec: LayerSpec, batch: int, context: int, *, l2: str, bench_kw: dict,
                   spread: bool, q_tail: int, seed: int, graph: bool = False) -> dict[str, Any]:
    copies = build_copies(method, spec, batch, context, rotate=l2 == "rotate" or graph, q_tail=q_tail, seed=seed)
    step_bytes, bytes_from = _step_bytes(copies[0])
    m: dict[str, Any] = {"decode_bytes": step_bytes, "bytes_from": bytes_from, "nbytes": copies[0].nbytes(),
                         "seq_len": copies[0].seq_len(), "copies": len(copies)}
    gen = torch.Generator(device=spec.device).manual_seed(seed + 1)
    q = torch.randn(batch, spec.n_heads, 1, spec.head_dim, generator=gen, device=spec.device, dtype=spec.dtype)
    fns = [c.decode_fns(q) for c in copies]
    # rotate: no flush when the copies exceed 3x L2 together; bench flushes anyway if memory allowed too few copies
    kw = dict(bench_kw, flush=True if l2 == "flush" and not graph else None, set_bytes=step_bytes, graph=graph)
    if "attention" in fns[0]:
        t = bench([f["attention"] for f in fns], **kw)
        m["timed"] = "decode_fns"
        m["stage_us"] = {key: bench([f[key] for f in fns], **kw).median_us for key in fns[0] if key != "attention"}
        if spread:
            again = bench([f["attention"] for f in fns], **kw)
            m.update(time_us_repeat=again.median_us, spread_pct=spread_pct(t.median_us, again.median_us))
    else:
        k1, v1 = (torch.randn(batch, spec.n_kv_heads, 1, spec.head_dim, generator=gen, device=spec.device,
                              dtype=spec.dtype) for _ in range(2))
        calls = [lambda c=c: c.extend(q, k1, v1) for c in copies]
        kw.update(max_repeat=EXTEND_MAX_CALLS // 2, max_warmup=EXTEND_MAX_CALLS // 4, min_repeat=3, graph=False)
        t = bench(calls, **kw)
        m.update(timed="extend", stage_us={},
                 context_growth=sum(c.seq_len() for c in copies) // len(copies) - context)
    m.update(_timing_metrics(t))
    m["info"] = copies[0].info()
    del fns, copies
    return m


def measure_prefill(method: Method, spec: LayerSpec, batch: int, context: int, *, l2: str, bench_kw: dict,
                    spread: bool, seed: int) -> dict[str, Any]:
    gen = torch.Generator(device=spec.device).manual_seed(seed)
    k, v = synthetic_kv(batch, spec.n_kv_heads, context, spec.head_dim, spec.dtype, spec.device, gen)
    q = torch.randn(batch, spec.n_heads, context, spec.head_dim, generator=gen, device=spec.device, dtype=spec.dtype)
    holder: list[LayerCache] = []

    def once():
        holder.clear()  # the previous call's cache is freed before the next is built
        c = method.make_layer(spec)
        c.prefill(q, k, v)
        holder.append(c)

    cuda = spec.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(spec.device)
        base = torch.cuda.memory_allocated(spec.device)
    es = q.element_size()
    kw = dict(bench_kw, flush=True if l2 == "flush" else None, set_bytes=(q.numel() + k.numel() + v.numel()) * es)
    t = bench(once, **kw)
    m: dict[str, Any] = {"timed": "prefill", "stage_us": {}, "nbytes": holder[0].nbytes(),
                         "seq_len": holder[0].seq_len(), "info": holder[0].info(),
                         # causal attention: QK^T and PV, 2 flops per multiply-add, half the T x T pairs
                         "prefill_flops": 2 * batch * spec.n_heads * context * context * spec.head_dim,
                         # read q, k, v; write the output and whatever the cache keeps
                         "prefill_bytes": (2 * q.numel() + k.numel() + v.numel()) * es + holder[0].nbytes()}
    if cuda:
        m["peak_bytes"] = torch.cuda.max_memory_allocated(spec.device) - base
    if spread:
        again = bench(once, **kw)
        m.update(time_us_repeat=again.median_us, spread_pct=spread_pct(t.median_us, again.median_us))
    m.update(_timing_metrics(t))
    holder.clear()
    return m


def _timing_metrics(t: Timing) -> dict[str, Any]:
    return {"time_us": t.median_us, "p20_us": t.p20_us, "p80_us": t.p80_us, "min_us": t.min_us,
            "n_repeat": t.n_repeat, "n_warmup": t.n_warmup, "clock": t.clock, "l2": t.l2}


def run(methods: list[str], out: Path, *, model: str = "auto", quick: bool = False, contexts: str | None = None,
        batches: str | None = None, mode: str = "decode", prefill_batches: str | None = None,
        prefill_max_tokens: str | None = None, l2: str = "flush", warmup_ms: float | None = None,
        rep_ms: float | None = None, spread: bool = False, layer: int | None = None, device: str | None = None,
        dtype: str = "auto", q_tail: int = Q_TAIL, seed: int = 0, rerun: bool = False,
        show_progress: bool = True, graph: bool = True) -> SweepResult:
    """Run the kernel suite; writes `out/kernels.jsonl` and `out/kernels.provenance.json`, prints a table."""
    if mode not in ("decode", "prefill", "both"):
        raise KVBenchError(f"--mode '{mode}' is invalid; valid: decode, prefill, both")
    if l2 not in ("flush", "rotate"):
        raise KVBenchError(f"--l2 '{l2}' is invalid; valid: flush (evict L2 before each call), rotate (cycle copies)")
    ms = resolve_methods(methods)
    dev = resolve_device(device)
    shape_name, shape = resolve_shape(model, dev)
    dt = resolve_dtype(dtype, dev)
    gpu = dev.type == "cuda"
    ctxs = parse_sizes(contexts or (("4K,32K" if quick else "4K,8K,16K,32K,64K,128K") if gpu else
                                    ("256" if quick else "256,1K")), "--contexts")
    bs = parse_sizes(batches or (("1,8" if quick else "1,2,4,8,16,32,64") if gpu else ("1" if quick else "1,2")),
                     "--batches")
    pbs = parse_sizes(prefill_batches or "1", "--prefill-batches")
    p_max = parse_size(prefill_max_tokens or ("128K" if gpu else "1K"), "--prefill-max-tokens")
    layer_idx = shape.n_layers // 2 if layer is None else layer
    if not 0 <= layer_idx < shape.n_layers:
        raise KVBenchError(f"--layer {layer} is invalid; valid: 0..{shape.n_layers - 1} for {shape_name}")
    bench_kw = dict(warmup_ms=warmup_ms if warmup_ms is not None else (25.0 if gpu else 5.0),
                    rep_ms=rep_ms if rep_ms is not None else (100.0 if gpu else 30.0), device=dev)
    full = parse_method("full")
    ordered = sorted(ms, key=lambda m: m.label() != full.label())  # full first: its time is every cell's reference
    spec = _spec(shape, layer_idx, dt, dev)

    base = {"model": shape_name, "dtype": str(dt).removeprefix("torch."), "device": dev.type, "layer": layer_idx,
            "timing": "cuda-graph" if graph and gpu else "eager"}
    cells: list[Cell] = []
    modes = ["decode", "prefill"] if mode == "both" else [mode]
    for md in modes:
        for c in ctxs:
            for b in (bs if md == "decode" else [b for b in pbs if b * c <= p_max]):
                for m in ordered:
                    cells.append(Cell(m.label(), m.params(), {**base, "mode": md, "context": c, "batch": b}, m))
    if "prefill" in modes and not any(c.cell["mode"] == "prefill" for c in cells):
        console.print(f"[yellow]kernels: no prefill cell has batch x context <= {p_max}; raise --prefill-max-tokens")

    console.print("[dim]kernels: measuring copy bandwidth ...[/]")
    bw = copy_bandwidth(device=dev, warmup_ms=bench_kw["warmup_ms"], rep_ms=bench_kw["rep_ms"])
    copy_gbs = bw["copy_gbs"]
    console.print(f"[dim]kernels: copy bandwidth {copy_gbs:,.0f} GB/s ({bw['copy_bytes'] / 2**20:.0f} MiB copies)[/]")
    mm = {}
    if "prefill" in modes:
        mm = matmul_tflops(device=dev, warmup_ms=bench_kw["warmup_ms"], rep_ms=bench_kw["rep_ms"])
        console.print(f"[dim]kernels: matmul {mm['matmul_tflops']:.3g} TFLOP/s ({mm['matmul_dtype']}, "
                      f"n={mm['matmul_n']})[/]")
    reference: dict[tuple, float | None] = {}  # (mode, context, batch) -> full's median in this run

    def measure(method: Method, md: str, c: int, b: int) -> dict[str, Any]:
        if md == "decode":
            return measure_decode(method, spec, b, c, l2=l2, bench_kw=bench_kw, spread=spread, q_tail=q_tail,
                                  seed=seed, graph=graph and gpu)
        return measure_prefill(method, spec, b, c, l2=l2, bench_kw=bench_kw, spread=spread, seed=seed)

    def runner(cell: Cell) -> dict:
        method: Method = cell.context
        md, c, b = cell.cell["mode"], cell.cell["context"], cell.cell["batch"]
        key = (md, c, b)
        is_ref = method.label() == full.label()
        if not is_ref and key not in reference:  # full's own cell was not run in this run: measure it now
            try:
                reference[key] = measure(full, md, c, b)["time_us"]
            except torch.OutOfMemoryError:
                reference[key] = None
            release(dev)
        release(dev)
        try:
            m = measure(method, md, c, b)
        except torch.OutOfMemoryError:
            if is_ref:
                reference[key] = None  # the others' cells need not try full again
            raise
        release(dev)
        if is_ref:
            reference[key] = m["time_us"]
        ref = reference.get(key)
        m["full_time_us"] = ref
        m["speedup_vs_full"] = ref / m["time_us"] if ref else None
        if md == "prefill":
            m["overhead_pct"] = (m["time_us"] / ref - 1) * 100 if ref else None
            # compute-bound: the floor is the larger of its flops at the measured matmul rate and its bytes at the
            # measured copy bandwidth
            compute = m["prefill_flops"] / (mm["matmul_tflops"] * 1e12) * 1e6
            memory = floor_us(m["prefill_bytes"], copy_gbs)
            m.update(floor_compute_us=compute, floor_memory_us=memory, floor_us=max(compute, memory),
                     floor_kind="compute" if compute >= memory else "memory",
                     tflops=m["prefill_flops"] / (m["time_us"] * 1e-6) / 1e12, matmul_tflops=mm["matmul_tflops"])
            m["floor_fraction"] = m["floor_us"] / m["time_us"]
        else:
            m["floor_us"] = floor_us(m["decode_bytes"], copy_gbs)
            m["bandwidth_gbs"] = m["decode_bytes"] / (m["time_us"] * 1e-6) / 1e9
            m["floor_fraction"] = m["floor_us"] / m["time_us"]
        m["copy_gbs"] = copy_gbs
        return m

    out = Path(out)
    writer = RecordWriter(out / f"{SUITE}.jsonl")
    options = dict(model=shape_name, contexts=ctxs, batches=bs, mode=mode, prefill_batches=pbs,
                   prefill_max_tokens=p_max, l2=l2, spread=spread, layer=layer_idx, device=str(dev), dtype=str(dt),
                   q_tail=q_tail, seed=seed, quick=quick, methods=[m.label() for m in ordered], graph=graph and gpu,
                   warmup_ms=bench_kw["warmup_ms"], rep_ms=bench_kw["rep_ms"])
    # sample NVML every 100 ms here (50 ms elsewhere): the sampler thread must not disturb the timed launches
    result = run_sweep(SUITE, cells, with_telemetry(runner, interval_s=0.1), writer, description="kernels", rerun=rerun,
                       show_progress=show_progress)
    write_run_provenance(out, SUITE, options, copy_bandwidth={k: v for k, v in bw.items() if k != "copy_timing"},
                         matmul=mm or None)
    print_table(result.records)
    return result


def print_table(records: list[dict]) -> None:
    from rich.table import Table

    t = Table(title="kernels (medians, us)", title_justify="left")
    cols = ("method", "mode", "ctx", "B", "time_us", "floor_us", "GB/s", "vs full", "spread%")
    for col in cols:
        t.add_column(col, justify="left" if col in ("method", "mode") else "right")
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for r in records:
        m, c = r["metrics"], r["cell"]
        if r["status"] != "ok":
            t.add_row(r["method"], c["mode"], _k(c["context"]), str(c["batch"]), r["status"], "", "", "", "")
            continue
        t.add_row(r["method"], c["mode"], _k(c["context"]), str(c["batch"]), fmt(m.get("time_us"), ",.1f"),
                  fmt(m.get("floor_us"), ",.1f"), fmt(m.get("bandwidth_gbs"), ",.0f"),
                  fmt(m.get("speedup_vs_full"), ".2f") + ("x" if m.get("speedup_vs_full") else ""),
                  fmt(m.get("spread_pct"), ".1f"))
    console.print(t)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def command(
    methods: list[str] = typer.Option(["all"], "--methods", "-m", help="Method specs, repeatable: full, "
                                      "selfindex:budget=0.1, ... ('all': every registered method). full is always "
                                      "measured: it is the reference."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Folder for kernels.jsonl and its provenance."),
    model: str = typer.Option("auto", help="Attention shape: auto (llama-3.1-8b on GPU, the embedded model's on "
                                           "CPU), embedded, a kvbench.models.SHAPES name, or a Hugging Face id."),
    quick: bool = typer.Option(False, help="A small grid (GPU: 4K,32K x 1,8) for a fast check."),
    contexts: Optional[str] = typer.Option(None, help="Contexts, e.g. 4K,32K,128K (default GPU 4K..128K in "
                                                      "powers of 2; CPU 256,1K)."),
    batches: Optional[str] = typer.Option(None, help="Decode batch sizes, e.g. 1,8 (default GPU 1..64 in powers "
                                                     "of 2; CPU 1,2)."),
    mode: str = typer.Option("decode", help="decode (one step's attention), prefill (full-length queries, "
                                            "against full's prefill), or both."),
    prefill_batches: Optional[str] = typer.Option(None, help="Batch sizes of the prefill cells (default 1)."),
    prefill_max_tokens: Optional[str] = typer.Option(None, help="Skip prefill cells above this batch x context "
                                                                "(default GPU 128K, CPU 1K)."),
    l2: str = typer.Option("flush", help="How L2 is kept from holding the inputs: flush (read 256 MB before each "
                                         "call) or rotate (cycle through copies of the cache, > 3x L2 in all)."),
    warmup_ms: Optional[float] = typer.Option(None, help="Warm-up budget per timing (default GPU 25, CPU 5)."),
    rep_ms: Optional[float] = typer.Option(None, help="Timed-calls budget per timing (default GPU 100, CPU 30)."),
    spread: bool = typer.Option(False, help="Time every cell's attention twice and record the spread of the two "
                                            "medians (measurement quality; target < 5%)."),
    layer: Optional[int] = typer.Option(None, help="Layer index the caches are built for (default: the middle)."),
    device: Optional[str] = typer.Option(None, help="cuda or cpu (default: cuda when present)."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32."),
    q_tail: int = typer.Option(Q_TAIL, min=1, help="Prefill queries per layer in a synthetic fill (the last "
                                                   "positions; 32 for window-based methods such as SnapKV)."),
    seed: int = typer.Option(0, help="Seed of the synthetic tensors."),
    rerun: bool = typer.Option(False, help="Measure cells again even if out/kernels.jsonl already has them."),
    graph: bool = typer.Option(True, help="GPU decode: time back-to-back steps captured in a CUDA graph (over "
                                          "cache copies that defeat L2), as serving engines run decode; --no-graph "
                                          "times single eager calls, CPU launch gaps included."),
):
    """Decode-attention (and prefill) time per method over contexts x batches, each next to its bandwidth floor and
    full's time on the same cell."""
    result = run(methods, out, model=model, quick=quick, contexts=contexts, batches=batches, mode=mode,
                 prefill_batches=prefill_batches, prefill_max_tokens=prefill_max_tokens, l2=l2, warmup_ms=warmup_ms,
                 rep_ms=rep_ms, spread=spread, layer=layer, device=device, dtype=dtype, q_tail=q_tail, seed=seed,
                 rerun=rerun, graph=graph)
    console.print(f"kernels: {result.summary()}")
