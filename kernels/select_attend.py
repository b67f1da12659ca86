"""Exact decode attention over the tokens a selecting method chose (quest's pages, doublesparse's top tokens), read
straight from the bf16 cache: the gather, the softmax and P.V in one split-KV kernel, merged by log-sum-exp.

The cache is [B, cap, Hkv, D] (`full`'s layout); idx [B, Hkv, N] names the slots each KV head attends. Grid
(B * Hkv, splits): a program takes a range of idx, loads those K/V rows once for all query heads of its GQA group
(padded to 16 rows for the tensor-core dot), an online softmax in base 2, and writes a partial output and its
log-sum-exp; dense_decode's combine kernel merges the splits (https://crfm.stanford.edu/2023/10/12/flashdecoding.html).
Before, the gather was PyTorch's (an expanded int64 index per element, a [B, Hkv, N, D] copy written and read again
by SDPA): 10% of the tokens cost as much as dense attention over all of them.

Two bounds keep a captured step's shapes fixed: `limit` (only the first limit[0] entries count: the pinned step's
top-k has the reserved room's size, its budget follows the live length) and `live` (slots >= live[b] are not yet
written; an int on the eager path, where the newest page is partly filled). Masked rows are never loaded. With
`page` > 1, idx names pages of that many slots (quest), expanded in the kernel: entry j is slot
idx[j // page] * page + j % page, so no token list is built per step. The PyTorch reference is `attend_ref`.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kvbench.kernels.dense_decode import _combine_kernel
from kvbench.kernels.split_kv import store_partial
from kvbench.kernels.score_triton import interpreting

BLOCK_N = 64  # idx entries per tile
MIN_PER_SPLIT = 64  # idx entries per split at the least
WAVES = 4  # programs per SM to aim for
NUM_WARPS, NUM_STAGES = 4, 2


def attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, limit: torch.Tensor | None = None,
               live: torch.Tensor | int | None = None, page: int = 1) -> torch.Tensor:
    """The reference: q [B, Hq, 1, D] over the slots idx [B, Hkv, N] (or pages: page_slots) of k, v
    [B, cap, Hkv, D]; entries j >= limit[0] and slots >= live[b] left out (fp32 softmax) -> [B, Hq, 1, D]."""
    from kvbench.methods.selection import page_slots

    idx = page_slots(idx, page)
    if isinstance(live, int):
        live = torch.full((q.shape[0],), live, device=q.device)
    B, Hq, _, D = q.shape
    H, N = idx.shape[1], idx.shape[2]
    ok = torch.ones(B, H, N, dtype=torch.bool, device=q.device)
    if limit is not None:
        ok = ok & (torch.arange(N, device=q.device) < limit.reshape(-1)[:1].long())
    if live is not None:
        ok = ok & (idx < live.long()[:, None, None])
    i = idx.clamp(0, k.shape[1] - 1)[..., None].expand(-1, -1, -1, D)
    kk, vv = k.transpose(1, 2).gather(2, i).float(), v.transpose(1, 2).gather(2, i).float()  # [B, Hkv, N, D]
    vv = vv.masked_fill(~ok[..., None], 0.0)  # never-written slots may hold NaN: 0 * NaN is NaN
    s = q.float().reshape(B, H, Hq // H, D) @ kk.transpose(-1, -2) * D**-0.5  # [B, Hkv, g, N]
    p = s.masked_fill(~ok[:, :, None], float("-inf")).softmax(-1)
    return (p @ vv).view(B, Hq, 1, D).to(q.dtype)


@triton.jit
def _select_split_kernel(Q, K, V, IDX, LIMIT, LIVE, live_n, OP, LSE, N, per, sq_b, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t,
                         sv_h, si_b, si_h, n_splits, scale_log2, HKV: tl.constexpr, GROUP: tl.constexpr,
                         M: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
                         HAS_LIMIT: tl.constexpr, HAS_LIVE: tl.constexpr, LIVE_ON_DEVICE: tl.constexpr,
                         PAGE: tl.constexpr, PRECISION: tl.constexpr):
    bh, s = tl.program_id(0), tl.program_id(1)
    b, h = bh // HKV, bh % HKV
    lo = s * per
    hi = tl.minimum(lo + per, N)
    if HAS_LIMIT:
        hi = tl.minimum(hi, tl.load(LIMIT).to(tl.int32))
    n_live = live_n
    if LIVE_ON_DEVICE:
        n_live = tl.load(LIVE + b)
    rows, d = tl.arange(0, M), tl.arange(0, DP)
    dm = d < D
    q = tl.load(Q + b * sq_b + (h * GROUP + rows)[:, None] * sq_h + d[None, :],
                mask=(rows < GROUP)[:, None] & dm[None, :], other=0.0)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, DP], tl.float32)
    b64 = b.to(tl.int64)  # a [B, cap, Hkv, D] buffer may pass 2^31 elements
    k_base, v_base = K + b64 * sk_b + h * sk_h, V + b64 * sv_b + h * sv_h
    i_base = IDX + b64 * si_b + h * si_h
    for start in range(lo, hi, BLOCK):
        j = start + tl.arange(0, BLOCK)
        ok = j < hi
        slot = tl.load(i_base + j // PAGE, mask=ok, other=0).to(tl.int64) * PAGE + j % PAGE
        if HAS_LIVE:
            ok = ok & (slot < n_live)
        k = tl.load(k_base + slot[:, None] * sk_t + d[None, :], mask=ok[:, None] & dm[None, :], other=0.0)
        sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [M, BLOCK]
        sc = tl.where(ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with nothing live yet: no -inf - -inf
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(sc - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * sv_t + d[None, :], mask=ok[:, None] & dm[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    row = (b * HKV * GROUP + h * GROUP + rows) * n_splits + s  # [B, Hq, splits] partials
    store_partial(OP, LSE, row, acc, l_i, m_i, d, DP, rows < GROUP)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def plan_splits(B: int, Hkv: int, N: int, device: torch.device) -> int:
    """Splits per (sequence, KV head): about WAVES programs per SM, none shorter than MIN_PER_SPLIT entries. Fixed by
    idx's size, not by limit, so a captured step keeps it."""
    want = -(-WAVES * _sm_count(device) // (B * Hkv))
    return max(1, min(want, -(-N // MIN_PER_SPLIT)))


def select_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                  limit: torch.Tensor | None = None, live: torch.Tensor | int | None = None,
                  page: int = 1) -> torch.Tensor:
    """attend_ref in two kernels: q [B, Hq, 1, D], k, v [B, cap, Hkv, D] (last dim contiguous), idx [B, Hkv, N]
    int32/int64 slots (pages of `page` slots: N * page entries), limit int [1] on the device, live int32 [B] on the
    device or an int (or None) -> [B, Hq, 1, D] in q's dtype. No host sync; the scratch is allocated per call (a
    CUDA graph's pool holds it)."""
    B, Hq, _, D = q.shape
    H, N = idx.shape[1], idx.shape[2] * page
    assert k.stride(3) == 1 and v.stride(3) == 1 and k.shape[2] == H and Hq % H == 0
    if idx.stride(2) != 1:
        idx = idx.contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    splits = plan_splits(B, H, N, q.device)
    per = -(-N // splits)
    per = -(-per // BLOCK_N) * BLOCK_N  # whole tiles per split
    splits = max(1, -(-N // per))
    DP = max(16, triton.next_power_of_2(D))
    op = torch.empty(B * Hq * splits, DP, dtype=torch.float32, device=q.device)
    lse = torch.empty(B * Hq * splits, dtype=torch.float32, device=q.device)
    out = torch.empty(B, Hq, 1, D, dtype=q.dtype, device=q.device)
    exact = q.dtype == torch.float32 or interpreting()
    group = Hq // H
    _select_split_kernel[(B * H, splits)](
        q, k, v, idx, q if limit is None else limit, live if isinstance(live, torch.Tensor) else q,
        live if isinstance(live, int) else 0, op, lse, N, per,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        idx.stride(0), idx.stride(1), splits, D**-0.5 * math.log2(math.e), HKV=H, GROUP=group,
        M=max(16, triton.next_power_of_2(group)), D=D, DP=DP, BLOCK=BLOCK_N, HAS_LIMIT=limit is not None,
        HAS_LIVE=live is not None, LIVE_ON_DEVICE=isinstance(live, torch.Tensor), PAGE=page,
        PRECISION="ieee" if exact else "tf32", num_warps=NUM_WARPS,
        num_stages=NUM_STAGES)
    if DP == D:
        _combine_kernel[(B * Hq,)](op, lse, out, splits, out.stride(0), out.stride(1), HQ=Hq, D=D,
                                   P=triton.next_power_of_2(splits), CH=16, num_warps=4)
        return out
    # a head dim that is not a power of two: merge in PyTorch (the combine kernel wants D a power of two)
    lse = lse.view(B, Hq, splits)
    w = torch.exp2(lse - lse.amax(-1, keepdim=True))
    o = (op.view(B, Hq, splits, DP)[..., :D] * w[..., None]).sum(2) / w.sum(-1)[..., None]
    return o[:, :, None].to(q.dtype)
