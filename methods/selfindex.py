"""selfindex: the self-indexing 1-bit VQ KV cache. Keys keep their sign bits; groups of 4 signs name a centroid of a
tiny per-head codebook, and a lookup over those bits picks the tokens each decode step attends to.

Based on "Self-Indexing KVCache: Predicting Sparse Attention from Compressed Keys", Yang, Zhang, Zhao, Chen, Tang,
AAAI 2026 (https://arxiv.org/abs/2603.14224), as restated in kvbench's specs/selfindex.md, without the faults of its
reference code: any batch, any GQA ratio, head_dim 64 or 128, bf16 and fp16, no cap on generated tokens, and a recent
window kept apart from the selection budget so the prompt is still searched after hundreds of generated tokens.

Per layer and KV head the cache holds (kernels/selfindex.py has the exact layouts):
- the prompt's per-channel centre mu (median or mean) and, for 2+1, per-channel max |k - mu|;
- a codebook of 16 centroids per group of 4 channels, from the prompt's centred keys;
- packed sign bits of every token (16 bytes per token at head_dim 128): the index;
- "2+1": sign + 2-bit magnitude for keys, 2-bit values (112 bytes per token at head_dim 128, against 512 for fp16
  K+V); "16+1": fp16/bf16 keys and values plus the index;
- a full-precision set, always attended: `sinks` fixed tokens (the first ones, or the ones the last prompt query
  attends most) and a recent window of `window` tokens that slides with decoding.

A decode step appends the token, scores every selectable token with an 8-bit LUT over its sign codes (the GQA-mean
query against the codebook), takes the top tokens per KV head, and attends exactly over the full-precision set and
the selected tokens (dequantized on the fly in 2+1). On CUDA tensors the pack, score-and-select and sparse-attention
steps run as CUDA kernels (kernels/csrc/selfindex.cu); elsewhere the PyTorch reference in kernels/selfindex.py runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench import attention
from kvbench.api import (BUDGET_VALID, LayerCache, LayerSpec, Method, ParamError, budget_tokens, check_budget,
                         param)
from kvbench.kernels import selfindex as ops
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
    fixed : str, default "sinks"
        "sinks": the fixed tokens are the first `sinks` tokens; "scored": the `sinks` prompt tokens the last prompt
        query attends most (the paper's 2+1 setting).
    centre : str, default "median"
        Per-channel centre subtracted from keys before taking signs: "median" or "mean" over the prompt.
    impl : str, default "auto"
        "auto": CUDA kernels on CUDA tensors, the PyTorch reference elsewhere; "torch": always the reference.
    """

    name = "selfindex"
    budget: float = param(0.1, "tokens attended per step incl. the full-precision set", valid=BUDGET_VALID)
    setting: str = param("2+1", "storage: 2+1 (2-bit K magnitude and V) or 16+1 (fp16 K/V + index)",
                         choices=("2+1", "16+1"))
    sinks: int = param(32, "fixed full-precision tokens", ge=0, le=4096)
    window: int = param(32, "recent full-precision tokens, sliding", ge=1, le=4096)
    fixed: str = param("sinks", "which tokens are fixed: the first ones, or the last query's top ones",
                       choices=("sinks", "scored"))
    centre: str = param("median", "per-channel key centre", choices=("median", "mean"))
    impl: str = param("auto", "auto: CUDA kernels on GPU tensors; torch: the reference", choices=("auto", "torch"))

    def validate(self) -> None:
        check_budget(self.name, "budget", self.budget)
        if self.budget >= 1 and self.budget < self.sinks + self.window:
            raise ParamError(self.name, "budget", self.budget,
                             f"a fraction, or at least sinks + window = {self.sinks + self.window} tokens "
                             "(the budget counts the full-precision set)")

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        if spec.head_dim % 32 != 0:
            raise ParamError(self.name, "head_dim", spec.head_dim, "a multiple of 32 (64 and 128 are tested)")
        return SelfIndexLayer(spec, self)


