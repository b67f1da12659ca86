"""throughput: end-to-end decoding of a real transformers model through the bridge, per method, over batch x context.

Default model: `synthetic:llama-3.1-8b` (Llama-3.1-8B's architecture, random weights, bf16, on the GPU); on the CPU
the embedded SmolLM2-135M at small sizes. Per cell:

- `ttft_s`: time to first token, a real prefill through the model (and the first token's argmax), after a short
  warm-up prefill; at the cell's batch when the cell is filled by a real prefill, else at batch 1 (`ttft_batch`).
- `decode_tok_s`, `latency_ms`: real decode steps of the whole model, `model(next_ids, past_key_values=cache,
  position_ids=...)`, greedy, each step bracketed by a device sync and time.perf_counter, warm-up steps excluded.
  decode_tok_s = batch x timed steps / their total time; latency_ms is the median step.

Filling the cache (`cell.fill`): "prefill" runs the real prompt through the model; "synthetic" writes synthetic
keys/values into every layer's LayerCache directly (prefill with a short query tail, through the bridge's own
KVBenchCache layers), because prefilling batch x 32K tokens needs activation memory no GPU has. Decode is real either
way. "auto" (default) uses a real prefill up to --prefill-tokens batch x context tokens.

Search cells (`task: "max_batch"`) grow the batch at a context (doubling, then bisecting) until decoding runs out of
device memory, and record the throughput of every batch that fit: a method that holds less may fit a larger batch
than full, which is the point of compressing.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvbench.decoding import decode, decode_metrics, random_ids, real_prefill, synthetic_cache
from kvbench.metrics import BATCH, DECODE_TOK_S, LATENCY_MS, MAX_BATCH, TTFT_S
from kvbench.sizes import parse_size, parse_sizes, search_max
from kvbench.suite import METHOD, STATUS, Column, Plan, Suite, SyntheticOptions, cell_value, metric, option
from kvbench.sweep import Cell

if TYPE_CHECKING:
    import torch

    from kvbench.api import Method
    from kvbench.bridge import KVBenchCache

WARMUP_PROMPT = 128  # tokens of the warm-up prefill that precedes the first timed one (kernels load, JIT builds)
TTFT_BUDGET_S = 10.0  # repeat a TTFT measurement (up to 3 times) while it costs less than this


@dataclass
class ThroughputOptions(SyntheticOptions):
    contexts: list[int] = option("Contexts, e.g. 4K,32K.", parse=parse_sizes, cpu="256,1K", gpu="4K,32K",
                                 quick_cpu="256", quick_gpu="32K")
    batches: list[int] = option("Batch sizes, e.g. 1,8,32.", parse=parse_sizes, cpu="1,2", gpu="1,8,32",
                                quick_cpu="1", quick_gpu="1,8")
    fill: str = option("How the cache is filled before decoding: prefill (real prompt), synthetic (synthetic k/v per "
                       "layer), or auto (prefill up to --prefill-tokens).", "auto",
                       choices=("auto", "prefill", "synthetic"))
    prefill_tokens: int = option("auto fill: real prefill up to this batch x context.", parse=parse_size, cpu="2K",
                                 gpu="32K")
    steps: int = option("Timed decode steps per cell.", cpu=4, gpu=16, quick_cpu=2, min=1)
    warmup_steps: int = option("Untimed decode steps first.", cpu=1, gpu=3, min=0)
    search: bool = option("Also grow the batch until out of memory and record the best throughput.", True)
    search_context: int = option("Context of the batch search.", parse=parse_size, cpu="256", gpu="32K")
    max_batch: int = option("Upper end of the batch search.", cpu=4, gpu=1024, quick_cpu=2, min=1)
    graph: bool = option("Replay each decode step as one CUDA graph where the method is capture-safe (--no-graph: "
                         "eager steps).", True)


def model_name(plan: Plan) -> str:
    return ("synthetic:llama-3.1-8b" if plan.gpu else "embedded") if plan.model == "auto" else plan.model


def resolve_fill(fill: str, prefill_tokens: int, batch: int, context: int) -> str:
    if fill != "auto":
        return fill
    return "prefill" if batch * context <= prefill_tokens else "synthetic"


def cells(plan: Plan) -> list[Cell]:
    """Per method: a decode cell per context x batch, then (with search) the largest batch at the search context."""
    from kvbench.models import resolve_dtype

    o = plan.options
    dtype = plan.loaded[0].dtype if plan.loaded is not None else resolve_dtype(o.dtype, plan.torch_device)
    base = {"model": model_name(plan), "dtype": str(dtype).removeprefix("torch."), "device": plan.torch_device.type}
    base["decode"] = "graph" if o.graph else "eager"  # asked for; metrics.decode_mode says what ran
    out: list[Cell] = []
    for m in plan.methods:
        out += [Cell.of(m, {**base, "task": "decode", "context": c, "batch": b,
                            "fill": resolve_fill(o.fill, o.prefill_tokens, b, c)})
                for c in o.contexts for b in o.batches]
        if o.search:
            out.append(Cell.of(m, {**base, "task": "max_batch", "context": o.search_context, "fill": "synthetic"}))
    return out


def setup(plan: Plan) -> Runner:
    """Load the model (once per process) and hold it in a Runner."""
    from kvbench.models import load_model
    from kvbench.sweep import console

    o = plan.options
    if plan.loaded is not None:
        model = plan.loaded[0]
    else:
        with console.status(f"loading {model_name(plan)} ..."):
            model, _ = load_model(model_name(plan), device=plan.torch_device, dtype=o.dtype)
    return Runner(model, warmup_steps=o.warmup_steps, steps=o.steps, q_tail=o.q_tail, seed=o.seed,
                  search_limit=o.max_batch, graph=o.graph)


class Runner:
    """The throughput suite's session: the model, and what is measured once per process (warm-ups, batch-1 TTFTs)."""

    def __init__(self, model, *, warmup_steps: int, steps: int, q_tail: int, seed: int, search_limit: int,
                 graph: bool = True):
        import torch

        self.model = model
        self.warmup_steps, self.steps, self.q_tail, self.seed = warmup_steps, steps, q_tail, seed
        self.search_limit = search_limit
        self.graph, self.copy_gbs = graph, None  # kvbench.graph_decode: CUDA-graph steps unless --no-graph
        self.warm: set[str] = set()
        self.ttft: dict[tuple, dict] = {}
        self.device = model.device
        self.gen = torch.Generator(device=model.device).manual_seed(seed)

    def warm_up(self, method: Method) -> None:
        """A short real prefill and a few decode steps: kernels load and JIT builds happen here, untimed."""
        from kvbench.device import release

        if method.label() in self.warm:
            return
        cache, nxt, _ = real_prefill(self.model, method, random_ids(self.model, 1, WARMUP_PROMPT, self.gen))
        decode(self.model, cache, nxt, 0, 2)
        del cache, nxt
        release(self.device)
        self.warm.add(method.label())

    def measure_ttft(self, method: Method, batch: int, context: int) -> tuple[dict, KVBenchCache, torch.Tensor]:
        """Median of up to 3 real prefills (fewer when one is slow); returns the facts and the last run's cache."""
        from kvbench.device import release

        runs, cache, nxt = [], None, None
        while len(runs) < 3 and (not runs or sum(runs) + runs[-1] < TTFT_BUDGET_S):
            cache = nxt = None
            release(self.device)
            ids = random_ids(self.model, batch, context, self.gen)
            cache, nxt, dt = real_prefill(self.model, method, ids)
            runs.append(dt)
        return {"ttft_s": statistics.median(runs), "ttft_batch": batch, "ttft_runs": len(runs)}, cache, nxt

    def cell(self, cell: Cell) -> dict[str, Any]:
        import torch

        from kvbench.device import release

        c, method = cell.cell, cell.parsed
        if c["task"] == "max_batch":
            return self.search(method, c["context"])
        batch, context = c["batch"], c["context"]
        release(self.device)
        self.warm_up(method)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        m: dict[str, Any] = {"batch": batch}
        if c["fill"] == "prefill":
            facts, cache, nxt = self.measure_ttft(method, batch, context)
            m.update(facts)
        else:
            m.update(self.ttft_at_batch_1(method, context))
            cache = synthetic_cache(self.model, method, batch, context, q_tail=self.q_tail, seed=self.seed)
            nxt = random_ids(self.model, batch, 1, self.gen)
            m["q_tail"] = self.q_tail
        run = self.decode(cache, nxt, self.warmup_steps, self.steps)
        m.update(decode_metrics(run.times, batch), **run.facts)
        m["warmup_steps"] = self.warmup_steps
        m["cache_bytes"] = cache.nbytes()
        m["seq_len"] = cache.get_seq_length()
        caches = cache.layer_caches()
        m["info"] = caches[0].info() if caches else {}
        if self.device.type == "cuda":
            m["peak_bytes"] = torch.cuda.max_memory_allocated(self.device)  # weights included
        m["weights_bytes"] = sum(p.numel() * p.element_size() for p in self.model.parameters())
        del cache, nxt
        release(self.device)
        return m

    def decode(self, cache: KVBenchCache, nxt: torch.Tensor, warmup: int, steps: int, accounting: bool = True):
        """kvbench.graph_decode: one CUDA graph per step when the method is capture-safe, else the eager loop."""
        from kvbench.graph_decode import decode_run
        from kvbench.timing import copy_bandwidth

        if accounting and self.copy_gbs is None and self.device.type == "cuda":
            self.copy_gbs = copy_bandwidth(device=self.device)["copy_gbs"]  # the floors' denominator, this run
        return decode_run(self.model, cache, nxt, warmup, steps, graph=self.graph, eager=decode,
                          accounting=accounting, copy_gbs=self.copy_gbs)

    def ttft_at_batch_1(self, method: Method, context: int) -> dict[str, Any]:
        import torch

        from kvbench.device import release

        key = (method.label(), context)
        if key not in self.ttft:
            try:
                facts, cache, nxt = self.measure_ttft(method, 1, context)
                del cache, nxt
            except torch.OutOfMemoryError as e:
                facts = {"ttft_s": None, "ttft_batch": 1, "ttft_error": f"out of memory: {str(e).splitlines()[0]}"}
            release(self.device)
            self.ttft[key] = facts
        return dict(self.ttft[key])

    def search(self, method: Method, context: int) -> dict[str, Any]:
        import torch

        from kvbench.device import release

        self.warm_up(method)
        steps = max(2, self.steps // 4)

        def fits(batch: int) -> tuple[bool, dict]:
            release(self.device)
            facts: dict[str, Any] = {}
            try:
                cache = synthetic_cache(self.model, method, batch, context, q_tail=self.q_tail, seed=self.seed)
                run = self.decode(cache, random_ids(self.model, batch, 1, self.gen), 2, steps, accounting=False)
                facts = decode_metrics(run.times, batch)
                facts["decode_mode"] = run.facts["decode_mode"]
                facts["cache_bytes"] = cache.nbytes()
                del cache
                ok = True
            except torch.OutOfMemoryError as e:
                ok, facts = False, {"why": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            release(self.device)  # outside the except: its traceback would keep the half-built cache alive
            return ok, facts

        best_n, trail = search_max(fits, 1, self.search_limit)
        fitting = [p for p in trail if p["fits"]]
        best = max(fitting, key=lambda p: p["decode_tok_s"]) if fitting else {}
        # decode_tok_s, latency_ms and batch describe the same probe: the best one, usually at the largest batch
        return {"max_batch": best_n, "batch": best.get("n"), "best_decode_tok_s": best.get("decode_tok_s"),
                "best_batch": best.get("n"), "decode_tok_s": best.get("decode_tok_s"),
                "latency_ms": best.get("latency_ms"), "reached_limit": best_n >= self.search_limit,
                "search_limit": self.search_limit, "steps": steps, "warmup_steps": 2, "q_tail": self.q_tail,
                "probes": trail}


SUITE = Suite(
    name="throughput",
    help="End-to-end decode throughput, per-token latency and time to first token of a real model through each "
         "method's cache, and the largest batch (and best throughput) each method fits in device memory.",
    options=ThroughputOptions, cells=cells, setup=setup, measure=lambda runner, cell: runner.cell(cell),
    provenance=lambda runner: {"load_s": round(getattr(runner.model, "kvbench_load_s", 0.0), 2)},
    columns=(METHOD, Column("task", cell_value("task"), left=True), Column("ctx", cell_value("context")),
             Column("B", lambda r: r["metrics"].get(BATCH, r["cell"].get("batch"))),
             Column("fill", cell_value("fill"), left=True), STATUS, Column("TTFT s", metric(TTFT_S), ".3f"),
             Column("tok/s", metric(DECODE_TOK_S), ",.1f"), Column("ms/step", metric(LATENCY_MS), ".2f"),
             Column("cache GiB", metric("cache_bytes", 2**30), ".2f"), Column("max B", metric(MAX_BATCH), "d")),
    report=("throughput", "steps"),
    model="auto",
    model_help="auto (synthetic:llama-3.1-8b on GPU, embedded on CPU), embedded, synthetic:<arch>, a Hugging Face id "
               "or a local path.",
)
run = SUITE.run
