"""memory: what each method holds, what the allocator and NVML saw, and the largest context and batch that fit.

Caches are built layer by layer at a real model's attention shape (default Llama-3.1-8B: 32 layers, 32 query heads,
8 KV heads, head_dim 128, bf16) from synthetic keys and values, each layer's prefill given only a short query tail,
so a 128K-token cache costs seconds, not a 128K-token prefill. Per cell, side by side:

- `nbytes`, `bytes_per_token`: what the method says it holds (LayerCache.nbytes, metadata included);
- `allocated_bytes`, `peak_bytes`: the CUDA caching allocator's view (memory_allocated delta once the inputs are
  freed; max_memory_allocated while building, one layer's synthetic inputs included);
- `nvml_used_bytes`, `nvml_delta_bytes`: NVML's view of the device (every process, CUDA context included).

Search cells find the largest context (at a batch) and the largest batch (at a context) whose build fits a memory
budget (default: the device's free memory): doubling until a build runs out of memory, then bisecting. A build is
out of budget when the allocator's live bytes plus the next layer's synthetic inputs, or its peak, pass the budget
(those inputs are real transient memory: a method holding a fixed window still needs one layer of full-length k/v
to be built from). On the CPU the allocator and NVML views are unavailable (the records say so), the budget (64 MiB
by default) is checked against the caches' nbytes plus the next layer's inputs.

The helpers above `run` (sizes, shapes, synthetic fill, search) are shared by the kernels and throughput suites.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import typer

from kvbench.api import KVBenchError, LayerCache, LayerSpec, Method
from kvbench.models import SHAPES, Shape, default_device, resolve_dtype
from kvbench.records import RecordWriter
from kvbench.registry import available_methods, parse_method
from kvbench.sweep import Cell, SweepResult, console, free_memory, run_sweep
from kvbench.telemetry import nvml_memory_used, unavailable_reason, with_telemetry, write_provenance

SUITE = "memory"
# Prefill queries handed to each layer with synthetic k/v. One query (the last position) takes dense attention's
# unmasked FlashAttention path; a longer tail needs a bottom-right causal mask, which SDPA's flash backend refuses, and
# its math fallback materialises GQA-repeated keys and fp32 scores: 68 GB at 128K x batch 64, far above the cache.
# Raise it (--q-tail 32) for methods whose prefill looks at a window of queries, e.g. SnapKV's observation window.
Q_TAIL = 1


# --------------------------------------------------------------------------------------------------------------------
# shared helpers


class OverBudget(torch.OutOfMemoryError):
    """A build that would exceed the memory budget: recorded exactly like a real out-of-memory."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")


