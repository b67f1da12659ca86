"""selection: what quest and doublesparse share. Both keep the full cache (as `full` stores it) plus a small summary of
every token, and at each decode step score the summary, pick the top tokens per KV head and attend exactly over
them; prefill, question chunks and steps whose budget covers everything attend densely, as `full` does."""

from __future__ import annotations

import torch

from kvbench.api import LayerCache, LayerSpec, Method
from kvbench.attention import dense_attention
from kvbench.methods.full import FullLayer

GROW = 256  # tokens of headroom, as `full` grows


def attend_positions(q: torch.Tensor, kv: FullLayer, idx: torch.Tensor) -> torch.Tensor:
    """Exact attention of q [B, Hq, 1, D] over the positions idx [B, Hkv, N] of a full cache."""
    i = idx[..., None].expand(-1, -1, -1, q.shape[3])
    return dense_attention(q, kv.keys().gather(2, i), kv.values().gather(2, i), causal=False)


class SelectingLayer(LayerCache):
    """The full cache in `kv`; subclasses keep the summary (`summarize`, `summary`) and score it (`scores`,
    `select`), and say when a step selects (`sparse`) and what a selecting step reads (`sparse_bytes`)."""

    def __init__(self, spec: LayerSpec, m: Method):
        from kvbench.kernels.score_triton import use_triton

        self.spec, self.m = spec, m
        self.kv = FullLayer(spec, GROW)
        self.triton = use_triton(m.name, m.impl, spec.device)
        self.last_idx: torch.Tensor | None = None

    def summarize(self, lo: int) -> None:
        """Bring the summary up to date for the stored tokens from position lo on."""
        raise NotImplementedError

    def summary(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def sparse(self) -> bool:
        raise NotImplementedError

    def scores(self, q1: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select(self, q1: torch.Tensor) -> torch.Tensor:
        """Positions [B, Hkv, N] a decode step with query q1 [B, Hq, D] attends."""
        raise NotImplementedError

    def sparse_bytes(self) -> int:
        raise NotImplementedError

    def prefill(self, q, k, v):
        out = self.kv.prefill(q, k, v)
        self.summarize(0)
        self.last_idx = None
        return out

    def extend(self, q, k, v):
        lo = self.kv.n
        self.last_idx = None
        if q.shape[2] > 1:  # a question chunk attends densely (causal within it)
            out = self.kv.extend(q, k, v)
            self.summarize(lo)
            return out
        self.kv._append(k, v)
        self.summarize(lo)
        if not self.sparse():  # a dense layer, or the budget covers every token: full's path
            return dense_attention(q, self.kv.keys(), self.kv.values(), causal=False)
        self.last_idx = self.select(q[:, :, 0])
        return attend_positions(q, self.kv, self.last_idx)

    def nbytes(self) -> int:
        return 0 if self.kv.k is None else self.kv.nbytes() + sum(t.numel() * t.element_size() for t in self.summary())

    def seq_len(self) -> int:
        return self.kv.n

    def attended(self) -> torch.Tensor | None:
        return self.last_idx

    def decode_fns(self, q):
        if not self.sparse():
            return self.kv.decode_fns(q)
        q1 = q[:, :, 0]
        idx = self.select(q1)
        return {"attention": lambda: attend_positions(q, self.kv, self.select(q1)), "score": lambda: self.scores(q1),
                "attend": lambda: attend_positions(q, self.kv, idx)}

    def decode_bytes(self) -> int:
        return self.sparse_bytes() if self.sparse() else self.kv.decode_bytes()
