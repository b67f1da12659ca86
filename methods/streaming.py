"""streaming: keep the first few tokens (attention sinks) and a window of the most recent ones; evict the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench import attention
from kvbench.api import LayerCache, LayerSpec, Method, ReservedRoomError, param
from kvbench.attention import dense_attention
from kvbench.kernels.dense_decode import PinnedKV
from kvbench.registry import register


@register
@dataclass(frozen=True)
class Streaming(Method):
    """streaming: attention sinks plus a sliding window of recent tokens (StreamingLLM).

    Based on Efficient Streaming Language Models with Attention Sinks (Xiao et al., ICLR 2024),
    https://arxiv.org/abs/2309.17453. Keys are cached after RoPE, so positions are not re-encoded.

    Parameters
    ----------
    sinks : int, default 4
        First tokens always kept.
    window : int, default 1020
        Most recent tokens kept; a new token attends to at most sinks + window tokens, itself included.
    """

    name = "streaming"
    family = "window"
    sinks: int = param(4, "first tokens always kept (attention sinks)", ge=0)
    window: int = param(1020, "most recent tokens kept", ge=1)

    def budget_fraction(self, context: int) -> float:
        return min(1.0, (self.sinks + self.window) / context)

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        return StreamingLayer(self.sinks, self.window, spec.n_heads)


class StreamingLayer(LayerCache):
    # reserve() moves the kept tokens into a ring (PinnedKV) where each one-token step overwrites the token it evicts
    # in one kernel and attends with the length read on the device, so CUDA graphs can replay the step
    capture_safe = True

    def __init__(self, sinks: int, window: int, n_heads: int):
        self.sinks, self.window, self.n_heads = sinks, window, n_heads
        self.k = self.v = None  # [B, Hkv, N, D]: the sinks, then the most recent tokens (None once pinned)
        self.pin: PinnedKV | None = None  # the ring, after reserve()
        self.n = 0  # tokens seen
        self.attended_len = 0  # tokens the last call attended

    def _keep(self, x: torch.Tensor, recent: int) -> list[torch.Tensor]:
        """x [B, Hkv, N, D] as [sinks, its last `recent` tokens] (or [x] when that is all of it)."""
        if x.shape[2] <= self.sinks + recent:
            return [x]
        return [x[:, :, : self.sinks], x[:, :, x.shape[2] - recent :]]

    def _positions(self) -> list[int]:
        """Positions held now: the sinks, then the most recent tokens."""
        n, held = self.n, min(self.n, self.sinks + self.window)
        return list(range(n)) if held == n else list(range(self.sinks)) + list(range(n - held + self.sinks, n))

    def prefill(self, q, k, v):
        out = dense_attention(q, k, v, causal=True)  # the prompt itself is attended in full
        self.k, self.v = (torch.cat(self._keep(x, self.window), 2) for x in (k, v))
        self.n, self.attended_len = k.shape[2], k.shape[2]
        return out

    def extend(self, q, k, v):
        if self.pin is not None:
            if k.shape[2] == 1:
                out = self.pin.step(q, k, v)
                self.n, self.attended_len = self.pin.n, self.pin.held
                return out
            self.k, self.v = self.pin.ordered(self._positions())  # a chunk: the plain path, then back in the ring
        # evict first, so the new tokens attend to at most sinks + window tokens (as the authors' code does)
        room = max(self.window - k.shape[2], 0)
        self.k = torch.cat(self._keep(self.k, room) + [k], 2)
        self.v = torch.cat(self._keep(self.v, room) + [v], 2)
        self.n += k.shape[2]
        self.attended_len = self.k.shape[2]
        out = dense_attention(q, self.k, self.v, causal=True)
        if self.k.shape[2] > self.sinks + self.window:  # a chunk longer than the window
            self.k, self.v = (torch.cat(self._keep(x, self.window), 2) for x in (self.k, self.v))
        if self.pin is not None:
            self.pin.load(self.k, self.v, self._positions(), self.n)
            self.k = self.v = None
        return out

    def reserve(self, n_new: int) -> None:
        if self.k is None and self.pin is None:
            raise ReservedRoomError("streaming: reserve() before prefill", 0, n_new, 0)
        k, v = (self.k, self.v) if self.pin is None else self.pin.ordered(self._positions())
        cap = min(self.sinks + self.window, k.shape[2] + n_new)
        self.pin = PinnedKV(k, v, self._positions(), self.n, cap, self.n_heads, ring=(self.sinks, self.window))
        self.k = self.v = None

    def advance(self, n: int) -> None:
        self.pin.advance(n)
        self.n, self.attended_len = self.pin.n, self.pin.held

    def nbytes(self) -> int:
        if self.pin is not None:
            return self.pin.nbytes()
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def seq_len(self) -> int:
        return self.n

    def info(self):
        return {"backend": self.pin.decoder.backend if self.pin else attention.last_backend, "pinned": bool(self.pin)}

    def decode_fns(self, q):
        """One step's attention over the kept tokens, appending nothing: the kernel suite times this instead of
        extend(), whose eager cat of the whole window per call measured the timing path, not the method."""
        if self.pin is not None:
            return {"attention": lambda: self.pin.decoder(q, self.pin.live)}
        k, v = self.k, self.v
        return {"attention": lambda: dense_attention(q, k, v, causal=False)}

    def decode_bytes(self) -> int:
        k = self.k if self.pin is None else self.pin.k[:, : self.pin.held]  # the kept keys; values as many
        return 2 * k.numel() * k.element_size()

    def attended(self) -> torch.Tensor:
        """Positions the last call attended: the sinks, then the most recent tokens; [B, Hkv, N]."""
        n, m = self.n, self.attended_len
        pos = torch.arange(n) if m == n else torch.cat([torch.arange(self.sinks), torch.arange(n - m + self.sinks, n)])
        ref = self.k if self.pin is None else self.pin.k.transpose(1, 2)  # [B, Hkv, ., D]
        return pos.to(ref.device).expand(ref.shape[0], ref.shape[1], -1)
