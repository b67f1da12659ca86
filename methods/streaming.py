"""streaming: keep the first few tokens (attention sinks) and a window of the most recent ones; evict the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.api import LayerCache, LayerSpec, Method, param
from kvbench.attention import dense_attention
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
        return StreamingLayer(self.sinks, self.window)


class StreamingLayer(LayerCache):
    def __init__(self, sinks: int, window: int):
        self.sinks, self.window = sinks, window
        self.k = self.v = None  # [B, Hkv, N, D]: the sinks, then the most recent tokens
        self.n = 0  # tokens seen
        self.attended_len = 0  # tokens the last call attended

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
        # evict first, so the new tokens attend to at most sinks + window tokens (as the authors' code does)
        room = max(self.window - k.shape[2], 0)
        self.k = torch.cat(self._keep(self.k, room) + [k], 2)
        self.v = torch.cat(self._keep(self.v, room) + [v], 2)
        self.n += k.shape[2]
        self.attended_len = self.k.shape[2]
        out = dense_attention(q, self.k, self.v, causal=True)
        if self.k.shape[2] > self.sinks + self.window:  # a chunk longer than the window
            self.k, self.v = (torch.cat(self._keep(x, self.window), 2) for x in (self.k, self.v))
        return out

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def seq_len(self) -> int:
        return self.n

    def attended(self) -> torch.Tensor:
        """Positions the last call attended: the sinks, then the most recent tokens; [B, Hkv, N]."""
        n, m = self.n, self.attended_len
        pos = torch.arange(n) if m == n else torch.cat([torch.arange(self.sinks), torch.arange(n - m + self.sinks, n)])
        return pos.to(self.k.device).expand(self.k.shape[0], self.k.shape[1], -1)
