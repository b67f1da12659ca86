"""rag: multi-context KV caches (kvbench/rag.py): documents prefilled apart, reused together, per RAG method.

A cell is one RAG method on one instance (task, documents N, tokens per document, seed; kvbench/rag_tasks.py). The
prefix and each document are prefilled on their own first (the store, untimed, as a RAG system does offline). Then,
timed to the first token: the documents are composed behind the prefix (keys re-rotated to their offsets), the
method selects and recomputes what it does, the question goes through the model, and the first token is the argmax;
the answer is then decoded greedily through the ordinary extend.

RAG methods (`--rag-methods`, default all five): recompute, reuse, cacheblend, epic, samkv (methods/rag_*.py).
`--methods` are single-context methods applied after reuse (each Method.compose: e.g. snapkv votes with the
question); their cells are labelled `reuse+<method>`, and `full` there is reuse itself, so it is left out.

Metrics per cell: `score` (LongBench files: token F1; 1hop/2hop: the share of the answer's parts found), `f1`,
`exact_match`, `substring`, `prediction` and `expected`; `ttft_s`; `recompute_ratio` (document tokens recomputed through
every layer / document tokens;
cacheblend also records `check_layers_fraction`, the layers recomputed for every token) and `kept_ratio`
(document tokens the cache holds / document tokens); `bytes_held` (the cache's bytes right after the first token:
prefix, kept tokens and question) and `bytes_held_vs_recompute`; `first_logits_rel_err` (relative L2 error of the
first generated token's logits against recompute's on the same instance) and `first_token_agrees`; `store_s`
(the untimed per-document prefill), `prompt_tokens`, `doc_tokens`, `new_tokens`, `decode_s`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from kvbench.errors import KVBenchError
from kvbench.metrics import SCORE, TTFT_S
from kvbench.sizes import parse_size
from kvbench.suite import METHOD, Column, Options, Plan, Suite, option
from kvbench.suites.accuracy import _list, _seeds
from kvbench.sweep import Cell

DEFAULT_RAG = "recompute reuse cacheblend epic samkv"


def _rag_methods(value, flag: str) -> list[str]:
    from kvbench.rag import parse_rag

    specs = value.split() if isinstance(value, str) else list(value)
    if not specs:
        raise KVBenchError(f"{flag}: give at least one RAG method, e.g. 'recompute samkv:budget=0.15'")
    return [parse_rag(s).label() for s in specs]


def _tasks(value, flag: str) -> list[str]:
    from kvbench.rag_tasks import RAG_TASKS
    from kvbench.suites.tasks import parse_file_task

    tasks = _list(value, str, flag)
    for t in tasks:
        if t.startswith("file:"):
            parse_file_task(t)
        elif t not in RAG_TASKS:
            raise KVBenchError(f"{flag}: unknown rag task '{t}'; valid: {', '.join(RAG_TASKS)}, file:PATH")
    return tasks


def _documents(value, flag: str) -> list[int]:
    ns = _list(value, int, flag)
    if not ns or any(n < 1 for n in ns):
        raise KVBenchError(f"{flag}: document counts must be whole numbers >= 1, got {value!r} (N = 0 has no "
                           "documents to reuse)")
    return ns


def _doc_tokens(value, flag: str) -> int:
    n = parse_size(value, flag)
    if n < 16:
        raise KVBenchError(f"{flag}: {n} tokens per document is too short; give at least 16")
    return n


@dataclass
class RagOptions(Options):
    rag_methods: list[str] = option("RAG methods, space-separated specs: recompute, reuse, cacheblend, epic, samkv "
                                    "(e.g. 'samkv:budget=0.15 cacheblend:ratio=0.15').", DEFAULT_RAG,
                                    parse=_rag_methods)
    tasks: list[str] = option("Comma-separated: 1hop, 2hop, synthetic (random ids, no score), file:PATH (LongBench "
                              "2WikiMQA/HotpotQA/MuSiQue JSONL).", "1hop,2hop", parse=_tasks)
    documents: list[int] = option("Documents per prompt (N), e.g. 2,6,10.", parse=_documents, default="2,6,10",
                                  quick="6")
    doc_tokens: int = option("Tokens per document.", parse=_doc_tokens, cpu="192", gpu="2K", quick_cpu="96")
    seeds: list[int] = option("Instance seeds, e.g. 0-9; for file: tasks, line numbers from 0.", parse=_seeds,
                              default="0-9", quick="0-2")


def model_name(plan: Plan) -> str:
    return "embedded" if plan.model == "auto" else plan.model


def cells(plan: Plan) -> list[Cell]:
    """Instance-major: every method on one instance one after the other (recompute first: the others' reference)."""
    from kvbench.models import resolve_dtype
    from kvbench.rag import AfterReuse, parse_rag

    o = plan.options
    dtype = plan.loaded[0].dtype if plan.loaded is not None else resolve_dtype(o.dtype, plan.torch_device)
    methods = [parse_rag(s) for s in o.rag_methods]
    methods += [AfterReuse(m) for m in plan.methods if getattr(m, "name", "") != "full"]
    methods.sort(key=lambda m: m.label() != "recompute")
    out = []
    for task in o.tasks:
        for n in o.documents:
            for seed in o.seeds:
                base = dict(model=model_name(plan), dtype=str(dtype).removeprefix("torch."), device=plan.device,
                            task=task, documents=n, doc_tokens=o.doc_tokens, seed=seed)
                out += [Cell.of(m, base) for m in methods]
    return out


class Session:
    """The model (loaded once), and per instance its store and recompute's first logits."""

    def __init__(self, plan: Plan):
        from kvbench.models import load_model
        from kvbench.sweep import console

        loaded = plan.loaded
        if loaded is None:
            with console.status(f"loading {model_name(plan)} ..."):
                loaded = load_model(model_name(plan), device=plan.torch_device, dtype=plan.options.dtype)
        self.model, self.tok = loaded
        self.instances: dict[tuple, Any] = {}
        self.reference: dict[tuple, Any] = {}
        self.warm: set[str] = set()

    def instance(self, c: dict):
        """(RagInstance, Stored, seconds the store took) of a cell, built once."""
        import torch

        from kvbench.rag import store_documents
        from kvbench.rag_tasks import make_instance
        from kvbench.timing import sync

        key = (c["task"], c["documents"], c["doc_tokens"], c["seed"])
        if key not in self.instances:
            vocab = self.model.config.get_text_config().vocab_size
            inst = make_instance(self.tok, c["task"], c["documents"], c["doc_tokens"], c["seed"], vocab=vocab)
            sync(self.model.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                stored = store_documents(self.model, inst.prompt)
            sync(self.model.device)
            self.instances = {key: (inst, stored, time.perf_counter() - t0)}  # one instance held at a time
        return self.instances[key]

    def first(self, method, inst, stored):
        """(cache, first logits, facts, seconds to the first token) of `method`; on the GPU after one untimed run."""
        import torch

        from kvbench.device import release
        from kvbench.rag import Scene
        from kvbench.timing import sync

        dev = self.model.device
        with torch.inference_mode():
            if dev.type == "cuda" and method.label() not in self.warm:  # kernels load, allocator warms
                method.first_token(Scene(self.model, inst.prompt, stored))
                self.warm.add(method.label())
                release(dev)
            sync(dev)
            t0 = time.perf_counter()
            cache, logits, facts = method.first_token(Scene(self.model, inst.prompt, stored))
            logits.argmax(-1).tolist()
            sync(dev)
        return cache, logits, facts, time.perf_counter() - t0


def decode_answer(model, tok, cache, logits, max_new: int) -> tuple[list[int], float]:
    """Greedy tokens after the first (fed back through the cache's extend); returns them and the seconds taken."""
    import torch

    from kvbench.decoding import eos_ids
    from kvbench.rag import _forward

    stop = eos_ids(model, tok) if tok is not None else set()
    toks, t0 = [], time.perf_counter()
    with torch.inference_mode():
        while True:
            toks.append(int(logits.argmax(-1)))
            if toks[-1] in stop or len(toks) >= max_new:
                break
            logits = _forward(model, cache, [toks[-1]])
    return toks, time.perf_counter() - t0


def measure(s: Session, cell: Cell) -> dict[str, Any]:
    from kvbench import rag
    from kvbench.rag import parse_rag
    from kvbench.rag_tasks import scores

    inst, stored, store_s = s.instance(cell.cell)
    key = tuple(cell.cell[k] for k in ("task", "documents", "doc_tokens", "seed"))
    cache, logits, facts, ttft = s.first(cell.parsed, inst, stored)
    held = cache.nbytes()
    if key not in s.reference:  # recompute's first logits and bytes on this instance, the others' reference
        if cell.method == "recompute":
            s.reference = {key: (logits, held)}
        else:
            ref_cache, ref_logits, _, _ = s.first(parse_rag("recompute"), inst, stored)
            s.reference = {key: (ref_logits, ref_cache.nbytes())}
            del ref_cache
    ref_logits, ref_bytes = s.reference[key]
    m: dict[str, Any] = {TTFT_S: ttft, **facts, "bytes_held": held, "bytes_held_vs_recompute": held / ref_bytes,
                         "first_logits_rel_err": float((logits - ref_logits).norm() / ref_logits.norm()),
                         "first_token_agrees": bool(logits.argmax(-1).eq(ref_logits.argmax(-1)).all()),
                         "store_s": round(store_s, 4), "prompt_tokens": len(inst.prompt.ids()),
                         "masked_kernel": rag.MASKED_KERNEL,  # on the GPU; the CPU runs SDPA
                         "doc_tokens": inst.prompt.doc_tokens, **inst.info}
    toks, decode_s = decode_answer(s.model, s.tok, cache, logits, inst.max_new_tokens)
    m.update(new_tokens=len(toks), decode_s=round(decode_s, 4), seq_len=cache.get_seq_length())
    if inst.answers and s.tok is not None:
        pred = s.tok.decode(toks, skip_special_tokens=True)
        m.update(scores(inst, pred), prediction=pred, expected=inst.answers)
    return m


def summary_rows(records: list[dict]) -> list[dict]:
    """One row per method, task and N: mean score, median TTFT, mean ratios and bytes, how often the first token
    matches recompute's."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["cell"].get("task"), r["cell"].get("documents")), []).append(r)

    def mean(ms, k):
        xs = [float(m[k]) for m in ms if isinstance(m.get(k), (int, float))]
        return sum(xs) / len(xs) if xs else None

    rows = []
    for (method, task, n), g in sorted(groups.items(), key=lambda kv: (str(kv[0][1]), kv[0][2] or 0, kv[0][0])):
        ms = [r["metrics"] for r in g if r["status"] == "ok"]
        ttfts = [m[TTFT_S] for m in ms if m.get(TTFT_S) is not None]
        rows.append(dict(method=method, task=task, documents=n, score=mean(ms, SCORE), f1=mean(ms, "f1"),
                         em=mean(ms, "exact_match"),
                         ttft=statistics.median(ttfts) if ttfts else None, recompute=mean(ms, "recompute_ratio"),
                         kept=mean(ms, "kept_ratio"), bytes=mean(ms, "bytes_held_vs_recompute"),
                         err=mean(ms, "first_logits_rel_err"), agree=mean(ms, "first_token_agrees"),
                         cells=len(ms), failed=sum(r["status"] in ("failed", "oom") for r in g)))
    return rows


def _col(header: str, key: str, fmt: str = "", left: bool = False) -> Column:
    return Column(header, lambda r: r[key], fmt, left)


SUITE = Suite(
    name="rag",
    help="Multi-context KV caches for RAG: documents prefilled apart and reused together; recompute, reuse, "
         "cacheblend, epic, samkv and single-context methods after reuse: F1, TTFT, recompute and kept ratios, bytes "
         "held, first-token error against recompute.",
    options=RagOptions, cells=cells, setup=Session, measure=measure, rows=summary_rows,
    columns=(METHOD, _col("task", "task", left=True), _col("N", "documents"), _col("score", "score", ".3f"),
             _col("F1", "f1", ".3f"),
             _col("EM", "em", ".2f"), _col("TTFT s", "ttft", ".3f"), _col("recompute", "recompute", ".3f"),
             _col("kept", "kept", ".3f"), _col("bytes/rec", "bytes", ".3f"), _col("1st err", "err", ".3f"),
             _col("1st agree", "agree", ".2f"), _col("cells", "cells"), _col("failed", "failed")),
    report=("rag",),
    model="auto",
    model_help="auto (embedded), embedded, a Hugging Face id or local path, or synthetic:<arch> (random weights: "
               "use --tasks synthetic; TTFT and bytes only).",
    methods=("snapkv:capacity=0.15",),
    telemetry_s=None,
)
run = SUITE.run
