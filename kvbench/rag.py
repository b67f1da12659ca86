"""Multi-context (RAG) KV caches: documents prefilled on their own, placed at any position, composed behind a prefix.

The scenario (issue 15). A prompt is a shared prefix, N retrieved documents and a question. A RAG store prefills
each document once, on its own behind the prefix (it attends to the prefix, never to another document), and keeps
its keys and values. At query time the documents are placed one after the other behind the prefix: each
document's keys, cached after RoPE at positions P..P+n-1, are re-rotated to their new offset o (RoPE is a rotation,
R(p + d) = R(d) R(p), so k at o+i is R(o - P) applied to k at P+i: `Rope.shift`). Then a RAG method decides what to
keep and what to recompute, the question (and the recomputed tokens, at their real positions) goes through the
model over the composed cache, and decoding continues through the ordinary `extend`.

    store = store_documents(model, prompt)          # offline: the prefix and each document prefilled apart
    scene = Scene(model, prompt, store)              # one query: compose, probe, recompute
    cache, logits, facts = first_token(scene, method)  # method: a RagMethod (methods/rag_*.py) or AfterReuse(...)

Everything runs through the stock transformers model and kvbench's bridge: the cache's layers are `PositionedKV`
LayerCaches whose slots carry their logical positions, so a forward with explicit `position_ids` can overwrite
(recompute) some tokens in place and attend causally by position.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from kvbench import attention
from kvbench.api import LayerCache, LayerSpec, Method, ParamError, UnknownMethodError
from kvbench.errors import KVBenchError
from kvbench.bridge import with_cache

RAG_MODULES = ("rag_recompute", "rag_reuse", "rag_cacheblend", "rag_epic", "rag_samkv")  # kvbench.methods.*
_RAG: dict[str, type] = {}


# ---------------------------------------------------------------------------------------------------------------
# RAG methods: their own registry (they cannot serve a single causal prompt, so `all` of the other suites and the
# main registry do not list them)


def register_rag(cls):
    _RAG[cls.name] = cls
    return cls


def rag_methods() -> dict[str, type]:
    for mod in RAG_MODULES:
        importlib.import_module(f"kvbench.methods.{mod}")
    return dict(_RAG)


class RagMethod(Method):
    """Base of the RAG methods: select what to keep and recompute; the Scene does the rest."""

    family: ClassVar[str] = "rag"

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        raise KVBenchError(f"'{self.name}' is a multi-context (RAG) method; run it in the rag suite (kvbench run rag)")

    def select(self, scene: "Scene") -> "Selection":
        """Which context tokens the cache keeps and which of them are recomputed."""
        raise NotImplementedError

    def first_token(self, scene: "Scene"):
        """(cache, logits [1, V] of the first answer token, facts): keep and recompute what select() says."""
        sel = self.select(scene)
        cache = sel.cache if sel.cache is not None else scene.cache(sel.keep)
        logits = scene.forward(cache, sel.recompute)
        return cache, logits, {**sel.facts, **scene.ratios(sel)}


@dataclass(frozen=True)
class AfterReuse:
    """A single-context method applied after `reuse`: the stored caches concatenated (Method.compose), then the
    method's own prefill over them with the question's queries (e.g. snapkv votes with the question as its window)."""

    inner: Method
    family: ClassVar[str] = "rag+"

    @property
    def name(self) -> str:
        return "reuse+" + self.inner.name

    def label(self) -> str:
        return "reuse+" + self.inner.label()

    def params(self) -> dict:
        return {"after": "reuse", **self.inner.params()}

    def budget_fraction(self, context: int) -> float:
        return self.inner.budget_fraction(context)

    def first_token(self, scene: "Scene"):
        cache = scene.cache(None, method=self.inner)
        logits = scene.forward(cache, scene.empty())
        return cache, logits, {"recompute_ratio": 0.0}


def parse_rag(spec: str):
    """'samkv', 'samkv:budget=0.15', or 'reuse+<any single-context method spec>' -> a RAG method object."""
    from kvbench.registry import _convert, parse_method

    spec = spec.strip()
    if spec.startswith("reuse+"):
        return AfterReuse(parse_method(spec.removeprefix("reuse+")))
    name, _, rest = spec.partition(":")
    known = rag_methods()
    if name not in known:
        raise UnknownMethodError(name, [*known, "reuse+<method>"])
    cls = known[name]
    hints, kwargs = typing.get_type_hints(cls), {}
    fields = {f.name for f in dataclasses.fields(cls)}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in fields:
            raise KVBenchError(f"rag method spec '{spec}': '{item}' is not one of its parameters "
                               f"({', '.join(sorted(fields)) or 'none'}) as key=value")
        kwargs[key.strip()] = _convert(name, key.strip(), value.strip(), hints.get(key.strip()))
    return cls(**kwargs)


def check_fraction(method: str, name: str, value: float) -> None:
    """A share of the documents' tokens: in (0, 1]."""
    if not 0 < value <= 1:
        raise ParamError(method, name, value, "a fraction of the documents' tokens in (0, 1]")


