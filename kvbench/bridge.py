"""Run any registered method inside a stock transformers model, through public APIs only.

- `KVBenchCache` is a `transformers.cache_utils.Cache` whose layers wrap our LayerCaches. A layer's `update()` does
  not return tensors: it returns a handle holding the new keys and values and the LayerCache they belong to.
- `kvbench_attention`, registered with `AttentionInterface`, receives that handle and calls prefill/extend, so the
  cache computes attention over what it stores. Its mask function, registered with `AttentionMaskInterface`, builds
  no mask: every LayerCache applies causality itself, and padded batches are refused.
- `get_seq_length()` reports the logical length, so RoPE positions stay right after a method evicts tokens.
- `with_cache(model, cache)` is the keyword argument that hands the cache to `model(...)` and `model.generate(...)`:
  transformers renamed `past_key_values` to `cache` (5.24 warns on the old name, 5.40 drops it), while 5.17, the GPU
  machine's version, ignores `cache=` in forward without a word. Every call site goes through it.

    cache = attach(model, parse_method("full"))
    out = model.generate(input_ids, **with_cache(model, cache), max_new_tokens=64, do_sample=False)
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

from kvbench.api import KVBenchError, LayerCache, LayerSpec, Method
from kvbench.attention import dense_attention

ATTN_IMPLEMENTATION = "kvbench"


class UnsupportedModelError(KVBenchError):
    pass


class PendingKV:
    """What a layer's update() hands to the attention function: this step's keys and values, and their layer."""

    __slots__ = ("layer", "k", "v")

    def __init__(self, layer: "KVBenchLayer", k: torch.Tensor, v: torch.Tensor):
        self.layer, self.k, self.v = layer, k, v

    @property
    def shape(self):  # some model code reads key_states.shape after update(); answer as the new keys would
        return self.k.shape


class KVBenchLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, method: Method, layer_idx: int, n_layers: int, n_heads: int):
        super().__init__()
        self.method, self.layer_idx, self.n_layers, self.n_heads = method, layer_idx, n_layers, n_heads
        self.cache: LayerCache | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, n_kv, _, head_dim = key_states.shape
        spec = LayerSpec(self.layer_idx, self.n_layers, self.n_heads, n_kv, head_dim, key_states.dtype,
                         key_states.device)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.cache = self.method.make_layer(spec)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        handle = PendingKV(self, key_states, value_states)
        return handle, handle

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.cache.seq_len() == 0:
            return self.cache.prefill(q, k, v)
        return self.cache.extend(q, k, v)

    def get_seq_length(self) -> int:
        return self.cache.seq_len() if self.cache is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache = None
        self.is_initialized = False

    def offload(self):  # the LayerCache owns its memory; transformers' offloading would not see it
        pass

    def prefetch(self):
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise KVBenchError("kvbench caches do not support beam search; use greedy or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        raise KVBenchError("kvbench caches cannot be cropped (assisted generation is not supported)")


def check_supported(config) -> None:
    """Refuse, with the reason, architectures whose attention the bridge cannot serve."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = getattr(config, "model_type", "this model")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise UnsupportedModelError(
                f"{name} has {', '.join(other)} layers; kvbench's bridge serves full-attention layers only")
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise UnsupportedModelError(
            f"{name} uses sliding-window attention (sliding_window={config.sliding_window}); kvbench's bridge serves "
            "full causal attention only")
    if getattr(config, "attn_logit_softcapping", None):
        raise UnsupportedModelError(f"{name} soft-caps attention logits; kvbench's methods do not implement that")
    for attr in ("num_attention_heads", "num_hidden_layers"):
        if getattr(config, attr, None) is None:
            raise UnsupportedModelError(f"{name} has no `{attr}` in its config; kvbench needs standard attention")


class KVBenchCache(Cache):
    """A transformers Cache whose every layer is a LayerCache made by `method`."""

    def __init__(self, method: Method, config):
        check_supported(config)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.method = method
        n = config.num_hidden_layers
        super().__init__(layers=[KVBenchLayer(method, i, n, config.num_attention_heads) for i in range(n)])

    def layer_caches(self) -> list[LayerCache]:
        return [layer.cache for layer in self.layers if layer.cache is not None]

    def nbytes(self) -> int:
        """Device bytes held by every layer's cache, metadata included."""
        return sum(c.nbytes() for c in self.layer_caches())

    def reserve(self, n_new: int) -> None:
        """Room for n_new more decode steps in every layer, buffers pinned (capture-safe LayerCaches only)."""
        for c in self.layer_caches():
            c.reserve(n_new)

    def advance(self, n: int) -> None:
        """n graph-replayed steps are about to run: each layer checks its room (raising before the replay writes
        anything) and moves its host counters on."""
        for c in self.layer_caches():
            c.advance(n)


def kvbench_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: query [B, Hq, T, D]; key/value are a PendingKV handle (or plain tensors when
    the model runs without a cache). Returns [B, T, Hq, D] as transformers expects."""
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise UnsupportedModelError("kvbench attention supports neither logit soft-capping nor sliding windows")
    D = query.shape[-1]
    if isinstance(key, PendingKV):
        if scaling is not None and abs(scaling * D**0.5 - 1.0) > 1e-6:
            query = query * (scaling * D**0.5)  # LayerCaches use 1/sqrt(D); fold any other scale into q
        out = key.layer.attend(query, key.k, key.v)
    else:
        out = dense_attention(query, key, value, causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def kvbench_mask(batch_size, q_length, kv_length, *args, attention_mask=None, **kwargs):
    """AttentionMaskInterface function: no mask, since each LayerCache is causal on its own; padding is refused."""
    if attention_mask is not None and attention_mask.dtype == torch.bool and not bool(attention_mask.all()):
        raise KVBenchError("kvbench attention does not support padded batches; give every sequence the same length")
    return None


AttentionInterface.register(ATTN_IMPLEMENTATION, kvbench_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, kvbench_mask)


@functools.cache
def cache_kwarg(model_class: type) -> str:
    """The name under which `model_class.forward` takes the cache: `cache` where the model declares it (transformers
    that renamed it), else `past_key_values`. Read from the signature once per class, not guessed from a version
    number: a model with its own (remote) code may keep the old name on a new transformers."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model, cache: Cache) -> dict[str, Cache]:
    """{name: cache} for `model(..., **with_cache(model, cache))` and `model.generate(...)`, under the name this
    model's transformers takes without a deprecation warning."""
    return {cache_kwarg(type(model)): cache}


def attach(model, method: Method) -> KVBenchCache:
    """Switch `model` to kvbench attention and return a fresh cache for one generation or forward sequence."""
    check_supported(model.config)
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return KVBenchCache(method, model.config)
