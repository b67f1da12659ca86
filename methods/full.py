"""full: dense attention over the uncompressed cache in the model dtype, the baseline every method is measured against.

FlashAttention runs the attention (the `flash-attn` package when importable, else PyTorch SDPA pinned to its
FlashAttention backend on the GPU); `info()` records which backend ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench import attention
from kvbench.api import LayerCache, LayerSpec, Method, param
from kvbench.registry import register


@register
@dataclass(frozen=True)
class Full(Method):
    """full: keep every key and value in the model dtype.

    Parameters
    ----------
    grow : int, default 256
        Tokens of headroom added when a decode step outgrows the buffer (at least 1/8 of its size), so appends
        copy the cache rarely. Prefill allocates exactly the prompt.
    """

    name = "full"
    grow: int = param(256, "tokens of headroom added when decoding outgrows the buffer", ge=1)

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        return FullLayer(spec, self.grow)


class FullLayer(LayerCache):
    def __init__(self, spec: LayerSpec, grow: int):
        self.spec, self.grow = spec, grow
        self.k: torch.Tensor | None = None  # [B, capacity, Hkv, D]: flash-attn's layout, a free view for SDPA
        self.v: torch.Tensor | None = None
        self.n = 0

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        B, H, T, D = k.shape
        need = self.n + T
        if self.k is None or need > self.k.shape[1]:
            cap = need if self.k is None else max(need, self.k.shape[1] + max(self.grow, self.k.shape[1] // 8))
            new_k = k.new_empty(B, cap, H, D)
            new_v = v.new_empty(B, cap, H, D)
            if self.k is not None:
                new_k[:, : self.n] = self.k[:, : self.n]
                new_v[:, : self.n] = self.v[:, : self.n]
            self.k, self.v = new_k, new_v
        self.k[:, self.n : need] = k.transpose(1, 2)
        self.v[:, self.n : need] = v.transpose(1, 2)
        self.n = need

    def keys(self) -> torch.Tensor:
        """[B, Hkv, T, D] view of the stored keys."""
        return self.k[:, : self.n].transpose(1, 2)

    def values(self) -> torch.Tensor:
        return self.v[:, : self.n].transpose(1, 2)

    def prefill(self, q, k, v):
        self._append(k, v)
        return attention.dense_attention(q, self.keys(), self.values(), causal=True)

    def extend(self, q, k, v):
        return self.prefill(q, k, v)

    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def live_nbytes(self) -> int:
        """The bytes of the n tokens held, without the headroom nbytes() counts."""
        return 0 if self.k is None else 2 * self.k[:, : self.n].numel() * self.k.element_size()

    def seq_len(self) -> int:
        return self.n

    def info(self):
        return {"backend": attention.last_backend}

    def decode_fns(self, q):
        k, v = self.keys(), self.values()
        return {"attention": lambda: attention.dense_attention(q, k, v, causal=False)}

    def decode_bytes(self) -> int:
        # every stored key and value is read once
        es = self.k.element_size()
        return 2 * self.k.shape[0] * self.n * self.k.shape[2] * self.k.shape[3] * es