# ---------------------------------------------------------------------------------------------------------------
# the prompt and the store


@dataclass
class RagPrompt:
    """Token ids of the shared prefix, each document and the question, tokenized apart so every method sees the
    same tokens (the concatenation is what `recompute` prefills)."""

    prefix: list[int]
    docs: list[list[int]]
    question: list[int]

    def __post_init__(self):
        if not self.docs:
            raise KVBenchError("a RAG prompt needs at least one document (N = 0 given)")
        for i, d in enumerate(self.docs):
            if not d:
                raise KVBenchError(f"document {i} is empty; every document needs at least one token")
        if not self.prefix or not self.question:
            raise KVBenchError("a RAG prompt needs a non-empty prefix and question")

    def ids(self) -> list[int]:
        return [t for part in (self.prefix, *self.docs, self.question) for t in part]

    def spans(self) -> list[tuple[int, int]]:
        """Each document's [start, end) positions once composed behind the prefix."""
        out, at = [], len(self.prefix)
        for d in self.docs:
            out.append((at, at + len(d)))
            at += len(d)
        return out

    @property
    def context_len(self) -> int:
        return len(self.prefix) + sum(map(len, self.docs))

    @property
    def doc_tokens(self) -> int:
        return sum(map(len, self.docs))


@dataclass
class Stored:
    """What a RAG store keeps: per layer the prefix's k/v and each document's k/v ([1, Hkv, n, D], after RoPE; a
    document's at positions P..P+n-1, P the prefix length)."""

    prefix: list[tuple[torch.Tensor, torch.Tensor]]
    docs: list[list[tuple[torch.Tensor, torch.Tensor]]]


