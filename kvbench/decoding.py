"""Driving a transformers model through a method's cache (kvbench.bridge): a task instance prefilled whole or as
context then question, greedy answers and token-by-token perplexity (the accuracy suite); random prompts, a timed real
prefill, a cache filled with synthetic keys and values layer by layer, and timed decode steps (the throughput suite).

Shared prefills (`Prefixes`, issue 13): the methods in `prefill_queries` attend densely during prefill
(`attention.dense_attention(q, k, v, causal=True)` on the keys and values as the model made them) and only compress
what they store, so the model's whole prefill pass, every layer's queries, keys and values and the last logits
included, is the same whichever of them runs. On the CPU, `run_instance` then runs that pass once per token prefix
(the whole prompt, or the context of the query-agnostic protocol), records each layer's keys, values and last queries,
and replays them into each method's cache through `LayerCache.prefill`: the cache ends in the state its own pass
would have left, while the model's linear layers (about 90% of a prefill at 1K-4K tokens) run once instead of once
per method and protocol. The context of the query-agnostic protocol is a prefix of the whole prompt, so the whole
prompt's pass also keeps the queries before the question (`cut`) and serves the context as its first tokens: keys
and values of a causal model at a position depend on the tokens up to it only, so one pass per instance does (equal
to a context-only pass up to float rounding, which can differ where a kernel blocks a longer sequence otherwise).
tests/test_accuracy.py checks that scores, predictions and ppl are the same with and without sharing, and fidelity
to float rounding.
"""

from __future__ import annotations

import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvbench.api import LayerCache, LayerSpec, Method

if TYPE_CHECKING:
    import torch

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


def prefill_queries(method) -> int | None:
    """How many of the last prompt queries `method`'s prefill state depends on, for a method whose prefill output is
    `dense_attention(q, k, v, causal=True)` and whose stored state is a function of k, v and those queries alone;
    None for any other method (it runs its own prefill pass). Exact classes only: a subclass may prefill otherwise."""
    from kvbench.methods.full import Full
    from kvbench.methods.kivi import Kivi
    from kvbench.methods.selfindex import SelfIndex
    from kvbench.methods.snapkv import SnapKV
    from kvbench.suites.fidelity import Fidelity

    kind = type(method)
    if kind is Fidelity:  # its shadow full cache only stores k and v; drive=full returns the shadow's output instead
        return prefill_queries(method.inner) if method.drive == "method" else None
    if kind in (Full, Kivi):  # stores (quantizes) k and v; its dense output reads the stored view, bitwise the same
        return 1
    if kind is SelfIndex:  # packs k and v; fixed=scored reads the last query's attention
        return 1
    if kind is SnapKV:  # its votes read the last `window` queries
        return method.window
    return None


PREFIX_QUERIES = 128  # last prompt queries a recorded prefill keeps per layer: more than any method above reads


@dataclass
class Prefix:
    """One dense prefill pass of a token prefix: per layer the last PREFIX_QUERIES queries [B, Hq, <=128, D] and every
    key and value [B, Hkv, T, D] as the attention function received them, the last position's logits [B, V] (fp32;
    None for a cut), and the pass's seconds. `cuts`: per shorter prefix length n, each layer's PREFIX_QUERIES queries
    before position n, so that the pass serves its first n tokens too (`cut`)."""

    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    logits: torch.Tensor | None
    seconds: float
    cuts: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def cut(self, n: int) -> Prefix:
        """The pass of this prefix's first n tokens (a length in `cuts`), as views: no logits (the pass did not make
        them at position n), the whole pass's seconds."""
        return Prefix([(q, k[:, :, :n], v[:, :, :n]) for q, (_, k, v) in zip(self.cuts[n], self.layers, strict=True)],
                      None, self.seconds)


class Prefixes:
    """The recorded prefills of one model, the `keep` most recently used (the instance-major cell order of the
    accuracy suite needs two at a time: an instance's whole prompt and its context)."""

    def __init__(self, model, keep: int = 2):
        self.model, self.keep = model, keep
        self.entries: OrderedDict[tuple[int, ...], Prefix] = OrderedDict()
        self.recorded = 0  # passes run, for tests and benchmarks

    def get(self, ids: torch.Tensor, cut: int | None = None, logits: bool = True) -> Prefix:
        """The prefill of ids [1, T], recorded on the first request (also serving its first `cut` tokens later), or,
        where `logits` are not needed, cut from a recorded longer pass that begins with ids and kept their queries."""
        key = tuple(ids[0].tolist())
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        if not logits:
            for longer, prefix in self.entries.items():
                if len(key) in prefix.cuts and longer[: len(key)] == key:
                    self.entries.move_to_end(longer)
                    return prefix.cut(len(key))
        while len(self.entries) >= self.keep:
            self.entries.popitem(last=False)  # free the oldest before the new pass allocates
        self.entries[key] = prefix = record_prefill(self.model, ids, cut)
        self.recorded += 1
        return prefix


