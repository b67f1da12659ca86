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
    family = "selection"
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

    def budget_fraction(self, context: int) -> float:
        return min(1.0, budget_tokens(self.budget, context) / context)

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        if spec.head_dim % 32 != 0:
            raise ParamError(self.name, "head_dim", spec.head_dim, "a multiple of 32 (64 and 128 are tested)")
        return SelfIndexLayer(spec, self)


class SelfIndexLayer(LayerCache):
    PER_TOKEN = ("signs", "kmag", "kscale", "vq", "vscale", "kfull", "vfull")  # buffers indexed by position

    def __init__(self, spec: LayerSpec, m: SelfIndex):
        self.spec, self.m = spec, m
        self.quantized = m.setting == "2+1"
        self.base = m.sinks if m.fixed == "sinks" else 0  # first position that goes through the window ring
        self.n = 0  # logical length
        self.cap = 0  # positions the per-token buffers can hold
        self.n_fixed = 0  # fixed full-precision slots in use
        self.kmag = self.kscale = self.vq = self.vscale = self.kfull = self.vfull = None
        self.chmax = self.inv_chmax = self.excl = None
        self.last_idx: torch.Tensor | None = None  # [B, Hkv, K] positions selected by the last step

    # ---------------------------------------------------------------------------------------------------------
    # storage

    def _alloc(self, B: int, cap: int, device) -> None:
        """(Re)allocate the per-token buffers for `cap` positions, keeping what the first self.n hold."""
        H, D, dt = self.spec.n_kv_heads, self.spec.head_dim, self.spec.dtype
        shapes = {"signs": ((D // 8,), torch.uint8)}
        if self.quantized:
            shapes |= {"kmag": ((D // 4,), torch.uint8), "kscale": ((D // 32, 2), torch.float16),
                       "vq": ((D // 4,), torch.uint8), "vscale": ((D // 32, 2), torch.float16)}
        else:
            shapes |= {"kfull": ((D,), dt), "vfull": ((D,), dt)}
        for name, (tail, dtype) in shapes.items():
            buf = torch.zeros(B, H, cap, *tail, dtype=dtype, device=device)
            old = getattr(self, name, None)
            if old is not None and self.n:
                buf[:, :, : self.n] = old[:, :, : self.n]
            setattr(self, name, buf)
        if self.m.fixed == "scored":
            excl = torch.zeros(B, H, (cap + 7) // 8, dtype=torch.uint8, device=device)
            if self.excl is not None:
                excl[:, :, : self.excl.shape[2]] = self.excl
            self.excl = excl
        self.cap = cap

    def _grow(self, need: int) -> None:
        if need > self.cap:
            self._alloc(self.signs.shape[0], max(need, self.cap + max(256, self.cap // 8)), self.signs.device)

    def _buffers(self) -> list[torch.Tensor]:
        names = self.PER_TOKEN + ("mu", "chmax", "inv_chmax", "cb", "fk", "fv", "fpos", "excl")
        return [t for t in (getattr(self, n, None) for n in names) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers()) if self.n else 0

    def seq_len(self) -> int:
        return self.n

    def attended(self) -> torch.Tensor | None:
        if self.last_idx is None:
            return None
        fixed = self.fpos[:, :, self.fpos[0, 0] >= 0]  # every (b, h) fills the same slots
        return torch.cat([fixed, self.last_idx.long()], -1)

    def _use_cuda(self, x: torch.Tensor) -> bool:
        return x.is_cuda and self.m.impl == "auto"

    # ---------------------------------------------------------------------------------------------------------
    # prefill: dense FlashAttention for the output, then the index

    def prefill(self, q, k, v):
        # q [B, Hq, Tq, D] (queries of the last Tq positions), k/v [B, Hkv, T, D]
        out = attention.dense_attention(q, k, v, causal=True)
        B, H, T, D = k.shape
        m = self.m
        self.mu = ops.centre_stats(k, m.centre)  # [B, H, D] float32
        if self.quantized:
            # max |k - mu| per channel sits at the channel's min or max: no float copy of k (which would cap the
            # batch that fits); identical to (k.float() - mu).abs().amax(2) since rounding is monotonic
            lo_k, hi_k = torch.aminmax(k, dim=2)
            self.chmax = torch.maximum(hi_k.float() - self.mu, self.mu - lo_k.float()).clamp_(min=1e-6)  # [B, H, D]
            self.inv_chmax = 1.0 / self.chmax
        self._alloc(B, T, k.device)
        NF = m.sinks + m.window
        self.fk = k.new_zeros(B, H, NF, D)
        self.fv = v.new_zeros(B, H, NF, D)
        self.fpos = torch.full((B, H, NF), -1, dtype=torch.int64, device=k.device)

        ring_lo = max(self.base, T - m.window)  # the prompt's last tokens start in the window ring
        quant_lo, quant_hi = self.base, ring_lo  # the rest (past the fixed ones) is stored in 2 bits now
        if self._use_cuda(k):
            G = D // 4
            sums = torch.zeros(B, H, G, 16, 4, device=k.device)
            counts = torch.zeros(B, H, G, 16, dtype=torch.int32, device=k.device)
            abs_sum = torch.zeros(B, H, G, device=k.device)
            ops.cuda_ops().pack(k, v, self.mu, self.inv_chmax, self.signs, self.kmag, self.kscale, self.vq,
                                self.vscale, sums, counts, abs_sum, 0, quant_lo, quant_hi)
            self.cb = ops.finish_codebook(sums, counts, abs_sum, T)
        else:
            signs, q2 = ops.pack_ref(k, v, self.mu, self.inv_chmax)
            self.signs[:, :, :T] = signs
            if q2 is not None and quant_hi > quant_lo:
                for name, t in zip(("kmag", "kscale", "vq", "vscale"), q2):
                    getattr(self, name)[:, :, quant_lo:quant_hi] = t[:, :, quant_lo:quant_hi]
            self.cb = ops.codebook_ref(k, self.mu, signs)
        if not self.quantized:
            self.kfull[:, :, :T] = k
            self.vfull[:, :, :T] = v

        fixed_pos = torch.arange(min(m.sinks, T), device=k.device).expand(B, H, -1) if m.fixed == "sinks" \
            else self._scored_fixed(q, k, ring_lo)
        self.n_fixed = fixed_pos.shape[2]
        if self.n_fixed:
            idx = fixed_pos[..., None].expand(-1, -1, -1, D)
            self.fk[:, :, : self.n_fixed] = torch.gather(k, 2, idx)
            self.fv[:, :, : self.n_fixed] = torch.gather(v, 2, idx)
            self.fpos[:, :, : self.n_fixed] = fixed_pos
        if ring_lo < T:  # the window ring: tokens below ring_lo are already quantized, nothing to evict
            pos = torch.arange(ring_lo, T, device=k.device)
            slots = m.sinks + (pos - self.base) % m.window
            self.fk[:, :, slots] = k[:, :, ring_lo:]
            self.fv[:, :, slots] = v[:, :, ring_lo:]
            self.fpos[:, :, slots] = pos
        self.n = T
        self.last_idx = None
        return out

    def _scored_fixed(self, q, k, ring_lo: int) -> torch.Tensor:
        """The `sinks` positions below the window that the last prompt query attends most (GQA mean of softmax
        probabilities); they are excluded from selection from then on: [B, H, n] int64."""
        B, H, T, D = k.shape
        n = min(self.m.sinks, ring_lo)
        if n == 0:
            return torch.zeros(B, H, 0, dtype=torch.int64, device=k.device)
        ql = q[:, :, -1].float().reshape(B, H, -1, D)
        p = torch.softmax(torch.einsum("bhgd,bhtd->bhgt", ql, k.float()) * D**-0.5, -1).mean(2)[..., :ring_lo]
        pos = p.topk(n, dim=-1).indices
        bits = torch.zeros(B, H, self.excl.shape[2] * 8, dtype=torch.bool, device=k.device)
        self.excl = ops.pack_bits(bits.scatter_(2, pos, True))
        return pos

    # ---------------------------------------------------------------------------------------------------------
    # decode

    def extend(self, q, k, v):
        if q.shape[2] == 1:
            return self._step(q, k, v)
        # a chunk (e.g. a question after the context): dense attention over everything the cache holds, dequantized,
        # as a prefill over a compressed cache would; top-k selection is how decode steps save time, and a question
        # encoded through it would steer every later selection with a worse query
        keys, values = self._dequantized()
        out = attention.dense_attention(q, torch.cat([keys, k], 2), torch.cat([values, v], 2), causal=True)
        for i in range(k.shape[2]):
            self._append(k[:, :, i], v[:, :, i])
        self.last_idx = None
        return out

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored position as keys/values [B, H, n, D] in the model dtype: exact where full precision is
        kept, reconstructed from 2 bits elsewhere (2+1)."""
        n, D, dt = self.n, self.spec.head_dim, self.spec.dtype
        if not self.quantized:
            return self.kfull[:, :, :n], self.vfull[:, :, :n]
        sgn = ops.unpack_bits(self.signs[:, :, :n]).float() * 2 - 1
        keys = (sgn * ops.dequant2(self.kmag[:, :, :n], self.kscale[:, :, :n]) * self.chmax[:, :, None]
                + self.mu[:, :, None]).to(dt)
        values = ops.dequant2(self.vq[:, :, :n], self.vscale[:, :, :n]).to(dt)
        valid = self.fpos[0, 0] >= 0  # the full-precision set overrides (every (b, h) fills the same slots)
        pos = self.fpos[:, :, valid]
        idx = pos[..., None].expand(-1, -1, -1, D)
        keys.scatter_(2, idx, self.fk[:, :, valid])
        values.scatter_(2, idx, self.fv[:, :, valid])
        return keys, values

    def _step(self, q, k, v):
        # q [B, Hq, 1, D], k/v [B, Hkv, 1, D]
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
        p = self.n
        self._grow(p + 1)
        slot, old = self._slot(p)
        if p < self.base:
            self.n_fixed += 1
        if self._use_cuda(k1):
            ops.cuda_ops().append(k1, v1, self.mu, self.inv_chmax, self.signs, self.kmag, self.kscale, self.vq,
                                  self.vscale, self.kfull, self.vfull, self.fk, self.fv, self.fpos, p, slot,
                                  old if self.quantized else -1)
        else:
            signs, _ = ops.pack_ref(k1[:, :, None], v1[:, :, None], self.mu, None)
            self.signs[:, :, p] = signs[:, :, 0]
            if not self.quantized:
                self.kfull[:, :, p] = k1
                self.vfull[:, :, p] = v1
            elif old >= 0:
                _, q2 = ops.pack_ref(self.fk[:, :, slot, None], self.fv[:, :, slot, None], self.mu, self.inv_chmax)
                for name, t in zip(("kmag", "kscale", "vq", "vscale"), q2):
                    getattr(self, name)[:, :, old] = t[:, :, 0]
            self.fk[:, :, slot] = k1
            self.fv[:, :, slot] = v1
            self.fpos[:, :, slot] = p
        self.n = p + 1

    def selectable(self) -> tuple[int, int]:
        """Positions [lo, hi) that decode steps choose from (quantized in 2+1, outside the window)."""
        return self.base, max(self.base, self.n - self.m.window)

    def n_fp(self) -> int:
        """Tokens in the full-precision set (known on the host: no device sync)."""
        return self.n_fixed + min(self.m.window, max(0, self.n - self.base))

    def n_select(self) -> int:
        """Tokens a decode step selects: the budget minus the full-precision set, at most what is selectable."""
        lo, hi = self.selectable()
        excluded = self.n_fixed if self.m.fixed == "scored" else 0  # scored fixed tokens sit inside [lo, hi)
        return max(0, min(budget_tokens(self.m.budget, self.n) - self.n_fp(), hi - lo - excluded))

    def _attention(self, q: torch.Tensor) -> torch.Tensor:
        """Select, then attend: q [B, Hq, D] -> [B, Hq, D] in q's dtype, over the current state."""
        K = self.n_select()
        if self._use_cuda(q) and 0 < K <= ops.FUSED_K and ops.FUSED:  # one launch: csrc/selfindex.cu decode_kernel
            B, Hq, D = q.shape
            H = self.spec.n_kv_heads
            lo, hi = self.selectable()
            ws = ops.Workspace.get(q.device)
            _, _, ctr = ws.select_buffers(B * H, self.cap)
            cand, cand_n = ws.candidates(B * H, hi - lo, q.device)
            idx = torch.empty(B, H, K, dtype=torch.int32, device=q.device)
            out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
            ops.cuda_ops().decode(q, self.cb, self.signs, self.excl, lo, hi, K, self.fk, self.fv, self.fpos,
                                  self.kmag, self.kscale, self.vq, self.vscale, self.chmax, self.mu, self.kfull,
                                  self.vfull, ctr, cand, cand_n, idx, out, 0)
            self.last_idx = idx
            return out
        idx = self._select(q)
        self.last_idx = idx
        return self._attend(q, idx)

    def _select(self, q: torch.Tensor) -> torch.Tensor:
        """Positions [B, H, K] the GQA-mean query picks (int32 on CUDA, int64 on the reference path)."""
        B, Hq, D = q.shape
        H = self.spec.n_kv_heads
        lo, hi = self.selectable()
        K = self.n_select()
        if self._use_cuda(q):
            idx = torch.empty(B, H, K, dtype=torch.int32, device=q.device)
            if K:
                bins, hist, ctr = ops.Workspace.get(q.device).select_buffers(B * H, self.cap)
                ops.cuda_ops().score_select(q, self.cb, self.signs, self.excl, lo, hi, K, bins, hist, ctr, idx,
                                            0)  # 0 blocks: the launcher sizes one full wave
            return idx
        if K == 0:
            return torch.zeros(B, H, 0, dtype=torch.int64, device=q.device)
        qm = q.float().reshape(B, H, Hq // H, D).mean(2)
        excluded = ops.unpack_bits(self.excl)[:, :, lo:hi] if self.excl is not None else None
        bins = ops.score_bins_ref(ops.lut8_ref(qm, self.cb), self.signs[:, :, lo:hi], excluded)
        return ops.select_ref(bins, K) + lo

    def _attend(self, q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Exact attention of q [B, Hq, D] over the full-precision set and the positions idx [B, H, K]."""
        B, Hq, D = q.shape
        H = self.spec.n_kv_heads
        if self._use_cuda(q):
            out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
            n = self.fk.shape[2] + idx.shape[2]
            split = ops.attend_split(n, B * H, q.device)
            ws = ops.Workspace.get(q.device)
            _, _, ctr = ws.select_buffers(B * H, self.cap)
            part_o, part_ml = ws.partials(B * Hq * -(-n // split), D)
            ops.cuda_ops().attend(q, self.fk, self.fv, self.fpos, idx, idx.shape[2], self.signs, self.kmag,
                                  self.kscale, self.vq, self.vscale, self.chmax, self.mu, self.kfull, self.vfull,
                                  part_o, part_ml, ctr, out, split)
            return out
        i = idx.long()[..., None]
        if self.quantized:
            sgn = ops.unpack_bits(torch.gather(self.signs, 2, i.expand(-1, -1, -1, D // 8))).float() * 2 - 1
            mag = ops.dequant2(torch.gather(self.kmag, 2, i.expand(-1, -1, -1, D // 4)),
                               torch.gather(self.kscale, 2, i[..., None].expand(-1, -1, -1, D // 32, 2)))
            keys = sgn * mag * self.chmax[:, :, None]  # centred keys: their scores lack q . mu
            values = ops.dequant2(torch.gather(self.vq, 2, i.expand(-1, -1, -1, D // 4)),
                                  torch.gather(self.vscale, 2, i[..., None].expand(-1, -1, -1, D // 32, 2)))
            bias = torch.einsum("bhgd,bhd->bhg", q.float().reshape(B, H, Hq // H, D), self.mu).reshape(B, Hq)
        else:
            keys = torch.gather(self.kfull, 2, i.expand(-1, -1, -1, D))
            values = torch.gather(self.vfull, 2, i.expand(-1, -1, -1, D))
            bias = None
        return ops.attend_ref(q, self.fk, self.fv, self.fpos >= 0, keys, values, bias).to(q.dtype)

    # ---------------------------------------------------------------------------------------------------------
    # for the kernel suite

    def decode_fns(self, q):
        q1 = q[:, :, 0]
        idx = self._select(q1)
        return {"attention": lambda: self._attention(q1), "score_select": lambda: self._select(q1),
                "attend": lambda: self._attend(q1, idx)}

    def decode_bytes(self) -> int:
        """Sign bits of every selectable token, the selected tokens' storage, the full-precision set, the codebook."""
        B, H, D = self.signs.shape[0], self.spec.n_kv_heads, self.spec.head_dim
        lo, hi = self.selectable()
        es = self.fk.element_size()
        per_selected = D // 8 + (D // 4 * 2 + D // 32 * 8 if self.quantized else 2 * D * es)
        return B * H * ((hi - lo) * (D // 8) + self.n_select() * per_selected + self.n_fp() * 2 * D * es
                        + self.cb[0, 0].numel() * 4)

    def info(self):
        return {"selected": self.n_select(), "full_precision": self.n_fp(), "impl": "cuda" if self.signs.is_cuda
                and self.m.impl == "auto" else "torch"}