class Rope:
    """Re-rotates cached keys to another position: the model's RoPE frequencies (`inv_freq` of its rotary module,
    rope scaling included), half-split layout as transformers' rotate_half."""

    def __init__(self, model):
        mods = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
        if not mods:
            raise KVBenchError(f"{type(model).__name__} has no rotary embedding (inv_freq); the rag suite needs RoPE")
        self.inv_freq = mods[0].inv_freq

    def shift(self, k: torch.Tensor, delta: int | torch.Tensor) -> torch.Tensor:
        """k [B, H, T, D] rotated by `delta` positions: one int, or one per token (a [T] tensor)."""
        if isinstance(delta, int) and delta == 0:
            return k
        return self.rotate(k, *self.cos_sin(torch.as_tensor(delta).view(-1), k.device, self.work_dtype(k)))

    @staticmethod
    def work_dtype(k: torch.Tensor) -> torch.dtype:
        return torch.float64 if k.dtype == torch.float64 else torch.float32  # bf16 keys: rotate in float32, once

    @staticmethod
    def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None):
        """k * cos + rotate_half(k) * sin in cos's dtype (k promoted inside the products, not copied first), cast
        to k's dtype into `out` when given (a slice of the composed cache: no second copy). On a GPU one Triton pass
        (kernels/rope_shift.py); this PyTorch path elsewhere."""
        from kvbench.kernels import rope_shift

        done = rope_shift.rotate(k, cos, sin, out)  # on a GPU: one pass instead of five kernels and temporaries
        if done is not None:
            return done
        half = k.shape[-1] // 2
        rotated = torch.addcmul(k * cos, torch.cat([-k[..., half:], k[..., :half]], -1), sin)
        return rotated.to(k.dtype) if out is None else out.copy_(rotated)

    def cos_sin(self, delta: torch.Tensor, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [len(delta), D] of each shift, computed in float64 (large positions) and cast once."""
        freqs = delta.to(device=device, dtype=torch.float64)[:, None] * self.inv_freq.to(device, torch.float64)
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the GPU: a copy from pageable memory first synchronises the
    stream (CUDA's rule for pageable host-to-device copies), which left the GPU idle while the host launched the next
    kernels (measured on an H200: 37-140 such syncs per first token); from pinned memory it is asynchronous."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _forward(model, cache, ids: list[int] | torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """One forward through the bridge; returns the last position's logits [1, V] (float)."""
    ids = to_device(torch.as_tensor(ids), model.device).view(1, -1)
    kw = {} if positions is None else {"position_ids": to_device(positions, model.device).view(1, -1)}
    with torch.inference_mode():
        out = model(input_ids=ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1, **kw)
    return out.logits[:, -1].float()


def layered_cache(model, layers: list[LayerCache]):
    """A bridge cache (kvbench.bridge.attach) whose layers are the given LayerCaches."""
    from kvbench.bridge import attach
    from kvbench.registry import parse_method

    cache = attach(model, parse_method("full"))
    for layer, lc in zip(cache.layers, layers):
        layer.cache, layer.is_initialized = lc, True
        layer.dtype, layer.device = model.dtype, model.device
    return cache


def store_documents(model, prompt: RagPrompt) -> Stored:
    """Prefill the prefix once, then each document on its own behind it (what a RAG store holds)."""
    n_layers = model.config.get_text_config().num_hidden_layers
    pre = [PositionedKV() for _ in range(n_layers)]
    _forward(model, layered_cache(model, pre), prompt.prefix)
    prefix = [(p.k, p.v) for p in pre]
    P, docs = len(prompt.prefix), []
    for d in prompt.docs:
        layers = [PositionedKV(k, v) for k, v in prefix]
        _forward(model, layered_cache(model, layers), d)
        docs.append([(lc.k[:, :, P:], lc.v[:, :, P:]) for lc in layers])
    return Stored(prefix, docs)


# ---------------------------------------------------------------------------------------------------------------
# the cache: dense slots with logical positions


class Observer:
    """Hooks a Scene sets on every PositionedKV for one forward: see the fresh k/v written over reused slots
    (CacheBlend's deviation), see the attention probabilities (SamKV's scores), or attend without storing."""

    store: bool = True
    want_probs: bool = False

    def on_write(self, layer: "PositionedKV", slots: torch.Tensor, old_k, old_v, new_k, new_v) -> None:
        pass

    def on_probs(self, layer: "PositionedKV", probs: torch.Tensor) -> None:  # [B, Hq, T, S]
        pass


class StopForward(Exception):
    """Raised by an Observer to end a forward early (CacheBlend's check pass needs only its first layers)."""


@dataclass
class _Plan:
    """One forward's placement in a PositionedKV (PositionedKV._plan): device slots overwritten (None: none) and
    which of the incoming tokens go there (old_src; None: all), whether and which are appended (new_src), the
    positions afterwards on the host and the device."""

    pos: torch.Tensor
    pos_dev: torch.Tensor | None
    appends: bool
    slots: torch.Tensor | None = None
    old_src: torch.Tensor | None = None
    new_src: torch.Tensor | None = None


class PositionedKV(LayerCache):
    """Dense k/v [B, Hkv, S, D] whose slots carry logical positions `pos` [S] (increasing, with gaps where tokens
    were dropped). `incoming` (set by the Scene) gives the positions of the next extend()'s tokens: those already
    held are overwritten (recomputed), the others appended; queries attend to slots at positions <= their own.

    Positions live on the host (`pos`, `incoming`), so the bookkeeping of a forward (which slots are overwritten,
    which appended, the checks) never waits for the GPU; their device copies (`pos_dev`, `incoming_dev`) feed the
    masks. Measured on an H200: host syncs in this bookkeeping (about 10 per layer) made the passes host-bound."""

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                 layer_idx: int = 0, pos_dev: torch.Tensor | None = None):
        self.k, self.v, self.layer_idx = k, v, layer_idx
        if k is not None and pos is None:
            pos = torch.arange(k.shape[2])
        self.pos = None if pos is None else pos.cpu()
        self._pos_dev = pos_dev if pos_dev is not None else (pos if pos is not None and pos.device.type != "cpu"
                                                             else None)
        self.n = 0 if pos is None else (int(self.pos[-1]) + 1 if len(self.pos) else 0)
        self.incoming: torch.Tensor | None = None
        self.incoming_dev: torch.Tensor | None = None
        self.observer: Observer | None = None
        self.memo: dict | None = None  # shared by the layers of one forward (Scene.forward)

    def pos_dev(self) -> torch.Tensor:
        if self._pos_dev is None:
            self._pos_dev = to_device(self.pos, self.k.device)
        return self._pos_dev

    def prefill(self, q, k, v):
        self.k, self.v, self.pos, self._pos_dev, self.n = k, v, torch.arange(k.shape[2]), None, k.shape[2]
        return attention.dense_attention(q, k, v, causal=True)

    def extend(self, q, k, v):
        if self.k is None:
            return self.prefill(q, k, v)
        if self.incoming is not None:
            qpos = self.incoming.cpu()
            qdev = self.incoming_dev if self.incoming_dev is not None else to_device(qpos, k.device)
        else:
            qpos = torch.arange(self.n, self.n + k.shape[2])
            qdev = to_device(qpos, k.device)
        obs = self.observer or Observer()
        K, V, pos, pos_dev = self._placed(qpos, k, v, obs)
        if obs.store:
            self.k, self.v, self.pos, self._pos_dev = K, V, pos, pos_dev
            self.n = max(self.n, int(qpos[-1]) + 1)
        if q.shape[2] == 1 and int(qpos[0]) >= int(pos[-1]):
            return attention.dense_attention(q, K, V, causal=False)  # a decode step sees every slot
        return _masked_attention(q, K, V, qdev, pos_dev, obs, self)

    def shared(self, tag: str, *tensors, make):
        """make()'s result, computed once per forward for every layer whose `tensors` are the same objects (the
        layers of one forward share their positions: Scene.cache and _plan give them one tensor). Without a
        memo (decode steps outside Scene.forward) it is made each time."""
        if self.memo is None:
            return make()
        key = (tag,) + tuple(id(t) for t in tensors)
        if key not in self.memo:
            self.memo[key] = (tensors, make())  # the entry holds the tensors: their ids stay unique
        return self.memo[key][1]

    def _placed(self, qpos, k, v, obs: Observer):
        """The slots after writing k/v at (host) positions qpos: held positions overwritten, new ones appended;
        returns K, V and the positions on the host and on the device."""
        plan = self.shared("plan", self.pos, qpos, make=lambda: self._plan(qpos))
        K, V = self.k, self.v
        if plan.slots is not None:
            pick = (lambda t: t) if plan.old_src is None else (lambda t: t[:, :, plan.old_src])  # noqa: E731
            new_k, new_v = pick(k), pick(v)
            if type(obs).on_write is not Observer.on_write:  # the old rows are gathered only for an observer
                obs.on_write(self, plan.slots, K[:, :, plan.slots], V[:, :, plan.slots], new_k, new_v)
            K, V = K.index_copy(2, plan.slots, new_k), V.index_copy(2, plan.slots, new_v)
        if plan.appends:
            pick = (lambda t: t) if plan.new_src is None else (lambda t: t[:, :, plan.new_src])  # noqa: E731
            K, V = torch.cat([K, pick(k)], 2), torch.cat([V, pick(v)], 2)
        return K, V, plan.pos, plan.pos_dev

    def _plan(self, qpos: torch.Tensor) -> "_Plan":
        """Where the tokens at qpos go among this layer's slots: the same for every layer of a forward, so made once
        (host bookkeeping, its checks and the index copies to the device were about 10 host ops a layer)."""
        old = qpos < self.n
        n_old = int(old.sum())
        on_dev = lambda idx: to_device(idx, self.k.device)  # noqa: E731
        appends = n_old < len(qpos)  # then the positions grow and get their own device copy below
        plan = _Plan(pos=self.pos, pos_dev=None if appends else self.pos_dev(), appends=appends)
        if n_old:
            pos = self.pos
            # numpy's searchsorted: torch's CPU one showed 4.5 ms a call on the H200 machine's host (154 ms of CPU
            # in samkv's 2,464-token recompute pass, benchmarks/records/rag-profile-h200-3835c8c.txt) for a lookup
            # of microseconds
            slots = torch.from_numpy(np.searchsorted(pos.numpy(), qpos[old].numpy()))
            if bool((slots >= len(pos)).any()) or not bool((pos[slots.clamp(max=len(pos) - 1)] == qpos[old]).all()):
                raise KVBenchError("a recomputed position is not held by the cache (it was dropped before)")
            plan.slots = on_dev(slots)
            plan.old_src = None if n_old == len(qpos) else on_dev(old.nonzero().view(-1))
        if plan.appends:
            plan.new_src = None if not n_old else on_dev((~old).nonzero().view(-1))
            plan.pos = torch.cat([self.pos, qpos[~old]])
            plan.pos_dev = on_dev(plan.pos)
        return plan

    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos))

    def seq_len(self) -> int:
        return self.n


