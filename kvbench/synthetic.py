"""Caches filled with synthetic keys and values at a real model's attention shape, built layer by layer within a
memory budget: how the memory, kernels and throughput suites reach 128K-token contexts without a 128K-token prefill.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from kvbench.api import KVBenchError, LayerCache, LayerSpec
from kvbench.device import free_memory
from kvbench.models import SHAPES, Shape

# Prefill queries handed to each layer with synthetic k/v. One query (the last position) takes dense attention's
# unmasked FlashAttention path; a longer tail needs a bottom-right causal mask, which SDPA's flash backend refuses, and
# its math fallback materialises GQA-repeated keys and fp32 scores: 68 GB at 128K x batch 64, far above the cache.
# Raise it (--q-tail 32) for methods whose prefill looks at a window of queries, e.g. SnapKV's observation window.
Q_TAIL = 1
CPU_BUDGET = 64 * 2**20  # CPU runs are small: 64 MiB of cache keeps a search to about a minute per method there


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


class OverBudget(torch.OutOfMemoryError):
    """A build that would exceed the memory budget: recorded exactly like a real out-of-memory."""


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
                limit = CPU_BUDGET
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


def _gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"
