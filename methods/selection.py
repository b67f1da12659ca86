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

On CUDA (impl triton) every selecting step, eager or pinned, is three Triton kernels and a merge: the scores, query
side included (kernels/score_triton.py), an exact top-k on the device (kernels/topk_select.py; the k of a pinned step
read from the device, its masks applied inside the score kernel) and the attention over the chosen rows read in place
in the bf16 cache (kernels/select_attend.py, quest's pages expanded there), so a graph replay runs the same kernels as
the eager step it stands for; elsewhere PyTorch scores, sorts, gathers and attends. The Triton top-k lists rows in
ascending order and breaks ties to the lower row (the PyTorch path: best first, a stable sort for short rows), so
only the set of rows matters anywhere.
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


def page_slots(rows: torch.Tensor, size: int) -> torch.Tensor:
    """Rows [..., K] of `size` consecutive slots (quest's pages) -> their slots [..., K * size]."""
    if size == 1:
        return rows
    return (rows[..., None] * size + torch.arange(size, device=rows.device)).flatten(-2)


SORT_MAX = 4096  # rows up to this long are ranked by a full sort (one shared-memory bitonic sort per row on CUDA)


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The PyTorch path's top-k: indices of the k largest scores along the last dim, best first. Short rows (quest's
    pages) are sorted whole; a stable sort breaks ties by index, the same way on every call. Longer rows keep topk.
    (On CUDA the methods take kernels/topk_select.py instead.)"""
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


def attend_positions(q: torch.Tensor, kv: FullLayer, idx: torch.Tensor) -> torch.Tensor:
    """Exact attention of q [B, Hq, 1, D] over the positions idx [B, Hkv, N] of a full cache: a PyTorch gather, then
    dense attention (the reference of the Triton path)."""
    i = idx[..., None].expand(-1, -1, -1, q.shape[3])
    return dense_attention(q, kv.keys().gather(2, i), kv.values().gather(2, i), causal=False)


class SelectingLayer(LayerCache):
    """The full cache in `kv`; subclasses keep the summary (`summarize`, `summary`) and score it (`scores`,
    `select_rows`), say when a step selects (`sparse`) and what a selecting step reads (`sparse_bytes`). A row of the
    summary stands for `row_size` consecutive tokens (quest's pages; doublesparse's tokens: 1)."""

    row_size = 1

    def __init__(self, spec: LayerSpec, m: Method):
        from kvbench.kernels.score_triton import use_triton

        self.spec, self.m = spec, m
        self.kv = FullLayer(spec, GROW)
        self.triton = use_triton(m.name, m.impl, spec.device)
        # the last selecting step's rows [B, Hkv, K], the tokens then held, and (a pinned step) the rows attended
        self.last_rows: torch.Tensor | None = None
        self.last_n = 0
        self.last_k: torch.Tensor | None = None

    def summarize(self, lo: int) -> None:
        """Bring the summary up to date for the stored tokens from position lo on."""
        raise NotImplementedError

    def summary(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def sparse(self) -> bool:
        raise NotImplementedError

    def scores(self, q1: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select_rows(self, q1: torch.Tensor) -> torch.Tensor:
        """Rows [B, Hkv, K] a decode step with query q1 [B, Hq, D] attends; a row partly past the live tokens last."""
        raise NotImplementedError

    def sparse_bytes(self) -> int:
        raise NotImplementedError

    def topk_info(self) -> dict:
        """Which top-k ran, for info(): kernels/topk_select.py's path on the Triton impl, else torch."""
        if not self.triton:
            return {"topk": "torch"}
        from kvbench.kernels.topk_select import backend

        return {"topk": backend(self.spec.device)}

    def top(self, scores: torch.Tensor, k, kmax: int | None = None) -> torch.Tensor:
        """The k best rows of scores [B, Hkv, R]; with kmax (a pinned step, k then a device tensor) kmax columns of
        which the first k count. Triton: ascending, ties to the lower row; PyTorch: best first."""
        if self.triton:
            from kvbench.kernels.topk_select import topk_select

            return topk_select(scores, k, kmax)
        return top_indices(scores, k if kmax is None else kmax)

    def select(self, q1: torch.Tensor) -> torch.Tensor:
        """Token positions [B, Hkv, N] a decode step with query q1 [B, Hq, D] attends."""
        return self.tokens(self.select_rows(q1), self.kv.n)

    def tokens(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """The token positions of rows [B, Hkv, K] at n tokens (the last row cut at n)."""
        slots = page_slots(rows, self.row_size)
        return slots[..., : slots.shape[-1] - (-n % self.row_size)]

    def attend_rows(self, q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Exact attention of q [B, Hq, 1, D] over the tokens of rows [B, Hkv, K]: on CUDA one kernel reads them in
        place (kernels/select_attend.py), else a PyTorch gather and dense attention."""
        if self.triton:
            from kvbench.kernels.select_attend import select_attend

            return select_attend(q, self.kv.k, self.kv.v, rows, live=self.kv.n, page=self.row_size)
        return attend_positions(q, self.kv, self.tokens(rows, self.kv.n))

    # --- the capture-safe step (see the module's docstring); subclasses say how rows and budgets relate ---
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

    def reserve(self, n_new: int) -> None:
        self.kv.reserve(n_new)
        cap = self.kv.pin.cap
        self.grow_summary(cap)
        self.k_most = self.rows_attended(cap)  # the most rows any reserved step attends: the top-k's fixed size

    def advance(self, n: int) -> None:
        self.kv.advance(n)

    def _pinned_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pin = self.kv.pin
        if self.dense_layer():
            out = pin.step(q, k, v)
            self.kv.n, self.last_rows = pin.n, None
            return out
        if not capturing(q):
            pin.advance(1)  # the room check, on the host, before anything is written
        append_token(pin.k, pin.v, k, v, pin.seen, pin.live)
        self.kv.n = pin.n
        self.summarize_last(pin.seen)
        k_live = self.rows_attended(pin.seen[:1])  # [1]: the first k_live of the k_most rows are attended
        top = self.top(self.device_scores(q[:, :, 0], pin.seen), k_live, self.k_most)
        self.last_rows, self.last_k = top, k_live
        if self.triton:  # the same kernel as the eager steps' (one reduction order, so replays match them)
            from kvbench.kernels.select_attend import select_attend

            return select_attend(q, pin.k, pin.v, top, k_live * self.row_size, pin.seen, page=self.row_size)
        idx, ok = self._pinned_tokens()
        return attend_masked(q, pin.k, pin.v, idx.clamp(max=pin.cap - 1), ok)

    def _pinned_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last pinned step's token slots [B, Hkv, k_most * row_size] and which of them it attended."""
        idx = page_slots(self.last_rows, self.row_size)
        rank = torch.arange(idx.shape[-1], device=idx.device)
        return idx, (rank < self.last_k * self.row_size) & (idx < self.kv.pin.seen[:, None, None])

    def dense_layer(self) -> bool:
        """A layer that never selects (quest's first layers)."""
        return False

    def prefill(self, q, k, v):
        out = self.kv.prefill(q, k, v)
        self.summarize(0)
        self.last_rows = None
        return out

    def extend(self, q, k, v):
        lo = self.kv.n
        self.last_rows = self.last_k = None
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
        self.last_rows, self.last_n = self.select_rows(q[:, :, 0]), self.kv.n
        return self.attend_rows(q, self.last_rows)

    def nbytes(self) -> int:
        return 0 if self.kv.k is None else self.kv.nbytes() + sum(t.numel() * t.element_size() for t in self.summary())

    def seq_len(self) -> int:
        return self.kv.n

    def attended(self) -> torch.Tensor | None:
        if self.last_rows is None:
            return None
        if self.last_k is not None:  # a pinned step: the chosen positions (the same count in every KV head)
            idx, ok = self._pinned_tokens()
            return idx.masked_select(ok).view(*idx.shape[:2], -1)
        return self.tokens(self.last_rows, self.last_n)

    def decode_fns(self, q):
        if not self.sparse():
            return self.kv.decode_fns(q)
        q1 = q[:, :, 0]
        rows = self.select_rows(q1)
        return {"attention": lambda: self.attend_rows(q, self.select_rows(q1)),
                "score": lambda: self.scores(q1), "select": lambda: self.select_rows(q1),  # select: score and top-k
                "attend": lambda: self.attend_rows(q, rows)}

    def decode_bytes(self) -> int:
        return self.sparse_bytes() if self.sparse() else self.kv.decode_bytes()
