"""The one interface: a Method is a validated parameter object that makes one LayerCache per attention layer.

    Method.make_layer(spec) -> LayerCache
    LayerCache.prefill(q, k, v) -> out     # first chunk: causal attention output, stores the compressed state
    LayerCache.extend(q, k, v) -> out      # later tokens (1 = a decode step, > 1 = a question chunk)
    LayerCache.nbytes() -> int             # device bytes the cache really holds, metadata included
    LayerCache.seq_len() -> int            # logical tokens seen (positions continue after eviction)
    LayerCache.capture_safe, reserve(n), advance(n)   # optional: decode steps a CUDA graph can replay (see below)
    Method.compose(spec, k, v) -> LayerCache          # multi-context (RAG): a cache over documents prefilled apart

q is [B, Hq, T, D], k and v are [B, Hkv, T, D], all after RoPE; outputs are [B, Hq, T, D] (prefill also accepts
the queries of only the last Tq < T positions).
The cache owns the attention over what it stores, so a packed cache can attend over its own bits.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from kvbench.errors import KVBenchError, ParamError, UnknownMethodError  # noqa: F401 - re-exported

if TYPE_CHECKING:  # torch is imported where it is used, so checking a method's parameters does not load it
    import torch


class ReservedRoomError(KVBenchError):
    """A capture-safe cache was asked to hold more tokens than reserve() made room for."""

    def __init__(self, what: str, held: int, new: int, room: int):
        super().__init__(f"{what}: {new} more token(s) would exceed the reserved room ({held} held, room for {room}); "
                         "reserve() the steps the run will generate before decoding (nothing was written)")


def capturing(t: torch.Tensor) -> bool:
    """Is t's device stream being captured into a CUDA graph now (so host-side bookkeeping must wait)?"""
    import torch

    return t.is_cuda and torch.cuda.is_current_stream_capturing()


@dataclass(frozen=True)
class LayerSpec:
    """What a method needs to know to build one layer's cache."""

    layer_idx: int
    n_layers: int
    n_heads: int  # query heads, Hq
    n_kv_heads: int  # key/value heads, Hkv
    head_dim: int  # D
    dtype: torch.dtype
    device: torch.device

    @property
    def group(self) -> int:
        """Query heads per KV head (the GQA ratio)."""
        return self.n_heads // self.n_kv_heads


class LayerCache(ABC):
    """One attention layer's cache. It stores what its method keeps and computes attention over it."""

    @abstractmethod
    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """First chunk: k/v [B, Hkv, T, D] -> causal attention output [B, Hq, Tq, D] for q [B, Hq, Tq, D].

        q holds the queries of the last Tq <= T positions: Tq == T inside a model; the kernel and memory suites pass a
        short tail to build long contexts cheaply. Methods that look at prefill queries (e.g. an observation window)
        use the ones they are given."""

    @abstractmethod
    def extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Later tokens, appended after everything seen so far; output [B, Hq, T, D]."""

    # --- the capture-safe decode contract: what lets kvbench.graph_decode capture a whole decode step ---
    #
    # A cache that sets `capture_safe = True` promises, once `reserve(n_new)` has returned, for each of the next
    # n_new one-token extend() calls:
    # - no allocation and no Python-visible shape change: the buffers reserve() made are the ones written and read;
    # - no host synchronisation: lengths and write positions live in device tensors the cache owns and updates in
    #   place, and the attention reads only the live tokens, its length taken from such a tensor;
    # - room is checked on the host before anything is written: a step past the reserved room raises KVBenchError
    #   and leaves the cache as it was;
    # - while the call is being captured (`capturing(q)`), host-side counters (seq_len) are left alone: a graph's
    #   replays run the device work without the Python, so the runner calls `advance(1)` before each replay, which
    #   checks the room and moves the counters on.
    # Everything else (prefill, chunks of T > 1, eager steps) may still allocate and sync. The default is not safe:
    # such caches decode eagerly, and the throughput record says why.
    capture_safe: bool = False

    def reserve(self, n_new: int) -> None:
        """Make room for n_new more one-token steps and pin the buffers (capture-safe caches only)."""
        raise KVBenchError(f"{type(self).__name__} is not capture-safe; it cannot reserve decode room")

    def advance(self, n: int) -> None:
        """n one-token steps are about to run as graph replays: check the reserved room, move host counters on."""
        raise KVBenchError(f"{type(self).__name__} is not capture-safe; its steps cannot be replayed")

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of device memory this cache holds now, every buffer and all metadata included."""

    @abstractmethod
    def seq_len(self) -> int:
        """Logical tokens seen so far (evicted ones included), so RoPE positions stay right."""

    def live_nbytes(self) -> int:
        """Bytes that hold the tokens seen, without preallocated headroom (default: nbytes()). `kvbench generate`
        shows it per token, apart from the bytes reserved."""
        return self.nbytes()

    def attended(self) -> torch.Tensor | None:
        """Logical positions the last extend() attended, [B, Hkv, N] int64; None when it attends every token."""
        return None

    def info(self) -> dict[str, Any]:
        """Facts worth recording about the last call, e.g. which attention backend ran."""
        return {}

    # --- for the kernel suite: time one decode step's attention, and its stages, on the current state ---

    def decode_fns(self, q: torch.Tensor) -> dict[str, Callable[[], Any]]:
        """Closures over the current state for query q [B, Hq, 1, D]. 'attention' runs one decode step's attention
        without appending anything; any other key runs one stage of it (e.g. 'score_select', 'attend') so the suite
        can time stages one by one. Default: none, and the suite times extend() instead."""
        return {}

    def decode_bytes(self) -> int | None:
        """The fewest device bytes one decode step's attention must read or write (its bandwidth floor); None: use
        nbytes()."""
        return None


