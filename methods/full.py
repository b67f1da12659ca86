"""full: dense attention over the uncompressed cache in the model dtype, the baseline every method is measured against.

FlashAttention runs the attention (the `flash-attn` package when importable, else PyTorch SDPA pinned to its
FlashAttention backend on the GPU); `info()` records which backend ran.

Capture-safe: `reserve(n)` moves the buffers into a `kernels.dense_decode.PinnedKV`; a one-token extend then writes
at a device-side position and attends over the live tokens with the length read on the device (FlashAttention-2's
variable-length kernel, or a Triton split-KV kernel), so a CUDA graph can replay it. Eager steps (no reserve) keep
FlashAttention over a view of the live tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench import attention
from kvbench.api import LayerCache, LayerSpec, Method, ReservedRoomError, param
from kvbench.kernels import dense_decode
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
    capture_safe = True  # reserve() moves the buffers into a PinnedKV: one-token steps a CUDA graph can replay

    def __init__(self, spec: LayerSpec, grow: int):
        self.spec, self.grow = spec, grow
        self.k: torch.Tensor | None = None  # [B, capacity, Hkv, D]: flash-attn's layout, a free view for SDPA
        self.v: torch.Tensor | None = None
        self.n = 0
        self.pin: dense_decode.PinnedKV | None = None  # after reserve(): the buffers, pinned, with device counters
        self.backend = "none"

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        B, H, T, D = k.shape
        need = self.n + T
        if self.pin is not None:
            self.pin.advance(T)  # raises before any write when the reserved room is short
        elif self.k is None or need > self.k.shape[1]:
            cap = need if self.k is None else max(need, self.k.shape[1] + max(self.grow, self.k.shape[1] // 8))
            new_k, new_v = k.new_empty(B, cap, H, D), v.new_empty(B, cap, H, D)
            if self.k is not None:
                new_k[:, : self.n] = self.k[:, : self.n]
                new_v[:, : self.n] = self.v[:, : self.n]
            self.k, self.v = new_k, new_v
        self.k[:, self.n : need] = k.transpose(1, 2)
        self.v[:, self.n : need] = v.transpose(1, 2)
        self.n = need
        if self.pin is not None:
            self.pin.seen.fill_(need)

    def reserve(self, n_new: int) -> None:
        if self.k is None:
            raise ReservedRoomError("full: reserve() before prefill", 0, n_new, 0)
        self.pin = dense_decode.PinnedKV(self.keys(), self.values(), list(range(self.n)), self.n, self.n + n_new,
                                         self.spec.n_heads)
        self.k, self.v = self.pin.k, self.pin.v  # position p in slot p: keys() and values() stay plain views

    def advance(self, n: int) -> None:
        self.pin.advance(n)
        self.n = self.pin.n

    def keys(self) -> torch.Tensor:
        """[B, Hkv, T, D] view of the stored keys."""
        return self.k[:, : self.n].transpose(1, 2)

    def values(self) -> torch.Tensor:
        return self.v[:, : self.n].transpose(1, 2)

    def prefill(self, q, k, v):
        self._append(k, v)
        out = attention.dense_attention(q, self.keys(), self.values(), causal=True)
        self.backend = attention.last_backend
        return out

    def extend(self, q, k, v):
        if self.pin is not None and k.shape[2] == 1:
            out = self.pin.step(q, k, v)
            self.n, self.backend = self.pin.n, self.pin.decoder.backend
            return out
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
        return {"backend": self.backend, "pinned": self.pin is not None}

    def decode_fns(self, q):
        """'attention': the eager step's kernel (FlashAttention over the live view); 'graph_attention': the kernel a
        captured step runs (DenseDecoder, the live length read from the device), so the kernel suite shows the two
        side by side on the same cache."""
        k, v = self.keys(), self.values()
        decoder = dense_decode.DenseDecoder(self.k, self.v, self.spec.n_heads)
        lens = torch.full((self.k.shape[0],), self.n, dtype=torch.int32, device=self.k.device)
        return {"attention": lambda: attention.dense_attention(q, k, v, causal=False),
                "graph_attention": lambda: decoder(q, lens)}

    def decode_bytes(self) -> int:
        # every stored key and value is read once
        es = self.k.element_size()
        return 2 * self.k.shape[0] * self.n * self.k.shape[2] * self.k.shape[3] * es