def parse_size(text: str | int, what: str, *, unit: int = 1024) -> int:
    """'32K' -> 32768, '1M' -> 1048576, '4096' -> 4096 (token counts use 1024 as K, like 128K contexts)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise KVBenchError(f"{what}: '{text}' is not a size; use e.g. 4096, 32K, 1M")
    mult = {"": 1, "k": unit, "m": unit**2, "g": unit**3, "t": unit**4}[m.group(2).lower()]
    value = float(m.group(1)) * mult
    if value < 1 or not float(value).is_integer():
        raise KVBenchError(f"{what}: '{text}' must be a whole number >= 1")
    return int(value)


def parse_sizes(text: str | Sequence[int], what: str) -> list[int]:
    """'4K,32K,128K' or [4096, 32768] -> sorted unique ints."""
    if not isinstance(text, str):
        return sorted({parse_size(x, what) for x in text})
    items = [s for s in text.replace(" ", "").split(",") if s]
    if not items:
        raise KVBenchError(f"{what}: give at least one value, e.g. 4K,32K")
    return sorted({parse_size(s, what) for s in items})


def parse_bytes(text: str | int | None) -> int | None:
    """'40G', '512M', '8GiB' or a byte count; None stays None (use the free memory)."""
    if text is None or (isinstance(text, str) and text.lower() in ("", "free", "auto")):
        return None
    return parse_size(text, "--budget")


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return default_device()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KVBenchError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return dev


def resolve_shape(model: str, device: torch.device) -> tuple[str, Shape]:
    """A shape name for the records and its Shape: 'auto' (Llama-3.1-8B on the GPU, the embedded model's shape on the
    CPU), a SHAPES key with or without 'synthetic:', 'embedded', or a Hugging Face id (config only, no weights)."""
    key = model.removeprefix("synthetic:")
    if key == "auto":
        key = "llama-3.1-8b" if device.type == "cuda" else "smollm2-135m"
    if key == "embedded":
        key = "smollm2-135m"
    if key in SHAPES:
        return key, SHAPES[key]
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model).get_text_config()
    except Exception as e:  # noqa: BLE001 - not a shape we know and not a loadable config
        raise KVBenchError(f"unknown model shape '{model}'; valid: auto, embedded, {', '.join(SHAPES)}, or a Hugging "
                           f"Face id ({type(e).__name__})") from None
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return model, Shape(cfg.num_hidden_layers, heads, getattr(cfg, "num_key_value_heads", None) or heads, head_dim, {})


def resolve_methods(specs: Sequence[str]) -> list[Method]:
    """Parse every spec before any work starts ('all': every registered method with its defaults)."""
    out: list[Method] = []
    for spec in specs:
        if spec.strip() == "all":
            out.extend(cls() for cls in available_methods().values())
        else:
            out.append(parse_method(spec))
    seen, unique = set(), []
    for m in out:
        if m.label() not in seen:
            seen.add(m.label())
            unique.append(m)
    if not unique:
        raise KVBenchError("no methods given; use e.g. --methods full --methods selfindex:budget=0.1")
    return unique


def layer_specs(shape: Shape, dtype: torch.dtype, device: torch.device) -> list[LayerSpec]:
    return [LayerSpec(i, shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.head_dim, dtype, device)
            for i in range(shape.n_layers)]


def synthetic_kv(batch: int, n_kv: int, tokens: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random k, v [B, Hkv, T, D]. Keys get a fixed per-channel offset (a few channels large), as real post-RoPE keys
    have (KIVI, Liu et al. 2024, Fig. 2: key outliers sit in fixed channels), so quantizers and centring see
    realistic structure; values are plain standard normal (their outliers are per token and milder)."""
    # drawn in the target dtype: a float32 draw would double the transient memory of a 17 GB layer
    offset = torch.randn(1, n_kv, 1, head_dim, generator=gen, device=device, dtype=dtype) * 2.0
    k = torch.randn(batch, n_kv, tokens, head_dim, generator=gen, device=device, dtype=dtype).add_(offset)
    v = torch.randn(batch, n_kv, tokens, head_dim, generator=gen, device=device, dtype=dtype)
    return k, v


def input_bytes(spec: LayerSpec, batch: int, context: int, q_tail: int = Q_TAIL) -> int:
    """Bytes of one layer's synthetic prefill inputs (k, v and the query tail)."""
    es = torch.empty((), dtype=spec.dtype).element_size()
    return (2 * batch * spec.n_kv_heads * context + batch * spec.n_heads * min(q_tail, context)) * spec.head_dim * es


def fill_synthetic(caches: Sequence[LayerCache], specs: Sequence[LayerSpec], batch: int, context: int, *,
                   q_tail: int = Q_TAIL, seed: int = 0,
                   before_layer: Optional[Callable[[int, int], None]] = None) -> None:
    """Prefill each layer's cache with `context` synthetic tokens and the last `q_tail` queries: q [B, Hq, Tq, D],
    k/v [B, Hkv, T, D]. `before_layer(i, input_bytes)` may raise OverBudget to stop a build that will not fit."""
    for i, (cache, spec) in enumerate(zip(caches, specs)):
        if before_layer is not None:
            before_layer(i, input_bytes(spec, batch, context, q_tail))
        gen = torch.Generator(device=spec.device).manual_seed(seed * 1_000_003 + i)
        k, v = synthetic_kv(batch, spec.n_kv_heads, context, spec.head_dim, spec.dtype, spec.device, gen)
        q = torch.randn(batch, spec.n_heads, min(q_tail, context), spec.head_dim, generator=gen,
                        device=spec.device, dtype=spec.dtype)
        cache.prefill(q, k, v)
        del q, k, v


