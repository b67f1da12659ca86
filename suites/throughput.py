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
import time
from pathlib import Path
from typing import Any, Optional

import torch
import typer

from kvbench.api import KVBenchError, Method
from kvbench.bridge import KVBenchCache, attach
from kvbench.graph_decode import decode_run
from kvbench.models import load_model, model_shape
from kvbench.records import RecordWriter
from kvbench.sweep import Cell, SweepResult, console, run_sweep
from kvbench.suites.memory import (Q_TAIL, fill_synthetic, layer_specs, parse_size, parse_sizes, release,
                                   resolve_device, resolve_methods, search_max, write_run_provenance)
from kvbench.telemetry import with_telemetry
from kvbench.timing import copy_bandwidth, sync

SUITE = "throughput"
WARMUP_PROMPT = 128  # tokens of the warm-up prefill that precedes the first timed one (kernels load, JIT builds)
TTFT_BUDGET_S = 10.0  # repeat a TTFT measurement (up to 3 times) while it costs less than this


def random_ids(model, batch: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, (batch, tokens), generator=gen, device=gen.device).to(model.device)


def real_prefill(model, method: Method, ids: torch.Tensor) -> tuple[KVBenchCache, torch.Tensor, float]:
    """Prompt ids [B, T] through the model; returns (cache, next token ids [B, 1], seconds to the first token)."""
    cache = attach(model, method)
    sync(model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(model.device)
    return cache, nxt, time.perf_counter() - t0


def synthetic_cache(model, method: Method, batch: int, context: int, *, q_tail: int, seed: int) -> KVBenchCache:
    """A KVBenchCache whose every layer holds `context` synthetic tokens, built layer by layer (no activations)."""
    shape = model_shape(model)
    cache = attach(model, method)
    dummy = torch.empty(batch, shape.n_kv_heads, 1, shape.head_dim, dtype=model.dtype, device=model.device)
    for layer in cache.layers:  # makes each layer's LayerCache exactly as the first update() would
        layer.lazy_initialization(dummy, dummy)
    specs = layer_specs(shape, model.dtype, model.device)
    with torch.inference_mode():
        fill_synthetic([layer.cache for layer in cache.layers], specs, batch, context, q_tail=q_tail, seed=seed)
    return cache


def decode(model, cache: KVBenchCache, next_ids: torch.Tensor, warmup: int, steps: int) -> list[float]:
    """Greedy decode steps of the whole model; returns the seconds of each timed step (warm-up steps excluded)."""
    pos = cache.get_seq_length()
    times = []
    with torch.inference_mode():
        for i in range(warmup + steps):
            position_ids = torch.full((next_ids.shape[0], 1), pos, dtype=torch.long, device=model.device)
            sync(model.device)
            t0 = time.perf_counter()
            out = model(input_ids=next_ids, past_key_values=cache, position_ids=position_ids, use_cache=True,
                        logits_to_keep=1)
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            sync(model.device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            pos += 1
    return times


def decode_metrics(times: list[float], batch: int) -> dict[str, Any]:
    return {"decode_tok_s": batch * len(times) / sum(times), "latency_ms": statistics.median(times) * 1e3,
            "latency_p90_ms": sorted(times)[int(0.9 * (len(times) - 1))] * 1e3, "steps": len(times)}


class Runner:
    """Holds the model and what is measured once per run (warm-ups, batch-1 TTFTs)."""

    def __init__(self, model, *, fill: str, prefill_tokens: int, warmup_steps: int, steps: int, q_tail: int,
                 seed: int, search_limit: int, graph: bool = True):
        self.model, self.fill, self.prefill_tokens = model, fill, prefill_tokens
        self.warmup_steps, self.steps, self.q_tail, self.seed = warmup_steps, steps, q_tail, seed
        self.search_limit = search_limit
        self.graph, self.copy_gbs = graph, None  # graph_decode: CUDA-graph steps unless --no-graph
        self.warm: set[str] = set()
        self.ttft: dict[tuple, dict] = {}
        self.device = model.device
        self.gen = torch.Generator(device=model.device).manual_seed(seed)

    def resolve_fill(self, batch: int, context: int) -> str:
        if self.fill != "auto":
            return self.fill
        return "prefill" if batch * context <= self.prefill_tokens else "synthetic"

    def warm_up(self, method: Method) -> None:
        """A short real prefill and a few decode steps: kernels load and JIT builds happen here, untimed."""
        if method.label() in self.warm:
            return
        cache, nxt, _ = real_prefill(self.model, method, random_ids(self.model, 1, WARMUP_PROMPT, self.gen))
        decode(self.model, cache, nxt, 0, 2)
        del cache, nxt
        release(self.device)
        self.warm.add(method.label())

    def measure_ttft(self, method: Method, batch: int, context: int) -> tuple[dict, KVBenchCache, torch.Tensor]:
        """Median of up to 3 real prefills (fewer when one is slow); returns the facts and the last run's cache."""
        runs, cache, nxt = [], None, None
        while len(runs) < 3 and (not runs or sum(runs) + runs[-1] < TTFT_BUDGET_S):
            cache = nxt = None
            release(self.device)
            ids = random_ids(self.model, batch, context, self.gen)
            cache, nxt, dt = real_prefill(self.model, method, ids)
            runs.append(dt)
        return {"ttft_s": statistics.median(runs), "ttft_batch": batch, "ttft_runs": len(runs)}, cache, nxt

    def cell(self, cell: Cell) -> dict[str, Any]:
        c, method = cell.cell, cell.context
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
        if accounting and self.copy_gbs is None and self.device.type == "cuda":
            self.copy_gbs = copy_bandwidth(device=self.device)["copy_gbs"]  # the floors' denominator, this run
        return decode_run(self.model, cache, nxt, warmup, steps, graph=self.graph, eager=decode,
                          accounting=accounting, copy_gbs=self.copy_gbs)

    def ttft_at_batch_1(self, method: Method, context: int) -> dict[str, Any]:
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


def run(methods: list[str], out: Path, *, model: str = "auto", quick: bool = False, contexts: str | None = None,
        batches: str | None = None, fill: str = "auto", prefill_tokens: str | None = None, steps: int | None = None,
        warmup_steps: int | None = None, search: bool = True, search_context: str | None = None,
        max_batch: int | None = None, device: str | None = None, dtype: str = "auto", q_tail: int = Q_TAIL,
        seed: int = 0, rerun: bool = False, show_progress: bool = True, graph: bool = True) -> SweepResult:
    """Run the throughput suite; writes `out/throughput.jsonl` and `out/throughput.provenance.json`."""
    if fill not in ("auto", "prefill", "synthetic"):
        raise KVBenchError(f"--fill '{fill}' is invalid; valid: auto, prefill, synthetic")
    ms = resolve_methods(methods)
    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    model_name = ("synthetic:llama-3.1-8b" if gpu else "embedded") if model == "auto" else model
    ctxs = parse_sizes(contexts or (("32K" if quick else "4K,32K") if gpu else ("256" if quick else "256,1K")),
                       "--contexts")
    bs = parse_sizes(batches or (("1,8" if quick else "1,8,32") if gpu else ("1" if quick else "1,2")), "--batches")
    p_tokens = parse_size(prefill_tokens or ("32K" if gpu else "2K"), "--prefill-tokens")
    n_steps = steps or (16 if gpu else (2 if quick else 4))
    n_warm = warmup_steps if warmup_steps is not None else (3 if gpu else 1)
    s_ctx = parse_size(search_context or ("32K" if gpu else "256"), "--search-context")
    limit = max_batch or (1024 if gpu else (2 if quick else 4))
    with console.status(f"loading {model_name} ..."):
        mdl, _ = load_model(model_name, device=dev, dtype=dtype)
    runner = Runner(mdl, fill=fill, prefill_tokens=p_tokens, warmup_steps=n_warm, steps=n_steps, q_tail=q_tail,
                    seed=seed, search_limit=limit, graph=graph)
    base = {"model": model_name, "dtype": str(mdl.dtype).removeprefix("torch."), "device": dev.type}
    base["decode"] = "graph" if graph else "eager"  # asked for; metrics.decode_mode says what ran
    cells: list[Cell] = []
    for m in ms:
        for c in ctxs:
            for b in bs:
                cells.append(Cell(m.label(), m.params(), {**base, "task": "decode", "context": c, "batch": b,
                                                           "fill": runner.resolve_fill(b, c)}, m))
        if search:
            cells.append(Cell(m.label(), m.params(), {**base, "task": "max_batch", "context": s_ctx,
                                                       "fill": "synthetic"}, m))
    out = Path(out)
    writer = RecordWriter(out / f"{SUITE}.jsonl")
    options = dict(model=model_name, contexts=ctxs, batches=bs, fill=fill, prefill_tokens=p_tokens, steps=n_steps,
                   warmup_steps=n_warm, search=search, search_context=s_ctx, max_batch=limit, device=str(dev),
                   dtype=str(mdl.dtype), q_tail=q_tail, seed=seed, quick=quick, methods=[m.label() for m in ms],
                   graph=graph)
    result = run_sweep(SUITE, cells, with_telemetry(runner.cell), writer, description="throughput", rerun=rerun,
                       show_progress=show_progress)
    write_run_provenance(out, SUITE, options, load_s=round(getattr(mdl, "kvbench_load_s", 0.0), 2))
    print_table(result.records)
    return result


def print_table(records: list[dict]) -> None:
    from rich.table import Table

    t = Table(title="throughput", title_justify="left")
    for col in ("method", "task", "ctx", "B", "fill", "status", "TTFT s", "tok/s", "ms/step", "cache GiB", "max B"):
        t.add_column(col, justify="left" if col in ("method", "task", "fill", "status") else "right")
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for r in records:
        m, c = r["metrics"], r["cell"]
        t.add_row(r["method"], c["task"], str(c["context"]), str(m.get("batch", c.get("batch", "-"))), c["fill"],
                  r["status"], fmt(m.get("ttft_s"), ".3f"), fmt(m.get("decode_tok_s"), ",.1f"),
                  fmt(m.get("latency_ms"), ".2f"),
                  fmt(None if m.get("cache_bytes") is None else m["cache_bytes"] / 2**30, ".2f"),
                  fmt(m.get("max_batch"), "d"))
    console.print(t)


def command(
    methods: list[str] = typer.Option(["all"], "--methods", "-m", help="Method specs, repeatable: full, "
                                      "selfindex:budget=0.1, ... ('all': every registered method)."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Folder for throughput.jsonl and its provenance."),
    model: str = typer.Option("auto", help="auto (synthetic:llama-3.1-8b on GPU, embedded on CPU), embedded, "
                                           "synthetic:<arch>, a Hugging Face id or a local path."),
    quick: bool = typer.Option(False, help="A small grid for a fast check."),
    contexts: Optional[str] = typer.Option(None, help="Contexts, e.g. 4K,32K (default GPU 4K,32K; CPU 256,1K)."),
    batches: Optional[str] = typer.Option(None, help="Batch sizes, e.g. 1,8,32 (default GPU 1,8,32; CPU 1,2)."),
    fill: str = typer.Option("auto", help="How the cache is filled before decoding: prefill (real prompt), synthetic "
                                          "(synthetic k/v per layer), or auto (prefill up to --prefill-tokens)."),
    prefill_tokens: Optional[str] = typer.Option(None, help="auto fill: real prefill up to this batch x context "
                                                            "(default GPU 32K, CPU 2K)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Timed decode steps per cell (default GPU 16, CPU 4)."),
    warmup_steps: Optional[int] = typer.Option(None, min=0, help="Untimed decode steps first (default GPU 3, CPU 1)."),
    search: bool = typer.Option(True, help="Also grow the batch until out of memory and record the best throughput."),
    search_context: Optional[str] = typer.Option(None, help="Context of the batch search (default GPU 32K, "
                                                            "CPU 256)."),
    max_batch: Optional[int] = typer.Option(None, min=1, help="Upper end of the batch search (default GPU 1024, "
                                                              "CPU 4, quick 2)."),
    device: Optional[str] = typer.Option(None, help="cuda or cpu (default: cuda when present)."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32."),
    q_tail: int = typer.Option(Q_TAIL, min=1, help="Prefill queries per layer in a synthetic fill (the last "
                                                   "positions; 32 for window-based methods such as SnapKV)."),
    seed: int = typer.Option(0, help="Seed of prompts and synthetic tensors."),
    graph: bool = typer.Option(True, "--graph/--no-graph", help="Replay each decode step as one CUDA graph where the "
                                                                 "method is capture-safe (--no-graph: eager steps)."),
    rerun: bool = typer.Option(False, help="Measure cells again even if out/throughput.jsonl already has them."),
):
    """End-to-end decode throughput, per-token latency and time to first token of a real model through each method's
    cache, and the largest batch (and best throughput) each method fits in device memory."""
    result = run(methods, out, model=model, quick=quick, contexts=contexts, batches=batches, fill=fill,
                 prefill_tokens=prefill_tokens, steps=steps, warmup_steps=warmup_steps, search=search,
                 search_context=search_context, max_batch=max_batch, device=device, dtype=dtype, q_tail=q_tail,
                 seed=seed, rerun=rerun, graph=graph)
    console.print(f"throughput: {result.summary()}")