class SelfIndexLayer(LayerCache):
    def __init__(self, spec: LayerSpec, m: SelfIndex):
        self.spec, self.m = spec, m
        self.quantized = m.setting == "2+1"
        self.base = m.sinks if m.fixed == "sinks" else 0  # first position the ring or the packed store can hold
        self.n = 0
        self.cap = 0
        self.last_positions: torch.Tensor | None = None  # [B, Hkv, N] attended by the last step

    # ---------------------------------------------------------------------------------------------------------
    # storage

    def _alloc(self, B: int, cap: int, device, old: dict | None = None) -> None:
        """(Re)allocate every per-token buffer for `cap` positions, keeping the first self.n."""
        H, D, dt = self.spec.n_kv_heads, self.spec.head_dim, self.spec.dtype
        shapes = {"signs": ((D // 8,), torch.uint8)}
        if self.quantized:
            shapes |= {"kmag": ((D // 4,), torch.uint8), "kscale": ((D // 32, 2), torch.float16),
                       "vq": ((D // 4,), torch.uint8), "vscale": ((D // 32, 2), torch.float16)}
        else:
            shapes |= {"kfull": ((D,), dt), "vfull": ((D,), dt)}
        for name, (tail, dtype) in shapes.items():
            buf = torch.zeros(B, H, cap, *tail, dtype=dtype, device=device)
            if old is not None:
                buf[:, :, : self.n] = old[name][:, :, : self.n]
            setattr(self, name, buf)
        if self.m.fixed == "scored":
            excl = torch.zeros(B, H, (cap + 7) // 8, dtype=torch.uint8, device=device)
            if old is not None:
                excl[:, :, : old["excl"].shape[2]] = old["excl"]
            self.excl = excl
        self.cap = cap

    def _grow(self, need: int) -> None:
        if need <= self.cap:
            return
        names = ["signs", "kmag", "kscale", "vq", "vscale"] if self.quantized else ["signs", "kfull", "vfull"]
        if self.m.fixed == "scored":
            names.append("excl")
        old = {n: getattr(self, n) for n in names}
        cap = max(need, self.cap + max(256, self.cap // 8))
        self._alloc(self.signs.shape[0], cap, self.signs.device, old)

    def _buffers(self) -> list[torch.Tensor]:
        names = ["signs", "mu", "cb", "fk", "fv", "fpos"]
        names += ["kmag", "kscale", "vq", "vscale", "chmax"] if self.quantized else ["kfull", "vfull"]
        if self.m.fixed == "scored":
            names.append("excl")
        return [getattr(self, n) for n in names if getattr(self, n, None) is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers()) if self.n else 0

    def seq_len(self) -> int:
        return self.n

    def attended(self) -> torch.Tensor | None:
        return self.last_positions

    def _use_cuda(self, x: torch.Tensor) -> bool:
        return x.is_cuda and self.m.impl == "auto"

    # ---------------------------------------------------------------------------------------------------------
    # prefill: dense FlashAttention for the output, then the index

    def prefill(self, q, k, v):
        # q [B, Hq, Tq, D], k/v [B, Hkv, T, D]
        out = attention.dense_attention(q, k, v, causal=True)
        B, H, T, D = k.shape
        m = self.m
        self.mu = ops.centre_stats(k, m.centre)  # [B, H, D] float32
        self.chmax = None
        if self.quantized:
            self.chmax = (k.float() - self.mu[:, :, None]).abs().amax(2).clamp_(min=1e-6)  # [B, H, D]
        self._alloc(B, T, k.device)
        NF = m.sinks + m.window
        self.fk = k.new_zeros(B, H, NF, D)
        self.fv = v.new_zeros(B, H, NF, D)
        self.fpos = torch.full((B, H, NF), -1, dtype=torch.int64, device=k.device)

        # which prompt positions stay full precision: fixed ones, and the window ring
        ring_lo = max(self.base, T - m.window)
        if m.fixed == "sinks":
            fixed_pos = torch.arange(min(m.sinks, T), device=k.device).expand(B, H, -1)
        else:
            fixed_pos = self._scored_fixed(q, k, ring_lo)
        quant_lo, quant_hi = self.base, ring_lo  # positions quantized now (2+1); empty when T is small

        inv_chmax = 1.0 / self.chmax if self.quantized else None
        if self._use_cuda(k):
            raise NotImplementedError  # CUDA pack lands with the kernels
        signs, q2 = ops.pack_ref(k, v, self.mu, inv_chmax)
        self.signs[:, :, :T] = signs
        if self.quantized:
            if quant_hi > quant_lo:
                for name, t in zip(("kmag", "kscale", "vq", "vscale"), q2):
                    getattr(self, name)[:, :, quant_lo:quant_hi] = t[:, :, quant_lo:quant_hi]
        else:
            self.kfull[:, :, :T] = k
            self.vfull[:, :, :T] = v
        self.cb = ops.codebook_ref(k, self.mu, signs)

        nfix = fixed_pos.shape[2]
        if nfix:
            idx = fixed_pos[..., None].expand(-1, -1, -1, D)
            self.fk[:, :, :nfix] = torch.gather(k, 2, idx)
            self.fv[:, :, :nfix] = torch.gather(v, 2, idx)
            self.fpos[:, :, :nfix] = fixed_pos
        for p in range(ring_lo, T):  # tokens below ring_lo are already quantized: nothing to evict
            self._put_ring(p, k[:, :, p], v[:, :, p], evict=False)
        self.n = T
        self.last_positions = None
        return out

    def _scored_fixed(self, q, k, ring_lo: int) -> torch.Tensor:
        """The `sinks` positions below the window that the last prompt query attends most (GQA mean of softmax
        probabilities), excluded from selection from then on: [B, H, n] int64."""
        B, H, T, D = k.shape
        n = min(self.m.sinks, ring_lo)
        self.n_scored = 0
        if n == 0:
            return torch.zeros(B, H, 0, dtype=torch.int64, device=k.device)
        g = q.shape[1] // H
        ql = q[:, :, -1].float().reshape(B, H, g, D)
        p = torch.softmax(torch.einsum("bhgd,bhtd->bhgt", ql, k.float()) * D**-0.5, -1).mean(2)[..., :ring_lo]
        pos = p.topk(n, dim=-1).indices
        self.n_scored = n
        bits = torch.zeros(B, H, self.excl.shape[2] * 8, dtype=torch.bool, device=k.device)
        self.excl = ops.pack_bits(bits.scatter_(2, pos, True))
        return pos

    def _ring_slot(self, p: int) -> int:
        return self.m.sinks + (p - self.base) % self.m.window

    def _put_ring(self, p: int, k1: torch.Tensor, v1: torch.Tensor, evict: bool = True) -> None:
        """Write position p (k1/v1 [B, H, D]) into the full-precision set, quantizing the token it pushes out."""
        if p < self.base:  # a prompt shorter than the sinks: position p is a fixed slot
            slot = p
        else:
            slot = self._ring_slot(p)
            old = p - self.m.window
            if evict and self.quantized and old >= self.base:
                self._quantize_token(old, self.fk[:, :, slot], self.fv[:, :, slot])
        self.fk[:, :, slot] = k1
        self.fv[:, :, slot] = v1
        self.fpos[:, :, slot] = p

    def _quantize_token(self, p: int, k1: torch.Tensor, v1: torch.Tensor) -> None:
        """2+1 storage of one token leaving the window: k1/v1 [B, H, D]."""
        _, q2 = ops.pack_ref(k1[:, :, None], v1[:, :, None], self.mu, 1.0 / self.chmax)
        for name, t in zip(("kmag", "kscale", "vq", "vscale"), q2):
            getattr(self, name)[:, :, p] = t[:, :, 0]

    # ---------------------------------------------------------------------------------------------------------
    # decode

    def extend(self, q, k, v):
        # one token at a time: each query selects its own tokens, causally (a question chunk is rare and short)
        outs = [self._step(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1]) for i in range(q.shape[2])]
        return torch.cat(outs, dim=2)

    def _append(self, k1: torch.Tensor, v1: torch.Tensor) -> None:
        """Append one token: k1/v1 [B, H, D]."""
        p = self.n
        self._grow(p + 1)
        signs, _ = ops.pack_ref(k1[:, :, None], v1[:, :, None], self.mu, None)
        self.signs[:, :, p] = signs[:, :, 0]
        if not self.quantized:
            self.kfull[:, :, p] = k1
            self.vfull[:, :, p] = v1
        self._put_ring(p, k1, v1)
        self.n = p + 1

    def selectable(self) -> tuple[int, int]:
        """Positions [lo, hi) that decode steps choose from (quantized in 2+1, outside the full-precision set)."""
        lo = self.base
        hi = max(lo, self.n - self.m.window)
        return lo, hi

    def n_select(self) -> int:
        """Tokens each decode step selects: the budget minus the full-precision set, at most what is selectable."""
        lo, hi = self.selectable()
        n_fp = int((self.fpos[0, 0] >= 0).sum())
        # scored fixed tokens lie inside [lo, hi) but are excluded from selection
        n_excluded = self.n_scored if self.m.fixed == "scored" else 0
        return max(0, min(budget_tokens(self.m.budget, self.n) - n_fp, hi - lo - n_excluded))

    def _step(self, q, k, v):
        # q [B, Hq, 1, D], k/v [B, Hkv, 1, D]
        self._append(k[:, :, 0], v[:, :, 0])
        out = self._attend(q[:, :, 0])
        return out[:, :, None].to(q.dtype)

    def _select(self, qm: torch.Tensor) -> torch.Tensor:
        """Selected positions [B, H, K] int64 for the GQA-mean query qm [B, H, D]."""
        lo, hi = self.selectable()
        K = self.n_select()
        if K == 0:
            return torch.zeros(*qm.shape[:2], 0, dtype=torch.int64, device=qm.device)
        excluded = None
        if self.m.fixed == "scored":
            excluded = ops.unpack_bits(self.excl)[:, :, lo:hi]
        bins = ops.score_bins_ref(ops.lut8_ref(qm, self.cb), self.signs[:, :, lo:hi], excluded)
        return ops.select_ref(bins, K) + lo

    def _attend(self, q: torch.Tensor) -> torch.Tensor:
        """Attention of one query per head q [B, Hq, D] over the full-precision set and the selected tokens."""
        B, Hq, D = q.shape
        H = self.spec.n_kv_heads
        qm = q.float().reshape(B, H, Hq // H, D).mean(2)
        pos = self._select(qm)
        idx = pos[..., None]
        valid = self.fpos >= 0  # [B, H, F]: fixed-set slots that hold a token
        if self.quantized:
            sgn = ops.unpack_bits(torch.gather(self.signs, 2, idx.expand(-1, -1, -1, D // 8))).float() * 2 - 1
            mag = ops.dequant2(torch.gather(self.kmag, 2, idx.expand(-1, -1, -1, D // 4)),
                               torch.gather(self.kscale, 2, idx[..., None].expand(-1, -1, -1, D // 32, 2)))
            keys = sgn * mag * self.chmax[:, :, None]  # centred keys
            values = ops.dequant2(torch.gather(self.vq, 2, idx.expand(-1, -1, -1, D // 4)),
                                  torch.gather(self.vscale, 2, idx[..., None].expand(-1, -1, -1, D // 32, 2)))
            bias = torch.einsum("bhgd,bhd->bhg", q.float().reshape(B, H, Hq // H, D), self.mu).reshape(B, Hq)
        else:
            keys = torch.gather(self.kfull, 2, idx.expand(-1, -1, -1, D))
            values = torch.gather(self.vfull, 2, idx.expand(-1, -1, -1, D))
            bias = None
        out = ops.attend_ref(q, self.fk, self.fv, valid, keys, values, bias)
        self.last_positions = torch.cat([torch.where(valid, self.fpos, torch.full_like(self.fpos, -1)), pos], -1)
        return out

    def info(self):
        return {"selected": int(self.last_positions.shape[-1]) if self.last_positions is not None else 0}