def search_max(fits: Callable[[int], tuple[bool, dict]], start: int, limit: int, step: int = 1, rel: float = 0.0
               ) -> tuple[int, list[dict]]:
    """Largest n in [start, limit], a multiple of `step`, with fits(n) true, assuming fitting is monotone: double from
    `start` until a probe fails or `limit` is reached, then bisect until the bracket is `step` wide (or, with rel > 0,
    rel * n wide: the true answer is then below n * (1 + rel), for fewer probes). Returns (n, probe trail); n is 0
    when even `start` does not fit. `fits(n)` returns (ok, facts about the probe)."""
    if start < 1 or step < 1 or limit < start:
        raise ValueError(f"search_max: need 1 <= start <= limit and step >= 1, got {start}, {limit}, {step}")
    trail: list[dict] = []

    def probe(n: int) -> bool:
        ok, facts = fits(n)
        trail.append({"n": n, "fits": bool(ok), **facts})
        return ok

    if not probe(start):
        return 0, trail
    lo, hi = start, None
    while lo < limit:
        n = min(2 * lo, limit)
        if probe(n):
            lo = n
        else:
            hi = n
            break
    if hi is None:
        return lo, trail
    while hi - lo > max(step, int(rel * lo)):
        mid = lo + max(step, (hi - lo) // 2 // step * step)
        if mid >= hi:
            break
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, trail


class Budget:
    """Checks a build against a memory budget: the allocator's live bytes on the GPU, the caches' own nbytes on the
    CPU (where no allocator can be asked), plus the next layer's inputs."""

    def __init__(self, device: torch.device, limit: int | None):
        self.device = device
        if limit is None:
            if device.type == "cuda":
                free_memory()
                limit = torch.cuda.mem_get_info(device)[0]
            else:
                limit = cpu_default_budget()
        self.limit = int(limit)
        self.base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    def held(self, caches: Sequence[LayerCache]) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) - self.base
        return sum(c.nbytes() for c in caches)

    def checker(self, caches: Sequence[LayerCache]) -> Callable[[int, int], None]:
        def check(i: int, need: int) -> None:
            held = self.held(caches[:i])
            if held + need > self.limit:
                raise OverBudget(f"building layer {i} needs {_gib(held + need)} > budget {_gib(self.limit)}")
        return check

    def check_peak(self) -> int | None:
        """The build's peak above the baseline (GPU); raise OverBudget past the limit."""
        if self.device.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(self.device) - self.base
        if peak > self.limit:
            raise OverBudget(f"peak {_gib(peak)} while building > budget {_gib(self.limit)}")
        return peak


CPU_BUDGET = 64 * 2**20  # CPU runs are small: 64 MiB of cache keeps a search to about a minute per method there


def cpu_default_budget() -> int:
    return CPU_BUDGET


def release(device: torch.device) -> None:
    """Hand freed GPU blocks back before the next measurement; on the CPU refcounting has already freed them (and a
    full garbage collection costs a fifth of a second)."""
    if device.type == "cuda":
        free_memory()


def _gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"


def write_run_provenance(out: Path, suite: str, options: dict[str, Any], **extra) -> None:
    path = write_provenance(out, suite, options, **extra)
    console.print(f"[dim]{suite}: records in {Path(out) / (suite + '.jsonl')}, provenance in {path}[/]")


# --------------------------------------------------------------------------------------------------------------------
# the memory suite


