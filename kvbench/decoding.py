"""Driving a transformers model through a method's cache (kvbench.bridge): a task instance prefilled whole or as
context then question, greedy answers and token-by-token perplexity (the accuracy suite); random prompts, a timed real
prefill, a cache filled with synthetic keys and values layer by layer, and timed decode steps (the throughput suite)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from kvbench.api import Method
    from kvbench.bridge import KVBenchCache
    from kvbench.suites.tasks import Instance


@dataclass
class Outcome:
    """What one pass of a prompt through a model and a cache gave."""

    prediction: str = ""
    new_tokens: int = 0
    nll: float | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def eos_ids(model, tok) -> set[int]:
    ids = set()
    for e in (getattr(model.generation_config, "eos_token_id", None), getattr(tok, "eos_token_id", None)):
        if e is not None:
            ids.update(e if isinstance(e, (list, tuple)) else [e])
    return ids


def run_instance(model, tok, cache, inst: Instance, question_chunk: bool) -> Outcome:
    """Feed one task instance (kvbench.suites.tasks) through the model with `cache`: prefill the whole prompt, or
    (question_chunk) the context first and then the question as one extend chunk; then decode greedily, or, for ppl,
    score the last tokens one decode step at a time."""
    import torch

    from kvbench.bridge import with_cache
    from kvbench.timing import sync

    dev = model.device
    ids = torch.tensor([inst.ids], device=dev)
    kw = with_cache(model, cache)  # the cache under the name this transformers takes
    o = Outcome()
    with torch.inference_mode():
        sync(dev)
        t0 = time.perf_counter()
        if inst.score_tokens or (question_chunk and 0 < inst.split < len(inst.ids)):
            out = model(ids[:, : inst.split], **kw, logits_to_keep=1)
            sync(dev)
            o.extra["context_prefill_s"] = round(time.perf_counter() - t0, 4)
            if not inst.score_tokens:  # the question arrives after the context was compressed: one extend chunk
                out = model(ids[:, inst.split:], **kw, logits_to_keep=1)
        else:
            out = model(ids, **kw, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        sync(dev)
        t1 = time.perf_counter()
        o.prefill_s = t1 - t0
        if inst.score_tokens:
            targets = inst.ids[inst.split:]
            nll = torch.zeros((), dtype=torch.float64, device=dev)  # summed on the device: no sync per token
            for i, target in enumerate(targets):
                nll -= torch.log_softmax(logits, -1)[0, target].double()
                if i + 1 < len(targets):  # decode step: feed this token, predict the next
                    logits = model(ids[:, inst.split + i: inst.split + i + 1], **kw).logits[:, -1]
                    logits = logits.float()
            o.nll, o.new_tokens = float(nll), len(targets) - 1
        else:
            stop, toks = eos_ids(model, tok), []
            for _ in range(inst.max_new_tokens):
                nxt = int(logits.argmax(-1))
                toks.append(nxt)
                if nxt in stop or len(toks) == inst.max_new_tokens:
                    break  # like generate(): the last token is never fed back
                step = torch.tensor([[nxt]], device=dev)
                logits = model(step, **kw).logits[:, -1].float()
            o.prediction = tok.decode(toks, skip_special_tokens=True)
            o.new_tokens = len(toks)
        sync(dev)
        o.decode_s = time.perf_counter() - t1
    return o


def random_ids(model, batch: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    import torch

    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, (batch, tokens), generator=gen, device=gen.device).to(model.device)


def real_prefill(model, method: Method, ids: torch.Tensor) -> tuple[KVBenchCache, torch.Tensor, float]:
    """Prompt ids [B, T] through the model; returns (cache, next token ids [B, 1], seconds to the first token)."""
    import torch

    from kvbench.bridge import attach, with_cache
    from kvbench.timing import sync

    cache = attach(model, method)
    sync(model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model(input_ids=ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(model.device)
    return cache, nxt, time.perf_counter() - t0


def synthetic_cache(model, method: Method, batch: int, context: int, *, q_tail: int, seed: int) -> KVBenchCache:
    """A KVBenchCache whose every layer holds `context` synthetic tokens, built layer by layer (no activations)."""
    import torch

    from kvbench.bridge import attach
    from kvbench.models import model_shape
    from kvbench.synthetic import fill_synthetic, layer_specs

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
    import torch

    from kvbench.bridge import with_cache
    from kvbench.timing import sync

    pos = cache.get_seq_length()
    times = []
    with torch.inference_mode():
        for i in range(warmup + steps):
            position_ids = torch.full((next_ids.shape[0], 1), pos, dtype=torch.long, device=model.device)
            sync(model.device)
            t0 = time.perf_counter()
            out = model(input_ids=next_ids, **with_cache(model, cache), position_ids=position_ids, use_cache=True,
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
