"""Timing one layer's cache, as the kernel suite (and benchmarks/) do: one decode step's attention and its stages over
copies that defeat L2, or extend() where a method has no decode_fns; and a prefill. Times come from kvbench.timing."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from kvbench.api import LayerCache, LayerSpec, Method
    from kvbench.models import Shape
    from kvbench.timing import Timing

# rotation copies at most (memory permitting): a 10% selfindex step at 32K x 1 reads ~7 MB, so 3x an H200's L2 needs ~20;
# at 8K x 1 it reads ~2 MB (~90 copies), a 160-token step ~1.3 MB (~140). With 64 such cells fell back to flushing
# before each call, which bench times eagerly (CUDA events around launches from Python), not as a graph: selfindex read
# 50 us at 8K x 1 that way against 29 us at 32K x 1 in a graph (H200, 4c64102)
MAX_COPIES = 512
EXTEND_MAX_CALLS = 100  # timing extend() grows the cache; keep the growth small next to the context


def layer_spec(shape: Shape, layer: int, dtype: torch.dtype, device: torch.device) -> LayerSpec:
    from kvbench.api import LayerSpec

    return LayerSpec(layer, shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.head_dim, dtype, device)


def bytes_per_step(cache: LayerCache) -> tuple[int, str]:
    """The bytes one decode step must move (decode_bytes(), else nbytes()) and which of the two it is."""
    b = cache.decode_bytes()
    return (int(b), "decode_bytes") if b is not None else (int(cache.nbytes()), "nbytes")


def build_copies(method: Method, spec: LayerSpec, batch: int, context: int, *, rotate: bool, q_tail: int,
                 seed: int) -> list[LayerCache]:
    """One prefilled cache, or (rotate) enough copies from the same inputs that cycling through them exceeds 3x L2."""
    import torch

    from kvbench.synthetic import synthetic_kv
    from kvbench.timing import l2_bytes

    gen = torch.Generator(device=spec.device).manual_seed(seed)
    k, v = synthetic_kv(batch, spec.n_kv_heads, context, spec.head_dim, spec.dtype, spec.device, gen)
    q = torch.randn(batch, spec.n_heads, min(q_tail, context), spec.head_dim, generator=gen, device=spec.device,
                    dtype=spec.dtype)
    first = method.make_layer(spec)
    first.prefill(q, k, v)
    copies = [first]
    if rotate and spec.device.type == "cuda":
        per_copy, _ = bytes_per_step(first)
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
    import torch

    from kvbench.timing import bench, spread_pct

    copies = build_copies(method, spec, batch, context, rotate=l2 == "rotate" or graph, q_tail=q_tail, seed=seed)
    step_bytes, bytes_from = bytes_per_step(copies[0])
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
        # a capture-safe layer is timed on its reserved one-token path, replayed from a graph like a decode step
        # (room for more calls than bench makes: a graph of fewer than 8 copies calls each one several times)
        safe = all(getattr(c, "capture_safe", False) for c in copies)
        for c in copies if safe else ():
            c.reserve(EXTEND_MAX_CALLS * 8)
        kw.update(max_repeat=EXTEND_MAX_CALLS // 2, max_warmup=EXTEND_MAX_CALLS // 4, min_repeat=3,
                  graph=graph and safe)
        t = bench(calls, **kw)
        m.update(timed="extend", stage_us={},
                 context_growth=sum(c.seq_len() for c in copies) // len(copies) - context)
    m.update(timing_metrics(t))
    m["info"] = copies[0].info()
    del fns, copies
    return m


def measure_prefill(method: Method, spec: LayerSpec, batch: int, context: int, *, l2: str, bench_kw: dict,
                    spread: bool, seed: int) -> dict[str, Any]:
    import torch

    from kvbench.synthetic import synthetic_kv
    from kvbench.timing import bench, spread_pct

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
    m.update(timing_metrics(t))
    holder.clear()
    return m


def timing_metrics(t: Timing) -> dict[str, Any]:
    return {"time_us": t.median_us, "p20_us": t.p20_us, "p80_us": t.p80_us, "min_us": t.min_us,
            "n_repeat": t.n_repeat, "n_warmup": t.n_warmup, "clock": t.clock, "l2": t.l2,
            "graph_fallback": t.graph_fallback}