def build(method: Method, shape: Shape, batch: int, context: int, dtype: torch.dtype, device: torch.device,
          budget: Budget, *, q_tail: int = Q_TAIL, seed: int = 0) -> tuple[list[LayerCache], dict[str, Any]]:
    """Every layer's cache at (batch, context); raises OverBudget/OutOfMemoryError when it does not fit."""
    specs = layer_specs(shape, dtype, device)
    cuda = device.type == "cuda"
    if cuda:
        free_memory()
        torch.cuda.reset_peak_memory_stats(device)
        budget.base = torch.cuda.memory_allocated(device)
        reserved0 = torch.cuda.memory_reserved(device)
    nvml0 = nvml_memory_used(device) if cuda else None
    caches = [method.make_layer(s) for s in specs]
    fill_synthetic(caches, specs, batch, context, q_tail=q_tail, seed=seed, before_layer=budget.checker(caches))
    facts: dict[str, Any] = {}
    if cuda:
        torch.cuda.synchronize(device)
        peak = budget.check_peak()
        facts.update(allocated_bytes=torch.cuda.memory_allocated(device) - budget.base, peak_bytes=peak)
        torch.cuda.empty_cache()  # let NVML see only the blocks the caches still hold
        facts["reserved_bytes"] = torch.cuda.memory_reserved(device) - reserved0
        nvml1 = nvml_memory_used(device)
        facts.update(nvml_used_bytes=nvml1, nvml_delta_bytes=None if nvml0 is None or nvml1 is None else nvml1 - nvml0)
    return caches, facts


def hold_metrics(method: Method, shape: Shape, batch: int, context: int, dtype: torch.dtype, device: torch.device,
                 budget: Budget, q_tail: int, seed: int) -> dict[str, Any]:
    caches, facts = build(method, shape, batch, context, dtype, device, budget, q_tail=q_tail, seed=seed)
    nbytes = sum(c.nbytes() for c in caches)
    es = torch.empty((), dtype=dtype).element_size()
    dense = 2 * shape.n_layers * batch * context * shape.n_kv_heads * shape.head_dim * es
    m: dict[str, Any] = {
        "nbytes": nbytes, "bytes_per_token": nbytes / (batch * context), "dense_bytes": dense,
        "compression": dense / nbytes if nbytes else None, "seq_len": caches[0].seq_len(),
        "layer_nbytes_min": min(c.nbytes() for c in caches), "layer_nbytes_max": max(c.nbytes() for c in caches),
        "input_bytes_per_layer": input_bytes(layer_specs(shape, dtype, device)[0], batch, context, q_tail),
        "q_tail": min(q_tail, context), "budget_bytes": budget.limit,
        "allocated_bytes": None, "peak_bytes": None, "nvml_used_bytes": None, "nvml_delta_bytes": None,
    }
    m.update(facts)
    if device.type != "cuda":
        m["allocator"] = "unavailable on the CPU (no caching allocator to ask)"
    nvml_reason = unavailable_reason(device) if device.type == "cuda" else "no CUDA device (CPU run)"
    if nvml_reason:
        m["nvml"] = f"unavailable: {nvml_reason}"
    del caches
    release(device)
    return m


