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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from kvbench.metrics import (ALLOCATED_BYTES, BYTES_PER_TOKEN, MAX_BATCH, MAX_CONTEXT, NBYTES, NVML_USED_BYTES,
                             PEAK_BYTES)
from kvbench.sizes import parse_bytes, parse_size, parse_sizes, search_max
from kvbench.suite import METHOD, STATUS, Column, Plan, Suite, SyntheticOptions, cell_value, metric, option
from kvbench.sweep import Cell

if TYPE_CHECKING:
    import torch

    from kvbench.api import LayerCache, Method
    from kvbench.models import Shape
    from kvbench.synthetic import Budget


@dataclass
class MemoryOptions(SyntheticOptions):
    contexts: list[int] = option("Contexts for the 'hold' cells, e.g. 4K,32K,128K.", parse=parse_sizes,
                                 cpu="256,1K", gpu="4K,32K,128K", quick_cpu="256", quick_gpu="32K")
    batches: list[int] = option("Batch sizes for the 'hold' cells, e.g. 1,8.", "1", parse=parse_sizes)
    search: bool = option("Also find the largest context and the largest batch within the budget.", True)
    search_batch: int = option("Batch at which the largest context is searched.", 1, min=1)
    search_context: int = option("Context at which the largest batch is searched.", parse=parse_size, cpu="1K",
                                 gpu="32K")
    max_context: int = option("Upper end of the context search.", parse=parse_size, cpu="16K", gpu="4M")
    max_batch: int = option("Upper end of the batch search.", cpu=32, gpu=4096, min=1)
    budget: Optional[int] = option("Memory budget for a build, e.g. 40G (default: the device's free memory; CPU: "
                                   "64M).", parse=parse_bytes)


def cells(plan: Plan) -> list[Cell]:
    """Per method: a 'hold' cell per context x batch, then (with search) the largest context and the largest batch."""
    from kvbench.models import resolve_dtype
    from kvbench.synthetic import resolve_shape

    o, dev = plan.options, plan.torch_device
    base = {"model": resolve_shape(plan.model, dev)[0], "dtype": str(resolve_dtype(o.dtype, dev)).removeprefix(
        "torch."), "device": dev.type}
    budget = "free" if o.budget is None else o.budget
    out: list[Cell] = []
    for m in plan.methods:
        out += [Cell.of(m, {**base, "task": "hold", "context": c, "batch": b}) for c in o.contexts for b in o.batches]
        if o.search:
            out.append(Cell.of(m, {**base, "task": "max_context", "batch": o.search_batch, "budget": budget}))
            out.append(Cell.of(m, {**base, "task": "max_batch", "context": o.search_context, "budget": budget}))
    return out


class Session:
    """What a memory run sets up once: the attention shape, the dtype and the budget every build is checked against."""

    def __init__(self, plan: Plan):
        from kvbench.models import resolve_dtype
        from kvbench.synthetic import Budget, resolve_shape

        self.plan, self.device = plan, plan.torch_device
        self.shape_name, self.shape = resolve_shape(plan.model, self.device)
        self.dtype = resolve_dtype(plan.options.dtype, self.device)
        self.budget = Budget(self.device, plan.options.budget)


def measure(s: Session, cell: Cell) -> dict[str, Any]:
    c, o = cell.cell, s.plan.options
    if c["task"] == "hold":
        return hold_metrics(cell.parsed, s.shape, c["batch"], c["context"], s.dtype, s.device, s.budget, o.q_tail,
                            o.seed)
    fixed, limit = (c["batch"], o.max_context) if c["task"] == "max_context" else (c["context"], o.max_batch)
    rel = 0.125 if s.plan.quick else 0.0  # quick: stop bisecting at 1/8 of the answer (the record says so)
    return search_metrics(cell.parsed, s.shape, c["task"], fixed, s.dtype, s.device, s.budget, limit, o.q_tail,
                          o.seed, rel)


def build(method: Method, shape: Shape, batch: int, context: int, dtype: torch.dtype, device: torch.device,
          budget: Budget, *, q_tail: int, seed: int) -> tuple[list[LayerCache], dict[str, Any]]:
    """Every layer's cache at (batch, context); raises OverBudget/OutOfMemoryError when it does not fit."""
    import torch

    from kvbench.device import free_memory
    from kvbench.synthetic import fill_synthetic, layer_specs
    from kvbench.telemetry import nvml_memory_used

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
    import torch

    from kvbench.device import release
    from kvbench.synthetic import input_bytes, layer_specs
    from kvbench.telemetry import unavailable_reason

    caches, facts = build(method, shape, batch, context, dtype, device, budget, q_tail=q_tail, seed=seed)
    nbytes = sum(c.nbytes() for c in caches)
    es = torch.empty((), dtype=dtype).element_size()
    dense = 2 * shape.n_layers * batch * context * shape.n_kv_heads * shape.head_dim * es
    m: dict[str, Any] = {
        NBYTES: nbytes, BYTES_PER_TOKEN: nbytes / (batch * context), "dense_bytes": dense,
        "compression": dense / nbytes if nbytes else None, "seq_len": caches[0].seq_len(),
        "layer_nbytes_min": min(c.nbytes() for c in caches), "layer_nbytes_max": max(c.nbytes() for c in caches),
        "input_bytes_per_layer": input_bytes(layer_specs(shape, dtype, device)[0], batch, context, q_tail),
        "q_tail": min(q_tail, context), "budget_bytes": budget.limit,
        ALLOCATED_BYTES: None, PEAK_BYTES: None, NVML_USED_BYTES: None, "nvml_delta_bytes": None,
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
    import torch

    from kvbench.device import release

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


MIB = 2**20

SUITE = Suite(
    name="memory",
    help="Memory per method and context (method's own count, allocator, NVML) and the largest context and batch that "
         "fit a memory budget.",
    options=MemoryOptions, cells=cells, setup=Session, measure=measure,
    provenance=lambda s: {"shape": s.shape_name, "budget_bytes": s.budget.limit},
    columns=(METHOD, Column("task", cell_value("task"), left=True), Column("context", cell_value("context")),
             Column("batch", cell_value("batch")), STATUS, Column("MiB held", metric(NBYTES, MIB), ",.1f"),
             Column("B/token", metric(BYTES_PER_TOKEN), ",.0f"), Column("x smaller", metric("compression"), ".2f"),
             Column("peak MiB", metric(PEAK_BYTES, MIB), ",.1f"),
             Column("NVML MiB", metric("nvml_delta_bytes", MIB), ",.1f"),
             Column("max", lambda r: r["metrics"].get(MAX_CONTEXT, r["metrics"].get(MAX_BATCH)), ",")),
    report=("memory",),
    model_help="Attention shape: auto (llama-3.1-8b on GPU, the embedded model's on CPU), embedded, a "
               "kvbench.models.SHAPES name, or a Hugging Face id.",
)
run = SUITE.run
