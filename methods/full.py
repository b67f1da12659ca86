"""full: dense attention over the uncompressed cache in the model dtype, the baseline every method is measured against.

FlashAttention runs the attention (the `flash-attn` package when importable, else PyTorch SDPA pinned to its
FlashAttention backend on the GPU); `info()` records which backend ran.

Capture-safe: after `reserve(n)` the buffers are pinned, and a one-token extend writes at a device-side position
(`kernels.dense_decode.append_token`) and attends over the live tokens through `kernels.dense_decode.DenseDecoder`
(FlashAttention-2 with a device-side length, or a Triton split-KV kernel), so a CUDA graph can replay it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench import attention
from kvbench.api import LayerCache, LayerSpec, Method, ReservedRoomError, capturing, param
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
    capture_safe = True

    def __init__(self, spec: LayerSpec, grow: int):
        self.spec, self.grow = spec, grow
        self.k: torch.Tensor | None = None  # [B, capacity, Hkv, D]: flash-attn's layout, a free view for SDPA
        self.v: torch.Tensor | None = None
        self.n = 0
        self.pinned = False  # after reserve(): no reallocation, one-token steps through the device-side path
        self.lens: torch.Tensor | None = None  # int32 [B]: tokens held, on the device (pinned only)
        self.decoder: dense_decode.DenseDecoder | None = None
        self.backend = "none"

    def _realloc(self, B: int, cap: int, H: int, D: int, like: torch.Tensor) -> None:
        new_k, new_v = like.new_empty(B, cap, H, D), like.new_empty(B, cap, H, D)
        if self.k is not None:
            new_k[:, : self.n] = self.k[:, : self.n]
            new_v[:, : self.n] = self.v[:, : self.n]
        self.k, self.v = new_k, new_v

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        B, H, T, D = k.shape
        need = self.n + T
        if self.k is None or need > self.k.shape[1]:
            if self.pinned:
                raise ReservedRoomError("full", self.n, T, self.k.shape[1])
            cap = need if self.k is None else max(need, self.k.shape[1] + max(self.grow, self.k.shape[1] // 8))
            self._realloc(B, cap, H, D, k)
        self.k[:, self.n : need] = k.transpose(1, 2)
        self.v[:, self.n : need] = v.transpose(1, 2)
        self.n = need
        if self.pinned:
            self.lens.fill_(need)

    def reserve(self, n_new: int) -> None:
        if self.k is None:
            raise ReservedRoomError("full: reserve() before prefill", 0, n_new, 0)
        if self.n + n_new > self.k.shape[1]:
            B, _, H, D = self.k.shape
            self._realloc(B, self.n + n_new, H, D, self.k)
        self.pinned = True
        self.lens = torch.full((self.k.shape[0],), self.n, dtype=torch.int32, device=self.k.device)
        if self.decoder is None or self.decoder.k is not self.k:
            self.decoder = dense_decode.DenseDecoder(self.k, self.v, self.spec.n_heads)

    def advance(self, n: int) -> None:
        if self.n + n > self.k.shape[1]:
            raise ReservedRoomError("full", self.n, n, self.k.shape[1])
        self.n += n

    def _step(self, q, k, v):
        """One token through the device-side path: no allocation, no sync (graph-capturable)."""
        if not capturing(q):
            self.advance(1)  # checks the room before anything is written
        dense_decode.append_token(self.k, self.v, k, v, self.lens, self.lens)
        self.backend = self.decoder.backend
        return self.decoder(q, self.lens)

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
        if self.pinned and k.shape[2] == 1:
            return self._step(q, k, v)
        return self.prefill(q, k, v)

    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def seq_len(self) -> int:
        return self.n

    def info(self):
        return {"backend": self.backend, "pinned": self.pinned}

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
