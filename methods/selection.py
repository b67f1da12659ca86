"""selection: what quest and doublesparse share. Both keep the full cache (as `full` stores it) plus a small summary of
every token, and at each decode step score the summary, pick the top tokens per KV head and attend exactly over
them; prefill, question chunks and steps whose budget covers everything attend densely, as `full` does.

Capture-safe: `reserve(n)` pins the full cache (`full`'s PinnedKV) and sizes the summary for the n more tokens. A
one-token step then writes the token at the device-side count, updates its summary row there, scores every row of
the summary buffer with the rows not yet live masked out, takes a top-k of the most rows any reserved step may
attend (fixed by reserve), keeps the first k of them (k computed on the device from the live length, so the budget
follows the context as on the eager path) and attends over their tokens with the positions past the live length
masked: no host sync, no shape that changes, so a CUDA graph can replay it. The tokens chosen are the eager path's
(up to ties in the scores); the softmax runs over a fixed-size gathered set, with the rest masked.

On CUDA (impl triton) every selecting step, eager or pinned, attends through one Triton kernel that reads the chosen
rows in place in the bf16 cache (kernels/select_attend.py; the pinned step passes its bounds as device tensors), so a
graph replay runs the same reduction as the eager step it stands for; elsewhere PyTorch gathers and attends.
"""

from __future__ import annotations

import torch

from kvbench.api import LayerCache, LayerSpec, Method, budget_tokens, capturing, is_fraction
from kvbench.attention import dense_attention
from kvbench.kernels.dense_decode import append_token
from kvbench.methods.full import FullLayer

GROW = 256  # tokens of headroom, as `full` grows


def tokens_of_budget(budget: float, n):
    """budget_tokens for n an int, or for n a device tensor (then on the device, in float64 as Python computes)."""
    if not isinstance(n, torch.Tensor):
        return budget_tokens(budget, n)
    if is_fraction(budget):
        return torch.ceil(n.double() * budget).clamp(min=1).long()
    return torch.full_like(n, int(budget), dtype=torch.long)


