"""streaming: keep the first few tokens (attention sinks) and a window of the most recent ones; evict the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench import attention
from kvbench.api import LayerCache, LayerSpec, Method, ReservedRoomError, capturing, param
from kvbench.attention import dense_attention
from kvbench.kernels import dense_decode
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
    # capture-safe: reserve() moves the kept tokens into a fixed ring (slot of position t: t below `sinks`, else
    # sinks + (t - sinks) % window), so a one-token step overwrites exactly the token it evicts, in one kernel
    capture_safe = True

    def __init__(self, sinks: int, window: int, n_heads: int):
        self.sinks, self.window, self.n_heads = sinks, window, n_heads
        self.k = self.v = None  # [B, Hkv, N, D]: the sinks, then the most recent tokens; [B, cap, Hkv, D] ring once
        self.n = 0  # tokens seen                                                       # reserve() has pinned it
        self.attended_len = 0  # tokens the last call attended
        self.pinned = False
        self.seen = self.live = None  # int32 [B] on the device once pinned: tokens seen, tokens held
        self.decoder = None

    def _keep(self, x: torch.Tensor, recent: int) -> list[torch.Tensor]:
        """x [B, Hkv, N, D] as [sinks, its last `recent` tokens] (or [x] when that is all of it)."""
        if x.shape[2] <= self.sinks + recent:
            return [x]
        return [x[:, :, : self.sinks], x[:, :, x.shape[2] - recent :]]

    def prefill(self, q, k, v):
        out = dense_attention(q, k, v, causal=True)  # the prompt itself is attended in full
        self.k, self.v = (torch.cat(self._keep(x, self.window), 2) for x in (k, v))
        self.n, self.attended_len = k.shape[2], k.shape[2]
        return out

    def extend(self, q, k, v):
        if self.pinned:
            if k.shape[2] == 1:
                return self._step(q, k, v)
            self.k, self.v = self._ordered()  # a chunk: the plain path below, then back into the ring
        # evict first, so the new tokens attend to at most sinks + window tokens (as the authors' code does)
        room = max(self.window - k.shape[2], 0)
        self.k = torch.cat(self._keep(self.k, room) + [k], 2)
        self.v = torch.cat(self._keep(self.v, room) + [v], 2)
        self.n += k.shape[2]
        self.attended_len = self.k.shape[2]
        out = dense_attention(q, self.k, self.v, causal=True)
        if self.k.shape[2] > self.sinks + self.window:  # a chunk longer than the window
            self.k, self.v = (torch.cat(self._keep(x, self.window), 2) for x in (self.k, self.v))
        if self.pinned:
            self._to_ring(self.ring_k.shape[1])
            self.seen.fill_(self.n)
            self.live.fill_(min(self.n, self.sinks + self.window))
        return out

    # --- the capture-safe path ---

    def _positions(self) -> list[int]:
        """Positions held now, ascending: the sinks, then the most recent tokens."""
        n, held = self.n, min(self.n, self.sinks + self.window)
        return list(range(n)) if held == n else list(range(self.sinks)) + list(range(n - held + self.sinks, n))

    def _slots(self) -> torch.Tensor:
        s, w = self.sinks, self.window
        return torch.tensor([p if p < s else s + (p - s) % w for p in self._positions()], device=self.k.device)

    def _to_ring(self, cap: int) -> None:
        """Move the ordered [B, Hkv, N, D] tokens into [B, cap, Hkv, D] ring buffers (the pinned ones, if any)."""
        B, H, N, D = self.k.shape
        if N > cap:
            raise ReservedRoomError("streaming", N, 0, cap)
        if not self.pinned:
            self.ring_k, self.ring_v = self.k.new_empty(B, cap, H, D), self.v.new_empty(B, cap, H, D)
        slots = self._slots()
        self.ring_k[:, slots], self.ring_v[:, slots] = self.k.transpose(1, 2), self.v.transpose(1, 2)
        self.k, self.v = self.ring_k, self.ring_v

    def _ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self._slots()
        return self.k[:, slots].transpose(1, 2), self.v[:, slots].transpose(1, 2)

    def reserve(self, n_new: int) -> None:
        if self.k is None:
            raise ReservedRoomError("streaming: reserve() before prefill", 0, n_new, 0)
        if self.pinned:
            self.k, self.v = self._ordered()
            self.pinned = False
        self._to_ring(min(self.sinks + self.window, self.k.shape[2] + n_new))
        self.pinned = True
        B = self.k.shape[0]
        self.seen = torch.full((B,), self.n, dtype=torch.int32, device=self.k.device)
        self.live = torch.full((B,), min(self.n, self.sinks + self.window), dtype=torch.int32, device=self.k.device)
        self.decoder = dense_decode.DenseDecoder(self.k, self.v, self.n_heads)

    def advance(self, n: int) -> None:
        held, cap = min(self.n + n, self.sinks + self.window), self.k.shape[1]
        if held > cap:  # the ring has not reached sinks + window slots yet, and n more would not fit
            raise ReservedRoomError("streaming", self.n, n, cap)
        self.n += n
        self.attended_len = held

    def _step(self, q, k, v):
        if not capturing(q):
            self.advance(1)  # checks the room before anything is written
        dense_decode.append_token(self.k, self.v, k, v, self.seen, self.live, ring=(self.sinks, self.window))
        return self.decoder(q, self.live)

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def seq_len(self) -> int:
        return self.n

    def info(self):
        return {"backend": self.decoder.backend if self.pinned else attention.last_backend, "pinned": self.pinned}

    def attended(self) -> torch.Tensor:
        """Positions the last call attended: the sinks, then the most recent tokens; [B, Hkv, N]."""
        n, m = self.n, self.attended_len
        pos = torch.arange(n) if m == n else torch.cat([torch.arange(self.sinks), torch.arange(n - m + self.sinks, n)])
        B, H = self.k.shape[0], self.k.shape[2 if self.pinned else 1]
        return pos.to(self.k.device).expand(B, H, -1)