def record_prefill(model, ids: torch.Tensor, cut: int | None = None) -> Prefix:
    """Run the dense prefill of ids [1, T] once, keeping what each layer's attention was given (and, with `cut`, the
    queries before position cut)."""
    import torch

    from kvbench.bridge import attach, with_cache
    from kvbench.timing import sync

    method = _Record(cut if cut is not None and 0 < cut < ids.shape[1] else None)
    cache = attach(model, method)
    sync(model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model(ids, **with_cache(model, cache), logits_to_keep=1)
        logits = out.logits[:, -1].float()
    sync(model.device)
    layers = [(c.q, c.k, c.v) for c in cache.layer_caches()]
    cuts = {method.cut: [c.q_cut for c in cache.layer_caches()]} if method.cut is not None else {}
    return Prefix(layers, logits, time.perf_counter() - t0, cuts)


def replay(cache: KVBenchCache, prefix: Prefix, n_queries: int) -> None:
    """Prefill every layer of `cache` from a recorded pass, as the model's own pass would (the output is dropped: it
    is the recorded pass's). Keys and values are copied, strides kept, so no cache can alter the shared ones."""
    for layer, (q, k, v) in zip(cache.layers, prefix.layers, strict=True):
        k, v = _dense_copy(k), _dense_copy(v)
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        layer.attend(q[:, :, -n_queries:], k, v)


def run_instance(model, tok, cache, inst: Instance, question_chunk: bool, prefixes: Prefixes | None = None,
                 stop_settled: bool = False) -> Outcome:
    """Feed one task instance (kvbench.suites.tasks) through the model with `cache`: prefill the whole prompt, or
    (question_chunk) the context first and then the question as one extend chunk; then decode greedily, or, for ppl,
    score the last tokens one decode step at a time. With `prefixes`, on the CPU, a method in `prefill_queries` gets
    its prefill replayed from the shared pass (module docstring); `prefill_s` is then the shared pass's seconds plus
    this cell's replay (and question chunk), and `prefill_shared` is set. `stop_settled`: stop decoding once the
    answer so far is `inst.settled` (no further token can change its score); `stopped` then says so."""
    import torch

    from kvbench.bridge import with_cache
    from kvbench.timing import sync

    dev = model.device
    ids = torch.tensor([inst.ids], device=dev)
    kw = with_cache(model, cache)  # the cache under the name this transformers takes
    o = Outcome()
    n_queries = prefill_queries(cache.method) if prefixes is not None and dev.type == "cpu" else None
    shared = n_queries is not None and n_queries <= PREFIX_QUERIES and ids.shape[0] == 1

    def prefill(prefix_ids, logits: bool = True):
        """Logits [B, V] of the last prefix position (None where not asked for and the pass was shared), the cache
        prefilled; seconds of a shared pass, else 0. A whole prompt's shared pass also serves its context later."""
        if shared:
            cut = inst.split if prefix_ids.shape[1] == ids.shape[1] else None
            prefix = prefixes.get(prefix_ids, cut=cut, logits=logits)
            replay(cache, prefix, n_queries)
            return prefix.logits, prefix.seconds
        return model(prefix_ids, **kw, logits_to_keep=1).logits[:, -1].float(), 0.0

    with torch.inference_mode():
        sync(dev)
        t0 = time.perf_counter()
        if inst.score_tokens or (question_chunk and 0 < inst.split < len(inst.ids)):
            logits, pass_s = prefill(ids[:, : inst.split], logits=bool(inst.score_tokens))
            sync(dev)
            o.extra["context_prefill_s"] = round(pass_s + time.perf_counter() - t0, 4)
            if not inst.score_tokens:  # the question arrives after the context was compressed: one extend chunk
                logits = model(ids[:, inst.split:], **kw, logits_to_keep=1).logits[:, -1].float()
        else:
            logits, pass_s = prefill(ids)
        sync(dev)
        t1 = time.perf_counter()
        o.prefill_s = pass_s + t1 - t0
        if shared:
            o.extra["prefill_shared"] = True
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
                if stop_settled and inst.settled(tok.decode(toks, skip_special_tokens=True)):
                    o.extra["stopped"] = "settled"
                    break
                step = torch.tensor([[nxt]], device=dev)
                logits = model(step, **kw).logits[:, -1].float()
            o.prediction = tok.decode(toks, skip_special_tokens=True)
            o.new_tokens = len(toks)
        sync(dev)
        o.decode_s = time.perf_counter() - t1
    return o


def _dense_copy(x: torch.Tensor) -> torch.Tensor:
    """A copy of x with its dimensions in the same memory order (what clone() keeps for a whole pass's tensors),
    also for a cut's slice, whose clone() would be contiguous instead."""
    import torch

    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    out = torch.empty([x.shape[d] for d in order], dtype=x.dtype, device=x.device).permute(
        [order.index(d) for d in range(x.dim())])
    return out.copy_(x)


class _RecordLayer(LayerCache):
    """A layer of the recording pass: dense causal attention, as each method in prefill_queries computes it, keeping
    the last queries and the keys and values it was given (the model's own tensors, not copies)."""

    def __init__(self, spec: LayerSpec, cut: int | None):
        self.spec, self.cut, self.q, self.q_cut, self.k, self.v = spec, cut, None, None, None, None

    def prefill(self, q, k, v):
        from kvbench.attention import dense_attention

        self.q, self.k, self.v = q[:, :, -PREFIX_QUERIES:].clone(), k, v
        if self.cut is not None:
            self.q_cut = q[:, :, max(0, self.cut - PREFIX_QUERIES): self.cut].clone()
        return dense_attention(q, k, v, causal=True)

    def extend(self, q, k, v):
        raise RuntimeError("a recorded prefill is one pass")

    def seq_len(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def nbytes(self) -> int:
        return 0


@dataclass(frozen=True)
class _Record(Method):
    """record-prefill: the recording pass's method (internal, not registered)."""

    name = "record-prefill"
    cut: int | None = None  # also keep the queries before this position (Prefix.cuts)

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        return _RecordLayer(spec, self.cut)


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