SORT_MAX = 4096  # rows up to this long are ranked by a full sort (one shared-memory bitonic sort per row on CUDA)


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last dim, best first. Short rows (quest's pages: 2,048 at 32K) are
    sorted whole, which PyTorch does per row in shared memory, where topk's radix select makes several passes over
    each row (it was most of quest's selection time on an H200); a stable sort also breaks ties by index, the same
    way on every call. Longer rows (a top-k over tokens) keep topk."""
    if scores.shape[-1] <= SORT_MAX:
        return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return scores.topk(k, dim=-1).indices


def attend_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor):
    """Attention of q [B, Hq, 1, D] over the slots idx [B, Hkv, N] of k, v [B, cap, Hkv, D], those where ok [B, Hkv, N]
    is False left out (fp32 softmax) -> [B, Hq, 1, D]."""
    B, Hq, _, D = q.shape
    H = idx.shape[1]
    i = idx[..., None].expand(-1, -1, -1, D)
    kk, vv = k.transpose(1, 2).gather(2, i).float(), v.transpose(1, 2).gather(2, i).float()  # [B, Hkv, N, D]
    s = q.float().reshape(B, H, Hq // H, D) @ kk.transpose(-1, -2) * D**-0.5  # [B, Hkv, g, N]
    p = s.masked_fill(~ok[:, :, None], float("-inf")).softmax(-1)
    return (p @ vv).view(B, Hq, 1, D).to(q.dtype)


def attend_positions(q: torch.Tensor, kv: FullLayer, idx: torch.Tensor, triton: bool = False) -> torch.Tensor:
    """Exact attention of q [B, Hq, 1, D] over the positions idx [B, Hkv, N] of a full cache: with `triton` one
    kernel reads the chosen rows in place (kernels/select_attend.py), else a PyTorch gather then dense attention."""
    if triton:
        from kvbench.kernels.select_attend import select_attend

        return select_attend(q, kv.k, kv.v, idx)
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
        self.last_ok: torch.Tensor | None = None  # after a pinned step: which of last_idx were attended

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

    # --- the capture-safe step (see the module's docstring); subclasses say how rows, tokens and budgets relate ---
    capture_safe = True

    def grow_summary(self, tokens: int) -> None:
        """Make the summary buffers hold `tokens` tokens (copying what they hold)."""
        raise NotImplementedError

    def summarize_last(self, seen: torch.Tensor) -> None:
        """Update the summary for the token at position seen - 1 (seen: int32 [B] on the device, equal entries)."""
        raise NotImplementedError

    def device_scores(self, q1: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Scores [B, Hkv, R] of every row of the summary buffer; rows past the live ones -inf, rows that must be
        attended +inf."""
        raise NotImplementedError

    def rows_attended(self, n) -> torch.Tensor | int:
        """Rows a step attends at n tokens (n an int, or a device tensor: then computed on the device)."""
        raise NotImplementedError

    def row_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """Token positions [B, Hkv, N] of the rows [B, Hkv, K]."""
        raise NotImplementedError

    def reserve(self, n_new: int) -> None:
        self.kv.reserve(n_new)
        cap = self.kv.pin.cap
        self.grow_summary(cap)
        self.k_most = self.rows_attended(cap)  # the most rows any reserved step attends: the top-k's fixed size
        self.ranks = torch.arange(self.k_most, device=self.kv.k.device)

    def advance(self, n: int) -> None:
        self.kv.advance(n)

    def _pinned_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pin = self.kv.pin
        if self.dense_layer():
            out = pin.step(q, k, v)
            self.kv.n, self.last_idx = pin.n, None
            return out
        if not capturing(q):
            pin.advance(1)  # the room check, on the host, before anything is written
        append_token(pin.k, pin.v, k, v, pin.seen, pin.live)
        self.kv.n = pin.n
        self.summarize_last(pin.seen)
        top = top_indices(self.device_scores(q[:, :, 0], pin.seen), self.k_most)  # best first
        idx = self.row_tokens(top)
        k_live = self.rows_attended(pin.seen[:1])  # [1]: the first k of the k_most rows are attended
        per_row = idx.shape[-1] // self.k_most
        keep = (self.ranks < k_live)[None, None].repeat_interleave(per_row, dim=-1)
        ok = keep & (idx < pin.seen[:, None, None])
        self.last_idx, self.last_ok = idx, ok
        if self.triton:  # the same kernel as the eager steps' (one reduction order, so replays match them)
            from kvbench.kernels.select_attend import select_attend

            return select_attend(q, pin.k, pin.v, idx, k_live * per_row, pin.seen)
        return attend_masked(q, pin.k, pin.v, idx.clamp(max=pin.cap - 1), ok)

    def dense_layer(self) -> bool:
        """A layer that never selects (quest's first layers)."""
        return False

    def prefill(self, q, k, v):
        out = self.kv.prefill(q, k, v)
        self.summarize(0)
        self.last_idx = None
        return out

    def extend(self, q, k, v):
        lo = self.kv.n
        self.last_idx = self.last_ok = None
        if self.kv.pin is not None and q.shape[2] == 1:
            return self._pinned_step(q, k, v)
        if q.shape[2] > 1:  # a question chunk attends densely (causal within it)
            out = self.kv.extend(q, k, v)
            self.summarize(lo)
            return out
        self.kv._append(k, v)
        self.summarize(lo)
        if not self.sparse():  # a dense layer, or the budget covers every token: full's path
            return dense_attention(q, self.kv.keys(), self.kv.values(), causal=False)
        self.last_idx = self.select(q[:, :, 0])
        return attend_positions(q, self.kv, self.last_idx, self.triton)

    def nbytes(self) -> int:
        return 0 if self.kv.k is None else self.kv.nbytes() + sum(t.numel() * t.element_size() for t in self.summary())

    def seq_len(self) -> int:
        return self.kv.n

    def attended(self) -> torch.Tensor | None:
        if self.last_ok is not None:  # a pinned step: the chosen positions (the same count in every KV head)
            return self.last_idx.masked_select(self.last_ok).view(*self.last_idx.shape[:2], -1)
        return self.last_idx

    def decode_fns(self, q):
        if not self.sparse():
            return self.kv.decode_fns(q)
        q1 = q[:, :, 0]
        idx = self.select(q1)
        return {"attention": lambda: attend_positions(q, self.kv, self.select(q1), self.triton),
                "score": lambda: self.scores(q1), "select": lambda: self.select(q1),  # select: score and top-k
                "attend": lambda: attend_positions(q, self.kv, idx, self.triton)}

    def decode_bytes(self) -> int:
        return self.sparse_bytes() if self.sparse() else self.kv.decode_bytes()
