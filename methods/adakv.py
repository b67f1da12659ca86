"""adakv: snapkv's votes, with one top-k across all KV heads of a layer, so each head keeps as many prompt tokens as
its attention needs; stored ragged (each head only its own tokens) and attended by a varlen attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.api import LayerCache, LayerSpec, ReservedRoomError, budget_tokens, capturing, param
from kvbench.attention import dense_attention
from kvbench.kernels import dense_decode
from kvbench.methods.eviction import GROW
from kvbench.methods.full import FullLayer
from kvbench.methods.snapkv import SnapKV
from kvbench.registry import register


@register
@dataclass(frozen=True)
class AdaKV(SnapKV):
    """adakv: adaptive budget allocation across heads: the layer's budget goes to the heads whose votes need it.

    Based on Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference (Feng et
    al., 2024), https://arxiv.org/abs/2407.11550, its code (github.com/FFY0/AdaKV) and kvpress's AdaKVPress. With
    n = capacity - window tokens per head beyond the window, each KV head first keeps its own top floor(alpha * n) by
    snapkv's votes (the safeguard), then one top-k over all heads of the layer fills the layer's H * n; every head
    keeps its window. Heads hold different numbers of tokens: the prompt part is stored flat, head after head, with
    per-head offsets, so what a head does not keep is not stored (kvpress masks evicted keys of a head-wise press in a
    full-size cache instead). Later tokens are appended to every head alike.

    Where it differs, and why: the votes are snapkv's (GQA mean over the query heads of a KV head), so adakv differs
    from snapkv only in the allocation. The attention is a PyTorch varlen
    reference: each call pads the ragged prompt part to the longest head of the batch for one masked SDPA (a transient
    copy freed after the call); a varlen kernel would read the flat storage in place. When every head keeps the same
    number of tokens it takes `full`'s unmasked path. Once decode room is reserved (graph-captured decode), each head
    is laid out as a sequence of its own and attended by the live-length dense decode kernel with a length per head.

    Parameters
    ----------
    capacity : float, default 1024
        Mean tokens kept per KV head, window included: tokens, or a fraction of the context in (0, 1).
    window : int, default 32
        Observation window (as snapkv), kept by every head.
    kernel : int, default 7
        Pooling width over the votes (as snapkv).
    pool : str, default "max"
        "max" or "avg" (as snapkv).
    alpha : float, default 0.2
        Safeguard: the share of the per-head budget every head keeps by its own votes.
    """

    name = "adakv"
    alpha: float = param(0.2, "share of the per-head budget each head keeps by its own votes", ge=0.0, le=1.0)

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        return AdaKVLayer(spec, self)

    def allocate(self, votes: torch.Tensor, n: int) -> torch.Tensor:
        """votes [B, H, N] of the tokens before the window, n tokens per head on average -> kept mask [B, H, N]."""
        B, H, N = votes.shape
        safe = int(self.alpha * n)
        forced = votes.topk(safe, dim=-1).indices
        scores = votes.scatter(-1, forced, float("inf"))  # the safeguard wins the layer-wide top-k
        top = scores.view(B, H * N).topk(H * n, dim=-1).indices
        return torch.zeros(B, H * N, dtype=torch.bool, device=votes.device).scatter_(1, top, True).view(B, H, N)


class AdaKVLayer(LayerCache):
    """The prompt tokens each head kept, flat: keys/values [Ntot, D] and positions [Ntot] ordered by (sequence, head,
    position), with per-head offsets [B * Hkv + 1]; the window and everything later in a FullLayer [B, Hkv, M, D]."""

    # Capture-safe: reserve() lays each KV head out as a sequence of its own, [B * Hkv, cap, 1, D] (its kept prompt
    # tokens, then the window and what follows), with a device-side length per head, so a one-token step is one
    # append and one live-length dense decode in which each head reads only its own tokens (dense_decode's
    # flash-varlen with a length per (sequence, head), the GQA group as that sequence's query heads)
    capture_safe = True

    def __init__(self, spec: LayerSpec, method: AdaKV):
        self.spec, self.method = spec, method
        self.fk = self.fv = self.fpos = self.offsets = None
        self.recent: FullLayer | None = None
        self.prompt_len = self.window = 0
        self.pk = self.pv = self.seen = self.decoder = None  # after reserve(): per-head buffers, lengths [B * Hkv]
        self.n_pinned = self.room = 0  # tokens appended to them, and how many may be

    def prefill(self, q, k, v):
        out = dense_attention(q, k, v, causal=True)
        B, H, T, D = k.shape
        C = min(budget_tokens(self.method.capacity, T), T)
        w = min(self.method.window, q.shape[2], C)
        n = C - w
        if n == T - w:  # everything before the window fits
            mask = torch.ones(B, H, T - w, dtype=torch.bool, device=k.device)
        elif n == 0:
            mask = torch.zeros(B, H, T - w, dtype=torch.bool, device=k.device)
        else:
            mask = self.method.allocate(self.method.batch_votes(q, k), n)
        self.fk, self.fv = k[:, :, : T - w][mask], v[:, :, : T - w][mask]  # [Ntot, D], row-major (b, h, t)
        self.fpos = mask.nonzero()[:, 2]
        self.offsets = F.pad(mask.sum(-1).flatten().cumsum(0), (1, 0))
        self.recent = FullLayer(self.spec, GROW)
        self.recent._append(k[:, :, T - w :], v[:, :, T - w :])
        self.prompt_len, self.window = T, w
        return out

    def counts(self) -> torch.Tensor:
        """Prompt tokens kept before the window, per head: [B, Hkv]."""
        return self.offsets.diff().view(self.recent.k.shape[0], self.spec.n_kv_heads)

    def _padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The flat part padded to the longest head: keys, values [B, Hkv, L, D], positions [B, Hkv, L] (-1 where
        padded) and the valid mask [B, Hkv, L]."""
        B, H, D = self.recent.k.shape[0], self.spec.n_kv_heads, self.spec.head_dim
        counts = self.counts()
        L = int(counts.max()) if counts.numel() else 0
        slot = torch.arange(L, device=counts.device)
        valid = slot < counts[..., None]
        idx = (self.offsets[:-1].view(B, H, 1) + slot).clamp(max=max(self.fk.shape[0] - 1, 0))
        if self.fk.shape[0] == 0:
            empty = self.fk.new_zeros(B, H, L, D)
            return empty, empty, torch.full((B, H, L), -1, device=counts.device), valid
        pos = torch.where(valid, self.fpos[idx], -1)
        return self.fk[idx], self.fv[idx], pos, valid

    def _attend(self, q: torch.Tensor) -> torch.Tensor:
        """Attention of q [B, Hq, Tq, D] (the last Tq stored positions) over the kept prompt tokens and the rest."""
        counts = self.counts()
        keys, values, _, valid = self._padded()
        rk, rv = self.recent.keys(), self.recent.values()
        if bool((counts == counts.flatten()[0]).all()):  # not ragged: full's path
            return dense_attention(q, torch.cat([keys, rk], 2), torch.cat([values, rv], 2), causal=True)
        B, Hq, Tq, _ = q.shape
        M = rk.shape[2]
        causal = torch.arange(M, device=q.device) <= torch.arange(M - Tq, M, device=q.device)[:, None]  # [Tq, M]
        mask = torch.cat([valid[:, :, None].expand(-1, -1, Tq, -1), causal.expand(B, valid.shape[1], Tq, M)], -1)
        mask = mask.repeat_interleave(Hq // valid.shape[1], dim=1)  # [B, Hq, Tq, L + M]
        return F.scaled_dot_product_attention(q, torch.cat([keys, rk], 2), torch.cat([values, rv], 2),
                                              attn_mask=mask, enable_gqa=Hq != valid.shape[1])

    def extend(self, q, k, v):
        if self.pk is not None:
            if k.shape[2] == 1:
                return self._pinned_step(q, k, v)
            self._unpin()  # a chunk: back to the plain storage (reserve again before capturing)
        self.recent._append(k, v)
        return self._attend(q)

    def reserve(self, n_new: int) -> None:
        if self.recent is None:
            raise ReservedRoomError("adakv: reserve() before prefill", 0, n_new, 0)
        if self.pk is not None:
            self._unpin()
        B, H, D = self.recent.k.shape[0], self.spec.n_kv_heads, self.spec.head_dim
        counts = self.counts()
        keys, values, _, _ = self._padded()  # [B, H, L, D]; slots past a head's count are overwritten or dead
        rk, rv = self.recent.keys(), self.recent.values()  # [B, H, M, D]
        L, M = keys.shape[2], rk.shape[2]
        cap = L + M + n_new
        self.pk, self.pv = rk.new_zeros(B * H, cap, 1, D), rv.new_zeros(B * H, cap, 1, D)
        dest = (counts[..., None] + torch.arange(M, device=rk.device))[..., None].expand(-1, -1, -1, D)
        for buf, kept, rec in ((self.pk, keys, rk), (self.pv, values, rv)):
            per_head = buf.view(B, H, cap, D)
            per_head[:, :, :L] = kept
            per_head.scatter_(2, dest, rec)
        self.seen = (counts + M).flatten().to(torch.int32)
        self.decoder = dense_decode.DenseDecoder(self.pk, self.pv, self.spec.group)
        self.n_pinned, self.room = 0, n_new

    def advance(self, n: int) -> None:
        if self.pk is None or self.n_pinned + n > self.room:
            raise ReservedRoomError("adakv", self.seq_len(), n, self.seq_len() - self.n_pinned + self.room)
        self.n_pinned += n

    def _pinned_step(self, q, k, v):
        """One token into every head's own sequence, then each head's GQA group attends its live tokens."""
        if not capturing(q):
            self.advance(1)  # raises before any write when the room is spent
        B, Hq, _, D = q.shape
        H = self.spec.n_kv_heads
        dense_decode.append_token(self.pk, self.pv, k.reshape(B * H, 1, 1, D), v.reshape(B * H, 1, 1, D), self.seen,
                                  self.seen)
        return self.decoder(q.reshape(B * H, Hq // H, 1, D), self.seen).view(B, Hq, 1, D)

    def _unpin(self) -> None:
        """Hand the tokens appended since reserve() back to the plain storage."""
        if self.n_pinned:
            B, H, D = self.recent.k.shape[0], self.spec.n_kv_heads, self.spec.head_dim
            M = self.recent.seq_len()
            at = (self.counts()[..., None] + M + torch.arange(self.n_pinned, device=self.pk.device))
            at = at[..., None].expand(-1, -1, -1, D)
            self.recent._append(*(buf.view(B, H, -1, D).gather(2, at) for buf in (self.pk, self.pv)))
        self.pk = self.pv = self.seen = self.decoder = None
        self.n_pinned = self.room = 0

    def nbytes(self) -> int:
        if self.recent is None:
            return 0
        flat = sum(t.numel() * t.element_size() for t in (self.fk, self.fv, self.fpos, self.offsets))
        pinned = sum(t.numel() * t.element_size() for t in (self.pk, self.pv, self.seen)) if self.pk is not None else 0
        return flat + self.recent.nbytes() + pinned  # the flat copy stays for attended() and a later chunk

    def seq_len(self) -> int:
        return 0 if self.recent is None else self.prompt_len - self.window + self.recent.seq_len() + self.n_pinned

    def attended(self) -> torch.Tensor:
        """Each head's kept prompt positions (-1 where a head keeps fewer than the longest), then the window and every
        later position: [B, Hkv, N]."""
        _, _, pos, _ = self._padded()
        B, H = pos.shape[0], pos.shape[1]
        later = torch.arange(self.prompt_len - self.window, self.seq_len(), device=pos.device).expand(B, H, -1)
        return torch.cat([pos, later], -1)

    def info(self):
        c = self.counts()
        backend = self.decoder.backend if self.decoder is not None else "torch"
        return {"kept_min": int(c.min()) + self.window, "kept_max": int(c.max()) + self.window, "impl": "torch",
                "backend": backend, "pinned": self.pk is not None}

    def decode_fns(self, q):
        """The decode step's attention as decoding runs it: over the pinned per-head sequences (pinned here first if
        they are not; that changes the layout, not what is stored), without the append."""
        if self.pk is None:
            self.reserve(1)
        B, Hq, _, D = q.shape
        H = self.spec.n_kv_heads
        return {"attention": lambda: self.decoder(q.reshape(B * H, Hq // H, 1, D), self.seen).view(B, Hq, 1, D)}

    def decode_bytes(self) -> int:
        es = self.fk.element_size()
        later = 2 * self.n_pinned * self.recent.k.shape[0] * self.spec.n_kv_heads * self.spec.head_dim * es
        return self.fk.numel() * es * 2 + self.recent.decode_bytes() + later  # + the tokens appended since reserve()