def _attention_with_probs(q, K, V, mask, obs: Observer, layer: PositionedKV) -> torch.Tensor:
    """Masked attention that hands its probabilities [B, Hq, T, S] to the observer. The query heads of a KV head
    are folded into its rows ([B, Hkv, group x T, D]), so K and V are read as stored, never repeated per query
    head (it was 4x the bytes at GQA 4); scores in float32."""
    B, Hq, T, D = q.shape
    scores = _scores_fp32(_fold_heads(q, K.shape[1]), K, D ** -0.5).view(B, Hq, T, -1)
    probs = scores.masked_fill_(~mask, float("-inf")).softmax(-1)
    obs.on_probs(layer, probs)
    out = probs.to(V.dtype).view(B, K.shape[1], -1, probs.shape[-1]) @ V
    return out.view(B, Hq, T, D).to(q.dtype)


_bmm_out_dtype = True  # torch.bmm(..., out_dtype=float32) on CUDA (PyTorch 2.8+); False once it was refused


def _scores_fp32(qg: torch.Tensor, K: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * qg K^T in float32, qg [B, Hkv, R, D], K [B, Hkv, S, D]. On a GPU with 16-bit inputs, one tensor-core
    bmm with float32 output (the products of 16-bit values are exact in float32, the sums float32, as below);
    otherwise in float32 throughout, the scale on the R query rows (cheaper than on R x S scores). Converting K to
    float32 for the product was a copy of the whole cache and a float32 GEMM each layer (4 of the probe's GPU ms
    on an H200, benchmarks/records/rag-profile-h200-3835c8c.txt)."""
    global _bmm_out_dtype
    if _bmm_out_dtype and qg.is_cuda and qg.dtype in (torch.bfloat16, torch.float16):
        try:
            out = torch.bmm(qg.flatten(0, 1), K.flatten(0, 1).transpose(-1, -2), out_dtype=torch.float32)
            return out.view(*qg.shape[:-1], K.shape[2]).mul_(scale)
        except (RuntimeError, TypeError):
            _bmm_out_dtype = False
    return (qg.float() * scale) @ K.float().transpose(-1, -2)


def _masked_attention(q, K, V, qpos, kpos, obs: Observer, layer: PositionedKV) -> torch.Tensor:
    """q [B, Hq, T, D] at positions qpos attends to K/V [B, Hkv, S, D] at kpos <= its own position."""
    group = q.shape[1] // K.shape[1]
    flex = q.is_cuda and not obs.want_probs and masked_kernel(q.shape[2], K.shape[2]) == "flex"
    if flex:
        return _flex_masked(q, K, V, qpos, kpos, group)
    # every layer of a forward has the same positions: one mask for all of them
    mask = layer.shared("mask", qpos, kpos, make=lambda: kpos[None, :] <= qpos[:, None])  # [T, S]
    if obs.want_probs:
        return _attention_with_probs(q, K, V, mask, obs, layer)
    if q.is_cuda:
        return folded_sdpa(q, K, V, layer.shared("folded mask", qpos, kpos, make=lambda: mask.repeat(group, 1)))
    return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=group > 1)


def folded_sdpa(q, K, V, mask) -> torch.Tensor:
    """SDPA with a [T, S] mask (or that mask already repeated per query head of a KV head, [group x T, S]) and
    GQA: SDPA's memory-efficient kernel takes a mask but not GQA, so each KV head's query heads are folded into its
    rows; K and V are read as stored (repeating them per query head was 4x the bytes and, with the copy, 9 of
    reuse's 54 GPU ms on an H200)."""
    group = q.shape[1] // K.shape[1]
    if group > 1 and mask.shape[0] == q.shape[2]:
        mask = mask.repeat(group, 1)
    out = F.scaled_dot_product_attention(_fold_heads(q, K.shape[1]), K, V, attn_mask=mask)
    return out.view(q.shape)


def _fold_heads(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """q [B, Hq, T, D] as [B, n_kv, group x T, D]: query head h (KV head h // group) becomes rows of its KV head."""
    B, Hq, T, D = q.shape
    return q.reshape(B, n_kv, (Hq // n_kv) * T, D)


# Masked (position-causal) attention on the GPU: "sdpa" runs SDPA's memory-efficient kernel with a dense boolean mask
# (folded_sdpa); "flex" PyTorch's FlexAttention (a compiled flash-style Triton kernel that skips fully masked blocks
# and takes GQA as is); "auto" (default) flex for passes of at least FLEX_MIN_WORK query x slot pairs, sdpa below.
# KVBENCH_RAG_MASKED picks one. Measured on an H200 (benchmarks/rag_profile.py, synthetic Llama-3.1-8B, 8 docs x 2K
# tokens, benchmarks/records/rag-profile-h200-bb4bb8b.txt): auto gave samkv 0.190 s against sdpa's 0.268 s; flex
# costs about 3 ms of host time a call (guards, block-mask metadata), which a 32-token pass cannot hide.
MASKED_KERNEL = os.environ.get("KVBENCH_RAG_MASKED", "auto")
FLEX_MIN_WORK = 2**24  # e.g. 1K recomputed tokens over 16K slots


def masked_kernel(n_queries: int, n_slots: int) -> str:
    """The kernel a masked pass of n_queries over n_slots runs on the GPU (MASKED_KERNEL, "auto" resolved)."""
    if MASKED_KERNEL != "auto":
        return MASKED_KERNEL
    return "flex" if n_queries * n_slots >= FLEX_MIN_WORK else "sdpa"


_block_masks: list = []  # [(qpos, kpos, block mask)] of the last forward: every layer of a Scene shares its positions


def _flex_masked(q, K, V, qpos, kpos, group: int) -> torch.Tensor:
    hit = next((bm for qp, kp, bm in _block_masks if qp is qpos and kp is kpos), None)
    if hit is None:  # the tensors are held in the list, so `is` cannot match a freed tensor's reused address
        hit = position_block_mask(qpos, kpos)
        _block_masks[:] = [(qpos, kpos, hit)]
    return _compiled_flex()(q, K, V, block_mask=hit, enable_gqa=group > 1)


def position_block_mask(qpos: torch.Tensor, kpos: torch.Tensor, block: int = 128):
    """FlexAttention's BlockMask of `kpos[kv] <= qpos[q]` (both sorted), built from block bounds in a few small
    kernels instead of materialising the T x S mask: a key block is skipped when its first position is past the
    query block's last, attended unmasked when its last position is at most the query block's first."""
    from torch.nn.attention.flex_attention import BlockMask

    T, S = len(qpos), len(kpos)
    n_q, n_kv = -(-T // block), -(-S // block)
    kp = F.pad(kpos.long(), (0, n_kv * block - S), value=2 ** 62)  # padding keys: never visible, never full
    qp = F.pad(qpos.long(), (0, n_q * block - T), value=-1)  # padding queries: see nothing (their rows are dropped)
    kb, qb = kp.view(n_kv, block), qp.view(n_q, block)
    n_vis = torch.searchsorted(kb[:, 0].contiguous(), qb.amax(1), right=True)
    n_full = torch.minimum(torch.searchsorted(kb[:, -1].contiguous(), qb[:, 0].contiguous(), right=True), n_vis)
    col = torch.arange(n_kv, device=kp.device)
    partial = (n_full[:, None] + col).clamp(max=n_kv - 1)

    def visible(b, h, q_idx, kv_idx):
        return kp[kv_idx] <= qp[q_idx]

    as4d = lambda t: t[None, None].to(torch.int32).contiguous()  # noqa: E731  [B=1, H=1, ...] broadcast
    return BlockMask.from_kv_blocks(as4d(n_vis - n_full), as4d(partial), as4d(n_full), as4d(col.expand(n_q, -1)),
                                    BLOCK_SIZE=block, mask_mod=visible, seq_lengths=(T, S))


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


# ---------------------------------------------------------------------------------------------------------------
# one query: compose, select, recompute


@dataclass
class Selection:
    """Context slots the cache keeps (positions, sorted; None: all) and positions recomputed (a subset of keep)."""

    keep: torch.Tensor | None
    recompute: torch.Tensor
    facts: dict[str, Any] = field(default_factory=dict)
    cache: Any = None  # a cache a selection pass already built and partly wrote (CacheBlend's check pass)


class Scene:
    """One query over stored documents: the composed context, and the passes RAG methods run over it."""

    def __init__(self, model, prompt: RagPrompt, stored: Stored, rope: Rope | None = None):
        self.model, self.prompt, self.stored = model, prompt, stored
        self.rope = rope or Rope(model)
        self.n_layers = len(stored.prefix)
        self._composed: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def composed(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer k/v [1, Hkv, C, D] of the prefix and every document, each re-rotated to its offset."""
        if self._composed is None:
            P = len(self.prompt.prefix)
            # one shift per document token, so each layer's documents rotate in one pass (launches, not bytes,
            # bound this on a GPU: per document and layer it was 8 x 32 small rotations)
            shift = torch.cat([torch.full((end - start,), start - P) for start, end in self.prompt.spans()])
            with torch.profiler.record_function("rag.compose"):
                pk = self.stored.prefix[0][0]
                cos_sin = self.rope.cos_sin(shift, pk.device, self.rope.work_dtype(pk)) if len(shift) else None
                self._composed = [self._compose_layer(layer, cos_sin) for layer in range(self.n_layers)]
        return self._composed

    def _compose_layer(self, layer: int, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
        (pk, pv), docs = self.stored.prefix[layer], [d[layer] for d in self.stored.docs]
        if not docs:
            return pk, pv
        P = pk.shape[2]
        k = pk.new_empty(pk.shape[0], pk.shape[1], P + len(cos_sin[0]), pk.shape[3])
        k[:, :, :P] = pk
        self.rope.rotate(torch.cat([dk for dk, _ in docs], 2), *cos_sin, out=k[:, :, P:])
        return k, torch.cat([pv] + [dv for _, dv in docs], 2)

    def doc_positions(self) -> torch.Tensor:
        return torch.arange(len(self.prompt.prefix), self.prompt.context_len)

    def empty(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long)

    def cache(self, keep: torch.Tensor | None, method: Method | None = None):
        """A bridge cache over the composed context: PositionedKV layers holding the prefix and the kept document
        tokens (keep: positions, None for all), or `method.compose` layers (single-context methods after reuse)."""
        from kvbench.api import LayerSpec

        layers, shared_pos = [], None  # one positions tensor for every layer (the masked kernel's block-mask cache)
        for i, (k, v) in enumerate(self.composed()):
            if method is None and shared_pos is None:
                shared_pos = torch.arange(k.shape[2])
                if keep is not None:
                    shared_pos = torch.cat([shared_pos[: len(self.prompt.prefix)], keep.cpu()])
                shared_dev = to_device(shared_pos, k.device)
            if method is not None:
                spec = LayerSpec(i, self.n_layers, self.model.config.get_text_config().num_attention_heads,
                                 k.shape[1], k.shape[3], k.dtype, k.device)
                layers.append(method.compose(spec, k, v))
                continue
            if keep is not None:
                k, v = k[:, :, shared_dev], v[:, :, shared_dev]
            layers.append(PositionedKV(k, v, shared_pos, layer_idx=i, pos_dev=shared_dev))
        return layered_cache(self.model, layers)

    def restrict(self, cache, keep: torch.Tensor):
        """A new bridge cache holding only the prefix and the `keep` positions of `cache`'s PositionedKV layers."""
        layers, picked = [], {}  # layers that share one positions tensor share the host-side pick (isin is slow)
        with torch.profiler.record_function("rag.restrict"):
            for layer in cache.layers:
                lc = layer.cache
                if id(lc.pos) not in picked:
                    want = torch.isin(lc.pos, keep.cpu()) | (lc.pos < len(self.prompt.prefix))  # host: no sync
                    pos = lc.pos[want]
                    picked[id(lc.pos)] = lc.pos, pos, to_device(pos, lc.k.device), \
                        to_device(want.nonzero().view(-1), lc.k.device)
                _, pos, pos_dev, idx = picked[id(lc.pos)]
                layers.append(PositionedKV(lc.k[:, :, idx], lc.v[:, :, idx], pos, lc.layer_idx, pos_dev=pos_dev))
        return layered_cache(self.model, layers)

    def forward(self, cache, recompute: torch.Tensor, observer: Observer | None = None,
                with_question: bool = True) -> torch.Tensor:
        """The recomputed context tokens (positions) and the question through the model over `cache`; logits of
        the last position [1, V]."""
        ids = torch.tensor(self.prompt.ids())
        C = self.prompt.context_len
        positions = recompute.sort().values.to(torch.long)
        if with_question:
            positions = torch.cat([positions, torch.arange(C, C + len(self.prompt.question))])
        incoming = to_device(positions, self.model.device)  # moved once: every layer sees the same tensor
        memo: dict = {}
        for layer in cache.layers:
            if isinstance(layer.cache, PositionedKV):
                layer.cache.incoming, layer.cache.incoming_dev, layer.cache.observer = positions, incoming, observer
                layer.cache.memo = memo
        try:
            with torch.profiler.record_function(f"rag.forward[{len(positions)} tokens]"):
                return _forward(self.model, cache, ids[positions], positions)
        finally:
            for layer in cache.layers:
                if isinstance(layer.cache, PositionedKV):
                    layer.cache.incoming = layer.cache.incoming_dev = layer.cache.observer = layer.cache.memo = None

    def ratios(self, sel: Selection) -> dict[str, float]:
        n = self.prompt.doc_tokens
        kept = n if sel.keep is None else len(sel.keep)
        return {"recompute_ratio": len(sel.recompute) / n, "kept_ratio": kept / n}

    def doc_of(self) -> torch.Tensor:
        """Document index of each document position (C - P entries)."""
        return torch.cat([torch.full((len(d),), i) for i, d in enumerate(self.prompt.docs)])


def top_per_doc(scene: Scene, scores: torch.Tensor, share: float) -> torch.Tensor:
    """Positions of the top ceil(share x n) scored tokens of each document (scores over document positions)."""
    out = []
    for (start, end) in scene.prompt.spans():
        P = len(scene.prompt.prefix)
        s = scores[start - P: end - P]
        k = min(len(s), max(1, math.ceil(share * len(s))))
        out.append(start + s.topk(k).indices)
    return torch.cat(out).sort().values
