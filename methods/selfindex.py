"""selfindex: the self-indexing 1-bit VQ KV cache. Keys keep their sign bits; groups of 4 signs name a centroid of a
tiny per-head codebook, and a lookup over those bits picks the tokens each decode step attends to.

Based on "Self-Indexing KVCache: Predicting Sparse Attention from Compressed Keys", Yang, Zhang, Zhao, Chen, Tang,
AAAI 2026 (https://arxiv.org/abs/2603.14224), as restated in kvbench's specs/selfindex.md, without the faults of its
reference code: any batch, any GQA ratio, head_dim 64 or 128, bf16 and fp16, no cap on generated tokens, and a recent
window kept apart from the selection budget so the prompt is still searched after hundreds of generated tokens.

Per layer and KV head the cache holds (kernels/selfindex.py has the exact layouts):
- the prompt's per-channel centre mu (median or mean) and, for 2+1, per-channel max |k - mu| over the tokens
  compressed at prefill (not the full-precision set: a large-norm sink would stretch every token's 2-bit scale);
- a codebook of 16 centroids per group of 4 channels, from the prompt's centred keys;
- packed sign bits of every token (16 bytes per token at head_dim 128): the index;
- "2+1": sign + 2-bit magnitude for keys, 2-bit values (112 bytes per token at head_dim 128, against 512 for fp16
  K+V); "16+1": fp16/bf16 keys and values plus the index;
- a full-precision set, always attended: `sinks` fixed tokens (the first ones, or the ones the last prompt query
  attends most) and a recent window of `window` tokens that slides with decoding.

A decode step appends the token, scores every selectable token with an 8-bit LUT over its sign codes (the GQA-mean
query against the codebook), takes the top tokens per KV head, and attends exactly over the full-precision set and
the selected tokens (dequantized on the fly in 2+1). kernels/selfindex.py's IndexedKV owns the storage and runs each
step on CUDA tensors as a kernel (pack, append, score-and-select in kernels/csrc/selfindex.cu, the sparse attention in
kernels/selfindex_attend.py) and elsewhere as the PyTorch reference of the same name.

Capture-safe (CUDA kernels, impl=auto): reserve(n) works out every reserved step's host values (position, window slot,
the token leaving the window, selectable range, selection size: the budget of each step's context, exactly as an
eager step computes it) into a table on the device, and pins every buffer and scratch a step uses; a step copies its
row into place on the device and launches the same kernels with the same arguments every time, the selection into a
buffer sized for the largest step's, the attention reading how much of it is live from the device. So a CUDA graph
replays it, and a replay is the eager step. The selection itself is deterministic (ties in the threshold bin are
taken lowest position first), so the same state always attends the same tokens in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench import attention
from kvbench.api import (BUDGET_VALID, LayerCache, LayerSpec, Method, ParamError, ReservedRoomError, budget_share,
                         budget_tokens, capturing, check_budget, param)
from kvbench.kernels import selfindex as ops
from kvbench.methods.full import Full, FullLayer
from kvbench.registry import register


@register
@dataclass(frozen=True)
class SelfIndex(Method):
    """selfindex: 1-bit sign keys that index themselves; top-k by a codebook lookup, exact attention over the picks.

    Based on Yang et al., AAAI 2026, https://arxiv.org/abs/2603.14224

    Parameters
    ----------
    budget : float, default 0.1
        Tokens attended per decode step, the full-precision set included: a fraction of the context (< 1) or a
        token count (>= 1). The paper used 64 fixed + 96 selected = 160 tokens (LongBench) and 7.5% (RULER).
    setting : str, default "2+1"
        "2+1": sign + 2-bit key magnitude, 2-bit values; "16+1": fp16/bf16 keys and values plus the 1-bit index.
    sinks : int, default 32
        Fixed full-precision tokens.
    window : int, default 32
        Most recent tokens kept in full precision, sliding with decoding, apart from the selection budget.
    fixed : str, default "scored"
        "scored": the `sinks` prompt tokens the last prompt query attends most (the paper's 2+1 setting);
        "sinks": the first `sinks` tokens. The default follows the standard accuracy profile on the embedded model
        (reports/data/cpu/accuracy-standard.jsonl, 10% budget, 144 cells per protocol): scored 0.58
        query-aware / 0.46 query-agnostic against 0.49 / 0.47 for the first tokens.
    centre : str, default "median"
        Per-channel centre subtracted from keys before taking signs: "median" or "mean" over the prompt.
    dense_layers : int, default 0
        The first layers keep full's cache (keys and values in the model dtype, dense attention), as Quest keeps its
        first two; not in the self-indexing paper (0: none, the paper's method). On the embedded model layer 0 is
        where selection misses most, yet keeping it whole changed almost no answer
        (reports/data/cpu/accuracy-selfindex-dense.jsonl: 0.600 / 0.488 against 0.619 / 0.475 on the same cells).
    impl : str, default "auto"
        "auto": CUDA kernels on CUDA tensors, the PyTorch reference elsewhere; "torch": always the reference.
    """

    name = "selfindex"
    family = "selection"
    budget: float = param(0.1, "tokens attended per step incl. the full-precision set", valid=BUDGET_VALID)
    setting: str = param("2+1", "storage: 2+1 (2-bit K magnitude and V) or 16+1 (fp16 K/V + index)",
                         choices=("2+1", "16+1"))
    sinks: int = param(32, "fixed full-precision tokens", ge=0, le=4096)
    window: int = param(32, "recent full-precision tokens, sliding", ge=1, le=4096)
    fixed: str = param("scored", "which tokens are fixed: the last prompt query's top ones, or the first ones",
                       choices=("sinks", "scored"))
    centre: str = param("median", "per-channel key centre", choices=("median", "mean"))
    dense_layers: int = param(0, "first layers kept whole (full's cache, dense attention)", ge=0)
    impl: str = param("auto", "auto: CUDA kernels on GPU tensors; torch: the reference", choices=("auto", "torch"))

    def validate(self) -> None:
        check_budget(self.name, "budget", self.budget)
        if self.budget >= 1 and self.budget < self.sinks + self.window:
            raise ParamError(self.name, "budget", self.budget,
                             f"a fraction, or at least sinks + window = {self.sinks + self.window} tokens "
                             "(the budget counts the full-precision set)")

    def budget_fraction(self, context: int) -> float:
        return budget_share(self.budget, context)

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        if spec.head_dim % 32 != 0:
            raise ParamError(self.name, "head_dim", spec.head_dim, "a multiple of 32 (64 and 128 are tested)")
        if spec.layer_idx < self.dense_layers:
            return DenseLayer(spec, Full().grow)
        return SelfIndexLayer(spec, self)


class DenseLayer(FullLayer):
    """One of the first `dense_layers` layers: full's cache, marked so the suites' records can tell it apart."""

    def info(self):
        return {**super().info(), "dense": True}


class SelfIndexLayer(LayerCache):
    """The method's policy over an IndexedKV (kernels/selfindex.py, which owns the storage and runs each operation on
    CUDA or the reference): which tokens are fixed, how the window slides, how many tokens a step selects."""

    def __init__(self, spec: LayerSpec, m: SelfIndex):
        self.spec, self.m = spec, m
        self.base = m.sinks if m.fixed == "sinks" else 0  # first position that goes through the window ring
        self.n_fixed = 0  # fixed full-precision slots in use
        self.kv: ops.IndexedKV | None = None
        self.last_idx: torch.Tensor | None = None  # [B, Hkv, K] positions selected by the last step
        self.rows: list[tuple[int, int, int, int, int]] | None = None  # after reserve(): each reserved step's plan
        self.used = 0  # reserved steps taken

    def nbytes(self) -> int:
        return self.kv.nbytes() if self.kv is not None else 0

    def seq_len(self) -> int:
        return self.kv.n if self.kv is not None else 0

    def attended(self) -> torch.Tensor | None:
        if self.last_idx is None:
            return None
        fpos = self.kv.fpos
        fixed = fpos[:, :, fpos[0, 0] >= 0]  # every (b, h) fills the same slots
        return torch.cat([fixed, self.last_idx.long()], -1)

    # prefill: dense FlashAttention for the output, then the index

    def prefill(self, q, k, v):
        # q [B, Hq, Tq, D] (queries of the last Tq positions), k/v [B, Hkv, T, D]
        out = attention.dense_attention(q, k, v, causal=True)
        B, H, T, D = k.shape
        m = self.m
        self.rows, self.used = None, 0
        self.kv = ops.IndexedKV(B, H, D, k.dtype, k.device, quantized=m.setting == "2+1", n_full=m.sinks + m.window,
                                exclusions=m.fixed == "scored", cuda=k.is_cuda and m.impl == "auto")
        ring_lo = max(self.base, T - m.window)  # the prompt's last tokens start in the window ring
        fixed_pos = torch.arange(min(m.sinks, T), device=k.device).expand(B, H, -1) if m.fixed == "sinks" \
            else self._scored_fixed(q, k, ring_lo)
        # the rest (past the fixed ones, below the ring) is stored in 2 bits now, normalised over those tokens alone
        self.kv.pack_prompt(k, v, m.centre, self.base, ring_lo, kept=fixed_pos if m.fixed == "scored" else None)
        if m.fixed == "scored":
            self.kv.exclude(fixed_pos)  # never selected: they are attended in full precision
        self.n_fixed = fixed_pos.shape[2]
        if self.n_fixed:
            idx = fixed_pos[..., None].expand(-1, -1, -1, D)
            self.kv.put_full(slice(0, self.n_fixed), fixed_pos, torch.gather(k, 2, idx), torch.gather(v, 2, idx))
        if ring_lo < T:  # the window ring: tokens below ring_lo are already quantized, nothing to evict
            pos = torch.arange(ring_lo, T, device=k.device)
            self.kv.put_full(m.sinks + (pos - self.base) % m.window, pos, k[:, :, ring_lo:], v[:, :, ring_lo:])
        self.last_idx = None
        return out

    def _scored_fixed(self, q, k, ring_lo: int) -> torch.Tensor:
        """The `sinks` positions below the window that the last prompt query attends most (GQA mean of softmax
        probabilities): [B, H, n] int64."""
        B, H, T, D = k.shape
        n = min(self.m.sinks, ring_lo)
        if n == 0:
            return torch.zeros(B, H, 0, dtype=torch.int64, device=k.device)
        ql = q[:, :, -1].float().reshape(B, H, -1, D)
        pos = torch.cat([  # one sequence at a time: a float copy of one sequence's keys, not of the batch's
            torch.softmax(torch.einsum("bhgd,bhtd->bhgt", ql[b : b + 1], k[b : b + 1].float()) * D**-0.5, -1)
            .mean(2)[..., :ring_lo].topk(n, dim=-1).indices for b in range(B)])
        return pos

    # decode

    def extend(self, q, k, v):
        if q.shape[2] == 1:
            return self._step(q, k, v)
        # a chunk (e.g. a question after the context): dense attention over everything the cache holds, dequantized,
        # as a prefill over a compressed cache would; top-k selection is how decode steps save time, and a question
        # encoded through it would steer every later selection with a worse query
        if self.rows is not None:
            self._unpin()  # the reserved plan assumed one-token steps: reserve() again before capturing
        keys, values = self.kv.dequantized()
        out = attention.dense_attention(q, torch.cat([keys, k], 2), torch.cat([values, v], 2), causal=True)
        for i in range(k.shape[2]):
            self._append(k[:, :, i], v[:, :, i])
        self.last_idx = None
        return out

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv.dequantized()

    def _step(self, q, k, v):
        # q [B, Hq, 1, D], k/v [B, Hkv, 1, D]
        if self.rows is not None:
            live = not capturing(q)  # a capture records the device work only: replays call advance()
            if live:
                self._check_room(1)  # before anything is written
            if self.kv.pinned:
                out, _ = self.kv.planned_step(q[:, :, 0], k[:, :, 0], v[:, :, 0])
                if live:
                    self.advance(1)
                return out[:, :, None]
            self.used += 1  # the reference path: the same host values, computed as it goes
        self._append(k[:, :, 0], v[:, :, 0])
        return self._attention(q[:, :, 0])[:, :, None]

    def _slot(self, p: int) -> tuple[int, int]:
        """Full-precision slot of position p, and the position it pushes out of the window (-1: none)."""
        if p < self.base:  # a prompt shorter than the sinks: p is itself a fixed token
            return p, -1
        old = p - self.m.window
        return self.m.sinks + (p - self.base) % self.m.window, (old if old >= self.base else -1)

    def _append(self, k1: torch.Tensor, v1: torch.Tensor) -> None:
        """Append one token, k1/v1 [B, H, D]; the token leaving the window is stored in 2 bits (2+1)."""
        p = self.kv.n
        slot, old = self._slot(p)
        if p < self.base:
            self.n_fixed += 1
        self.kv.append(k1, v1, slot, old)

    def selectable(self, n: int | None = None) -> tuple[int, int]:
        """Positions [lo, hi) that decode steps choose from (quantized in 2+1, outside the window), with n positions
        stored (default: now)."""
        n = self.kv.n if n is None else n
        return self.base, max(self.base, n - self.m.window)

    def n_fp(self, n: int | None = None, n_fixed: int | None = None) -> int:
        """Tokens in the full-precision set (known on the host: no device sync)."""
        n, n_fixed = (self.kv.n if n is None else n), (self.n_fixed if n_fixed is None else n_fixed)
        return n_fixed + min(self.m.window, max(0, n - self.base))

    def n_select(self, n: int | None = None, n_fixed: int | None = None) -> int:
        """Tokens a decode step selects: the budget minus the full-precision set, at most what is selectable."""
        n, n_fixed = (self.kv.n if n is None else n), (self.n_fixed if n_fixed is None else n_fixed)
        lo, hi = self.selectable(n)
        excluded = n_fixed if self.m.fixed == "scored" else 0  # scored fixed tokens sit inside [lo, hi)
        return max(0, min(budget_tokens(self.m.budget, n) - self.n_fp(n, n_fixed), hi - lo - excluded))

    # capture-safe decode: reserve() computes every reserved step's host values (position, slot, the token leaving
    # the window, the selectable range, the selection size) with the functions above, once; on CUDA they go to the
    # device as a table, a row of which the step itself copies into place, so a CUDA graph replays the very launches
    # an eager step makes (kernels/selfindex.py: IndexedKV.pin, planned_step)

    @property
    def capture_safe(self) -> bool:
        return self.m.impl == "auto"  # CUDA kernels on CUDA tensors: the planned steps

    capture_unsafe_reason = "impl=torch runs the PyTorch reference, whose selection size is a host value every step"

    def plan_rows(self, n_new: int) -> list[tuple[int, int, int, int, int]]:
        """(pos, slot, old, hi, k) of each of the next n_new one-token steps, as _append and _select would use."""
        rows, n_fixed = [], self.n_fixed
        for p in range(self.kv.n, self.kv.n + n_new):
            slot, old = self._slot(p)
            n_fixed += p < self.base
            old = old if self.kv.quantized else -1
            rows.append((p, slot, old, self.selectable(p + 1)[1], self.n_select(p + 1, n_fixed)))
        return rows

    def reserve(self, n_new: int) -> None:
        if self.kv is None:
            raise ReservedRoomError("selfindex: reserve() before prefill", 0, n_new, 0)
        self.rows, self.used = self.plan_rows(n_new), 0
        if self.kv.cuda and n_new:
            self.kv.pin(self.rows, self.base, self.spec.n_heads)
        else:
            self.kv.reserve(self.kv.n + n_new)

    def _check_room(self, n: int) -> None:
        if self.rows is None or self.used + n > len(self.rows):
            room = self.rows[-1][0] + 1 if self.rows else self.kv.n
            raise ReservedRoomError("selfindex", self.kv.n, n, room)

    def advance(self, n: int) -> None:
        self._check_room(n)
        for row in self.rows[self.used : self.used + n]:  # the host side of what the replays do on the device
            self.n_fixed += row[0] < self.base
            self.kv.n = row[0] + 1
        self.used += n
        if self.kv.pinned:
            self.last_idx = self.kv.idx_buf[:, :, : self.rows[self.used - 1][4]]

    def _unpin(self) -> None:
        self.rows = None
        if self.kv.pinned:
            self.kv.unpin()

    def _attention(self, q: torch.Tensor) -> torch.Tensor:
        """Select, then attend: q [B, Hq, D] -> [B, Hq, D] in q's dtype, over the current state."""
        idx = self._select(q)
        self.last_idx = idx
        return self._attend(q, idx)

    def _select(self, q: torch.Tensor) -> torch.Tensor:
        """Positions [B, H, K] the GQA-mean query picks (int32 on CUDA, int64 on the reference path)."""
        return self.kv.select(q, *self.selectable(), self.n_select())

    def _attend(self, q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Exact attention of q [B, Hq, D] over the full-precision set and the positions idx [B, H, K]."""
        return self.kv.attend(q, idx)

    # for the kernel suite

    def decode_fns(self, q):
        q1 = q[:, :, 0]
        idx = self._select(q1)
        return {"attention": lambda: self._attention(q1), "score_select": lambda: self._select(q1),
                "attend": lambda: self._attend(q1, idx)}

    def decode_bytes(self) -> int:
        """Sign bits of every selectable token, the selected tokens' storage, the full-precision set, the codebook."""
        kv, D = self.kv, self.spec.head_dim
        B, H = kv.fk.shape[:2]
        lo, hi = self.selectable()
        es = kv.fk.element_size()
        per_selected = D // 8 + (D // 4 * 2 + D // 32 * 8 if kv.quantized else 2 * D * es)
        return B * H * ((hi - lo) * (D // 8) + self.n_select() * per_selected + self.n_fp() * 2 * D * es
                        + kv.cb[0, 0].numel() * 4)

    def info(self):
        attend = "torch"
        if self.kv.cuda:  # which kernel attends the picks (kernels/selfindex_attend.py: KVBENCH_SELFINDEX_ATTEND)
            from kvbench.kernels import selfindex_attend as sa

            cuda = sa.cuda_path(self.kv.quantized, self.spec.group, self.spec.head_dim, self.kv.fk.device)
            attend = "cuda" if cuda else ("triton-ptx" if sa.FAST_DEQUANT else "triton")
        # the select launches asked for (kernels/selfindex.py: SELECT_LAUNCHES; 1 falls back to 3 past one wave)
        from kvbench.kernels.selfindex import SELECT_LAUNCHES

        return {"selected": self.n_select(), "full_precision": self.n_fp(), "impl": "cuda" if self.kv.cuda else "torch",
                "backend": "selfindex-cuda" if self.kv.cuda else "torch", "attend": attend, "pinned": self.kv.pinned,
                "select_launches": SELECT_LAUNCHES if self.kv.cuda else None}