def search_metrics(method: Method, shape: Shape, task: str, fixed: int, dtype: torch.dtype, device: torch.device,
                   budget: Budget, limit: int, q_tail: int, seed: int, rel: float = 0.0) -> dict[str, Any]:
    """task 'max_context' (batch = fixed) or 'max_batch' (context = fixed)."""

    def fits(n: int) -> tuple[bool, dict]:
        batch, context = (fixed, n) if task == "max_context" else (n, fixed)
        try:
            caches, facts = build(method, shape, batch, context, dtype, device, budget, q_tail=q_tail, seed=seed)
            ok, facts = True, {"nbytes": sum(c.nbytes() for c in caches), "peak_bytes": facts.get("peak_bytes")}
            del caches
        except torch.OutOfMemoryError as e:  # OverBudget included: this size does not fit, the search goes on
            ok, facts = False, {"why": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        release(device)  # outside the except: its traceback would keep the half-built caches alive
        return ok, facts

    if task == "max_context":
        start = 1024 if device.type == "cuda" else 256
        best, trail = search_max(fits, start, max(start, limit), step=start, rel=rel)
    else:
        best, trail = search_max(fits, 1, max(1, limit), step=1, rel=rel)
    last_ok = next((p for p in reversed(trail) if p["fits"] and p["n"] == best), {})
    return {task: best, "budget_bytes": budget.limit, "search_limit": limit, "reached_limit": best >= limit,
            "nbytes_at_max": last_ok.get("nbytes"), "peak_bytes_at_max": last_ok.get("peak_bytes"),
            "probes": trail, "fill": "synthetic", "q_tail": q_tail,
            "resolution": f"within {rel:.1%} of the answer" if rel else "exact to one step"}


def run(methods: list[str], out: Path, *, model: str = "auto", quick: bool = False, contexts: str | None = None,
        batches: str | None = None, search: bool = True, search_batch: int = 1, search_context: str | None = None,
        max_context: str | None = None, max_batch: int | None = None, budget: str | int | None = None,
        device: str | None = None, dtype: str = "auto", q_tail: int = Q_TAIL, seed: int = 0, rerun: bool = False,
        show_progress: bool = True) -> SweepResult:
    """Run the memory suite; writes `out/memory.jsonl` (one record per cell) and `out/memory.provenance.json`."""
    ms = resolve_methods(methods)
    dev = resolve_device(device)
    shape_name, shape = resolve_shape(model, dev)
    dt = resolve_dtype(dtype, dev)
    gpu = dev.type == "cuda"
    ctxs = parse_sizes(contexts or (("32K" if quick else "4K,32K,128K") if gpu else ("256" if quick else "256,1K")),
                       "--contexts")
    bs = parse_sizes(batches or "1", "--batches")
    s_ctx = parse_size(search_context or ("32K" if gpu else "1K"), "--search-context")
    ctx_limit = parse_size(max_context or ("4M" if gpu else "16K"), "--max-context")
    batch_limit = max_batch or (4096 if gpu else 32)
    rel = 0.125 if quick else 0.0  # quick: stop bisecting at 1/8 of the answer (the record says so)
    budget_obj = Budget(dev, parse_bytes(budget))
    base = {"model": shape_name, "dtype": str(dt).removeprefix("torch."), "device": dev.type}
    cells: list[Cell] = []
    for m in ms:
        for c in ctxs:
            for b in bs:
                cells.append(Cell(m.label(), m.params(), {**base, "task": "hold", "context": c, "batch": b}, m))
        if search:
            budget_key = "free" if budget is None else budget_obj.limit
            cells.append(Cell(m.label(), m.params(), {**base, "task": "max_context", "batch": search_batch,
                                                       "budget": budget_key}, m))
            cells.append(Cell(m.label(), m.params(), {**base, "task": "max_batch", "context": s_ctx,
                                                       "budget": budget_key}, m))

    def runner(cell: Cell) -> dict:
        c = cell.cell
        if c["task"] == "hold":
            return hold_metrics(cell.context, shape, c["batch"], c["context"], dt, dev, budget_obj, q_tail, seed)
        fixed, limit = (c["batch"], ctx_limit) if c["task"] == "max_context" else (c["context"], batch_limit)
        return search_metrics(cell.context, shape, c["task"], fixed, dt, dev, budget_obj, limit, q_tail, seed, rel)

    out = Path(out)
    options = dict(model=shape_name, contexts=ctxs, batches=bs, search=search, search_batch=search_batch,
                   search_context=s_ctx, max_context=ctx_limit, max_batch=batch_limit, budget_bytes=budget_obj.limit,
                   device=str(dev), dtype=str(dt), q_tail=q_tail, seed=seed, quick=quick,
                   methods=[m.label() for m in ms])
    writer = RecordWriter(out / f"{SUITE}.jsonl")
    result = run_sweep(SUITE, cells, with_telemetry(runner), writer, description="memory", rerun=rerun,
                       show_progress=show_progress)
    write_run_provenance(out, SUITE, options)
    print_table(result.records)
    return result


def print_table(records: list[dict]) -> None:
    from rich.table import Table

    t = Table(title="memory", title_justify="left")
    for col in ("method", "task", "context", "batch", "status", "MiB held", "B/token", "x smaller", "peak MiB",
                "NVML MiB", "max"):
        t.add_column(col, justify="left" if col in ("method", "task", "status") else "right")
    for r in records:
        m, c = r["metrics"], r["cell"]
        mib = lambda x: "-" if x is None else f"{x / 2**20:,.1f}"  # noqa: E731
        found = m.get("max_context", m.get("max_batch"))
        t.add_row(r["method"], c["task"], str(c.get("context", "-")), str(c.get("batch", "-")), r["status"],
                  mib(m.get("nbytes")), "-" if m.get("bytes_per_token") is None else f"{m['bytes_per_token']:,.0f}",
                  "-" if m.get("compression") is None else f"{m['compression']:.2f}", mib(m.get("peak_bytes")),
                  mib(m.get("nvml_delta_bytes")), "-" if found is None else f"{found:,}")
    console.print(t)


def command(
    methods: list[str] = typer.Option(["all"], "--methods", "-m", help="Method specs, repeatable: full, "
                                      "selfindex:budget=0.1, ... ('all': every registered method)."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Folder for memory.jsonl and its provenance."),
    model: str = typer.Option("auto", help="Attention shape: auto (llama-3.1-8b on GPU, the embedded model's on "
                                           "CPU), embedded, a kvbench.models.SHAPES name, or a Hugging Face id."),
    quick: bool = typer.Option(False, help="A small grid (one context) and searches that stop within 1/8 of the "
                                           "answer, for a fast check."),
    contexts: Optional[str] = typer.Option(None, help="Contexts for the 'hold' cells, e.g. 4K,32K,128K "
                                                      "(default GPU: 4K,32K,128K; CPU: 256,1K)."),
    batches: Optional[str] = typer.Option(None, help="Batch sizes for the 'hold' cells, e.g. 1,8 (default 1)."),
    search: bool = typer.Option(True, help="Also find the largest context and the largest batch within the budget."),
    search_batch: int = typer.Option(1, min=1, help="Batch at which the largest context is searched."),
    search_context: Optional[str] = typer.Option(None, help="Context at which the largest batch is searched "
                                                            "(default GPU 32K, CPU 1K)."),
    max_context: Optional[str] = typer.Option(None, help="Upper end of the context search (default GPU 4M, CPU 16K)."),
    max_batch: Optional[int] = typer.Option(None, min=1, help="Upper end of the batch search (default GPU 4096, "
                                                              "CPU 32)."),
    budget: Optional[str] = typer.Option(None, help="Memory budget for a build, e.g. 40G (default: the device's "
                                                    "free memory; CPU: 64M)."),
    device: Optional[str] = typer.Option(None, help="cuda or cpu (default: cuda when present)."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32."),
    q_tail: int = typer.Option(Q_TAIL, min=1, help="Prefill queries per layer in a synthetic fill (the last "
                                                   "positions; 32 for window-based methods such as SnapKV)."),
    seed: int = typer.Option(0, help="Seed of the synthetic keys and values."),
    rerun: bool = typer.Option(False, help="Measure cells again even if out/memory.jsonl already has them."),
):
    """Memory per method and context (method's own count, allocator, NVML) and the largest context and batch that
    fit a memory budget."""
    result = run(methods, out, model=model, quick=quick, contexts=contexts, batches=batches, search=search,
                 search_batch=search_batch, search_context=search_context, max_context=max_context,
                 max_batch=max_batch, budget=budget, device=device, dtype=dtype, q_tail=q_tail, seed=seed,
                 rerun=rerun)
    console.print(f"memory: {result.summary()}")
