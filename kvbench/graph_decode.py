"""Decode steps that measure the method, not the Python loop: the whole model's one-token step (every layer, the LM
head, the greedy argmax) captured once as a CUDA graph and replayed, gpt-fast style, with static input buffers.

    run = decode_run(model, cache, next_ids, warmup=3, steps=16)   # graph when the cache is capture-safe
    run.times, run.tokens, run.facts                               # facts: decode_mode, why not graph, kernel, ...

Only transformers' public API is used: the model's forward is called with the bridge's Cache and static
`input_ids` / `position_ids` (and `cache_position` where the forward takes it) that the graph itself moves on after
each step, so a replay needs no host work. A cache is captured only when every layer's LayerCache declares itself
capture-safe (kvbench.api: `capture_safe`, `reserve`, `advance`); others decode eagerly and the facts say why (a
layer's `capture_unsafe_reason`, where it gives one).

Step accounting (`step_facts`): the GPU's kernel time in one step (torch.profiler, union of kernel intervals) and the
step's floor, the bytes it must read (weights the step reads, plus what each layer's attention reads: decode_bytes)
over the copy bandwidth measured in the same run, with both as ratios of the measured step time.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kvbench.api import ReservedRoomError
from kvbench.bridge import KVBenchCache, with_cache
from kvbench.timing import copy_bandwidth, sync


def unsafe_reason(cache: KVBenchCache, device: torch.device) -> str | None:
    """Why this cache cannot be graph-captured here, or None when it can."""
    caches = cache.layer_caches()
    if not caches:
        return "the cache holds no layers yet (prefill first)"
    bad = {type(c).__name__: getattr(c, "capture_unsafe_reason", None) for c in caches
           if not getattr(c, "capture_safe", False)}
    if bad:
        why = "; ".join(sorted({w for w in bad.values() if w})) or \
            "its one-token extend may sync with the host, allocate or change shapes"
        return f"method '{cache.method.label()}' is not capture-safe: {', '.join(sorted(bad))}: {why}"
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return None


@dataclass
class DecodeRun:
    times: list[float]  # seconds of each timed step
    tokens: torch.Tensor | None  # [B, steps] greedy tokens of every step run (warm-ups included), when recorded
    facts: dict[str, Any] = field(default_factory=dict)


class StepGraph:
    """One greedy step of the whole model over static buffers; `step()` runs it eagerly, `capture()` records it into
    a CUDA graph and `replay()` runs that. Each step writes its token into `tokens[:, i]` and moves the inputs on."""

    def __init__(self, model, cache: KVBenchCache, next_ids: torch.Tensor, max_steps: int):
        B, dev = next_ids.shape[0], next_ids.device
        pos = cache.get_seq_length()
        self.model, self.cache = model, cache
        self.ids = next_ids.clone()  # [B, 1]
        self.position_ids = torch.full((B, 1), pos, dtype=torch.long, device=dev)
        self.kwargs = dict(**with_cache(model, cache), use_cache=True, logits_to_keep=1)
        if "cache_position" in inspect.signature(model.forward).parameters:  # transformers < 5.2x
            self.cache_position = torch.full((1,), pos, dtype=torch.long, device=dev)
            self.kwargs["cache_position"] = self.cache_position
        self.tokens = torch.zeros(B, max_steps, dtype=torch.long, device=dev)
        self.i = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.n_run = 0

    def step(self) -> None:
        out = self.model(input_ids=self.ids, position_ids=self.position_ids, **self.kwargs)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        self.tokens.index_copy_(1, self.i, nxt)
        self.ids.copy_(nxt)
        self.position_ids.add_(1)
        self.i.add_(1)
        if "cache_position" in self.kwargs:
            self.cache_position.add_(1)
        if not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing():
            self.n_run += 1

    def capture(self, warmup: int) -> None:
        """`warmup` eager steps on a side stream (kernels compile, workspaces allocate), then the capture."""
        side = torch.cuda.Stream(self.ids.device)
        side.wait_stream(torch.cuda.current_stream(self.ids.device))
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                self.step()
        torch.cuda.current_stream(self.ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the telemetry thread's NVML reads may go on while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.step()
        self.graph = graph

    def replay(self) -> None:
        if self.n_run >= self.tokens.shape[1]:
            raise ReservedRoomError("the captured step", self.n_run, 1, self.tokens.shape[1])
        self.cache.advance(1)  # checks every layer's reserved room on the host before the replay writes
        self.graph.replay()
        self.n_run += 1


def _eager_times(step: Callable[[], None], device, warmup: int, steps: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def graph_decode(model, cache: KVBenchCache, next_ids: torch.Tensor, warmup: int, steps: int, *,
                 graph: bool = True, extra: int = 1) -> tuple[DecodeRun, StepGraph]:
    """The capture-safe path: reserve room, then `warmup` untimed steps (graph=True: eager ones, a capture, and one
    replay, since a graph's first launch also uploads it; at least 2), then `steps` timed steps; `extra` steps stay
    reserved for accounting (one profiled step)."""
    n_eager = max(1, warmup - 1) if graph else warmup
    total = n_eager + (1 if graph else 0) + steps + extra
    with torch.inference_mode():
        cache.reserve(total)
        sg = StepGraph(model, cache, next_ids, total)
        facts = {"decode_mode": "graph" if graph else "eager"}
        if graph:
            try:
                sg.capture(n_eager)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # nothing ran on the device, host counters untouched: the same steps, eagerly
                facts = {"decode_mode": "eager", "graph_fallback": f"capture failed: {type(e).__name__}: "
                                                                  f"{str(e).splitlines()[0][:200]}"}
        step = sg.replay if sg.graph is not None else sg.step
        times = _eager_times(step, model.device, 1 if sg.graph is not None else (0 if graph else n_eager), steps)
    return DecodeRun(times, sg.tokens[:, : sg.n_run], facts), sg


def decode_run(model, cache: KVBenchCache, next_ids: torch.Tensor, warmup: int, steps: int, *, graph: bool = True,
               eager: Callable | None = None, accounting: bool = True,
               copy_gbs: float | None = None) -> DecodeRun:
    """Graph-captured decode when asked for and the cache allows it, else `eager(model, cache, next_ids, warmup,
    steps) -> times` (the suite's own loop); with `accounting`, the step facts on CUDA (one more step, profiled)."""
    reason = unsafe_reason(cache, model.device) if graph else "--no-graph"
    if reason is None:
        run, sg = graph_decode(model, cache, next_ids, warmup, steps)
        one = sg.replay if sg.graph is not None else sg.step
    else:
        times = eager(model, cache, next_ids, warmup, steps)
        run = DecodeRun(times, None, {"decode_mode": "eager", "graph_fallback": reason})
        one = _eager_step(model, cache, next_ids)
    caches = cache.layer_caches()
    run.facts["decode_kernel"] = caches[0].info().get("backend") if caches else None
    if accounting and model.device.type == "cuda":
        run.facts.update(step_facts(model, cache, one, statistics.median(run.times), copy_gbs))
    return run


def generate_greedy(model, cache: KVBenchCache, ids: torch.Tensor, max_new: int, stop: set[int] = frozenset(),
                    graph: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """Greedy generation for `kvbench generate`, batch 1. On a CUDA device with graph=True: the prompt prefilled,
    then the one-token steps replayed from a CUDA graph when the cache is capture-safe (they run to max_new, then
    the tokens are cut after the first stop token: a graph cannot stop early), else the same steps eagerly. On the
    CPU or with graph=False: transformers' own generate. Returns the new tokens [1, n] and facts (decode_mode, the
    reason when eager, seconds)."""
    sync(model.device)
    t0 = time.perf_counter()
    if not graph or model.device.type != "cuda":
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **with_cache(model, cache),
                             max_new_tokens=max_new, do_sample=False)
        return out[:, ids.shape[1]:], {"decode_mode": "eager", "graph_fallback": "--no-graph" if not graph else
                                       "CUDA graphs need a CUDA device", "seconds": time.perf_counter() - t0}
    out = model(input_ids=ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].argmax(-1, keepdim=True)
    steps, reason = max_new - 1, unsafe_reason(cache, model.device)
    facts: dict[str, Any] = {"decode_mode": "graph" if reason is None else "eager", "graph_fallback": reason}
    if steps > 0 and reason is None:
        cache.reserve(steps)
        sg = StepGraph(model, cache, first, steps)
        sg.capture(1)  # one eager step (the second token), then the capture
        while sg.n_run < steps:
            sg.replay()
        new = torch.cat([first, sg.tokens[:, : sg.n_run]], 1)
    else:
        toks = [first]
        while len(toks) <= steps and int(toks[-1]) not in stop:
            pos = torch.full((1, 1), cache.get_seq_length(), dtype=torch.long, device=model.device)
            out = model(input_ids=toks[-1], position_ids=pos, **with_cache(model, cache), use_cache=True,
                        logits_to_keep=1)
            toks.append(out.logits[:, -1].argmax(-1, keepdim=True))
        new = torch.cat(toks, 1)
    sync(model.device)
    facts["seconds"] = time.perf_counter() - t0
    row = new[0].tolist()
    cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
    return new[:, :cut], facts


def _eager_step(model, cache: KVBenchCache, next_ids: torch.Tensor) -> Callable[[], None]:
    """One more plain eager step (for the profiler), continuing the cache's positions."""
    def step():
        pos = torch.full((next_ids.shape[0], 1), cache.get_seq_length(), dtype=torch.long, device=model.device)
        model(input_ids=next_ids, **with_cache(model, cache), position_ids=pos, use_cache=True, logits_to_keep=1)
    return step


# --- step accounting -------------------------------------------------------------------------------------------

def weight_read_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter, less the input embedding table when it is not also
    the LM head (a step reads only B of its rows)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and (head is None or emb.weight.data_ptr() != head.weight.data_ptr()):
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def attention_read_bytes(cache: KVBenchCache) -> int:
    """What every layer's decode attention must read (decode_bytes, or the bytes it holds)."""
    return sum(c.decode_bytes() or c.nbytes() for c in cache.layer_caches())


def kernel_busy_ms(step: Callable[[], None], device: torch.device) -> dict[str, Any]:
    """Run `step` once under torch.profiler: the union of its kernels' intervals (busy), first start to last end
    (span) and the kernel count."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    if not spans:
        return {"gpu_busy_ms": None, "gpu_busy_error": "the profiler recorded no kernels"}
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:80], []).append(e.time_range.end - e.time_range.start)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:8]
    busy, (cur_s, cur_e) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy, cur_s = busy + cur_e - cur_s, s
        cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return {"gpu_busy_ms": busy / 1e3, "gpu_span_ms": (spans[-1][1] - spans[0][0]) / 1e3, "kernels": len(spans),
            "top_kernels": [{"name": n, "ms": sum(ts) / 1e3, "calls": len(ts)} for n, ts in top]}


def step_facts(model, cache: KVBenchCache, one_step: Callable[[], None], step_s: float,
               copy_gbs: float | None = None) -> dict[str, Any]:
    """gpu_busy_ms and floor_ms of one step, each also as a ratio of the measured (median) step time."""
    weights, attn = weight_read_bytes(model), attention_read_bytes(cache)
    gbs = copy_gbs or copy_bandwidth(device=model.device)["copy_gbs"]
    floor_ms = (weights + attn) / (gbs * 1e9) * 1e3
    step_ms = step_s * 1e3
    f = {"floor_ms": floor_ms, "floor_weight_bytes": weights, "floor_attention_bytes": attn, "copy_gbs": gbs,
         "step_over_floor": step_ms / floor_ms}
    try:
        f.update(kernel_busy_ms(one_step, model.device))
    except Exception as e:  # a profiler that cannot start (no CUPTI) must not lose the cell's numbers
        f.update(gpu_busy_ms=None, gpu_busy_error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    if f.get("gpu_busy_ms") is not None:
        f["busy_over_step"] = f["gpu_busy_ms"] / step_ms
    return f