# ---------------------------------------------------------------------------------------------------------------
# Parameters: declared with param(), checked on construction against the metadata, listed by `kvbench methods`.


def representative(layers: list[LayerCache]) -> LayerCache:
    """The layer whose info() a record carries: the first one not kept dense (quest's and selfindex's first layers
    can be: `dense_layers`), else the first."""
    return next((lay for lay in layers if not lay.info().get("dense")), layers[0])


def param(default: Any, help: str, *, ge=None, gt=None, le=None, lt=None, choices=None, valid: str | None = None):
    """A method parameter: its default, a one-line help text and its valid range."""
    meta = dict(help=help, ge=ge, gt=gt, le=le, lt=lt, choices=tuple(choices) if choices else None, valid=valid)
    return field(default=default, metadata=meta)


def _valid_text(meta: dict) -> str:
    if meta.get("valid"):
        return meta["valid"]
    if meta.get("choices"):
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    parts = []
    for key, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if meta.get(key) is not None:
            parts.append(f"{sym} {meta[key]}")
    return " and ".join(parts) if parts else "any"


def format_value(v: Any) -> str:
    """A parameter value as a spec writes it: 160.0 -> '160', 0.1 -> '0.1', True -> 'True'."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return str(v)


def is_fraction(budget: float) -> bool:
    """Budgets below 1 are fractions of the context; 1 and above are token counts."""
    return 0 < budget < 1


def budget_tokens(budget: float, context: int) -> int:
    """Resolve a budget (fraction of the context, or a token count) to a token count for this context."""
    if is_fraction(budget):
        return max(1, int(math.ceil(budget * context)))
    return int(budget)


def budget_share(budget: float, context: int) -> float:
    """The share of a `context`-token cache a budget (fraction or token count) covers, at most 1."""
    return min(1.0, budget_tokens(budget, context) / context)


BUDGET_VALID = "a fraction of the context in (0, 1), or a whole number of tokens >= 1"


def check_budget(method: str, name: str, value: float) -> None:
    if not (value > 0 and (value < 1 or float(value).is_integer())):
        raise ParamError(method, name, value, BUDGET_VALID)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: str
    default: Any
    valid: str
    help: str


@dataclass(frozen=True)
class Method:
    """Base of every method: a frozen dataclass of parameters, validated on construction."""

    name: ClassVar[str] = ""
    # what kind of method this is, for the report's grouping: "dense", "quantization", "selection" (top-k chosen
    # anew each decode step), "eviction" (tokens dropped for good) or "window"
    family: ClassVar[str] = "dense"

    def budget_fraction(self, context: int) -> float:
        """Fraction of a `context`-token cache that one decode step attends: 1.0 for methods that attend every token
        (full, quantizers). The report pairs accuracy, bytes and speed by this number, never by parameter names."""
        return 1.0

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            expected = hints.get(f.name)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                value = float(value)
            elif expected in (int, float, str, bool) and not isinstance(value, expected):
                raise ParamError(self.name, f.name, value, f"a {expected.__name__}; {_valid_text(meta)}")
            if isinstance(value, bool) and expected is not bool:
                raise ParamError(self.name, f.name, value, _valid_text(meta))
            ok = True
            if meta.get("choices") and value not in meta["choices"]:
                ok = False
            for key, test in (("ge", lambda a, b: a >= b), ("gt", lambda a, b: a > b),
                              ("le", lambda a, b: a <= b), ("lt", lambda a, b: a < b)):
                if meta.get(key) is not None and not test(value, meta[key]):
                    ok = False
            if not ok:
                raise ParamError(self.name, f.name, value, _valid_text(meta))
        self.validate()

    def validate(self) -> None:
        """Checks that span several parameters; raise ParamError."""

    def check_context(self, context: int) -> None:
        """Refuse (KVBenchError) a setting that cannot work on a `context`-token prompt, before a model runs on it,
        e.g. a capacity below the observation window. Default: every context works."""

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        raise NotImplementedError

    def compose(self, spec: LayerSpec, k: torch.Tensor, v: torch.Tensor) -> LayerCache:
        """Multi-context (RAG) extension: a LayerCache over a context composed of independently prefilled parts (a
        shared prefix, then documents), k/v [B, Hkv, N, D] after RoPE at the placed positions 0..N-1 (kvbench.rag
        re-rotates each document to its offset). The next extend() (the question chunk) attends over them; decoding
        goes on through extend() as usual. Default, for every single-context method: that first chunk is the
        method's prefill of the whole context with the chunk's queries only (the query tail prefill accepts), so the
        method compresses the reused context with the question in view. The RAG methods (kvbench.rag) override it."""
        return ComposedContext(self.make_layer(spec), k, v)

    @classmethod
    def describe(cls) -> list[ParamInfo]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            t = hints.get(f.name)
            out.append(ParamInfo(f.name, getattr(t, "__name__", str(t)), f.default, _valid_text(f.metadata),
                                 f.metadata.get("help", "")))
        return out

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def label(self) -> str:
        """'name' or 'name:key=value,...' with the parameters that differ from their defaults; a whole-number float
        prints as an integer (budget=160, not 160.0), so a label reads as the spec a user writes."""
        changed = [f"{f.name}={format_value(getattr(self, f.name))}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return self.name + (":" + ",".join(changed) if changed else "")

    def spec(self) -> str:
        """'name:key=value,...' with every parameter, defaults included: what a plan shows a user."""
        return self.name + "".join((":" if i == 0 else ",") + f"{f.name}={format_value(getattr(self, f.name))}"
                                   for i, f in enumerate(dataclasses.fields(self)))

    def __str__(self) -> str:
        return self.label()


class ComposedContext(LayerCache):
    """Method.compose's default: holds the composed k/v until the first extend(), which becomes inner.prefill over the
    context and that chunk together (q: the chunk's queries, the last positions); then everything goes to inner."""

    def __init__(self, inner: LayerCache, k: torch.Tensor, v: torch.Tensor):
        self.inner, self.k, self.v = inner, k, v

    def prefill(self, q, k, v):
        raise KVBenchError("a composed (RAG) cache already holds its context; feed the question with extend()")

    def extend(self, q, k, v):
        if self.k is None:
            return self.inner.extend(q, k, v)
        import torch  # api.py imports torch lazily (a spec check must not pay for it)

        ctx_k, ctx_v, self.k, self.v = self.k, self.v, None, None
        return self.inner.prefill(q, torch.cat([ctx_k, k], 2), torch.cat([ctx_v, v], 2))

    def nbytes(self) -> int:
        held = 0 if self.k is None else self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
        return held + self.inner.nbytes()

    def seq_len(self) -> int:
        return self.inner.seq_len() if self.k is None else self.k.shape[2]

    def attended(self):
        return self.inner.attended()

    def info(self):
        return self.inner.info()
