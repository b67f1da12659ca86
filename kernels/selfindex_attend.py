"""selfindex sparse decode attention in Triton: split-KV over the full-precision set and the selected tokens, rows
gathered whole, dequantized in registers, tensor-core dots, a log-sum-exp merge in the same launch.

It replaced a CUDA kernel (tiles of 32 tokens staged in shared memory as floats, scalar FP32 dots: issue-bound on
shared memory). On an H200 (Llama-3.1-8B attention shape, bf16, CUDA graph over one warm copy, with the merge still a
second kernel), 10% budget: 48.9 us against 104.7 at 32K x 8, 154.8 against 305.0 at 128K x 8; 160 tokens at 32K x 1:
6.0 against 8.5. It is still about 10x its bytes (about 5 us at 32K x 8); cutting the selection into 64 to 448 tokens
per program changed its time by under 10%, so it is not waiting on its tiles one after another; what bounds it
(the unpacking's instructions, most likely) is not measured yet. Per program (one KV head, one range of the list
"full-precision slots, then selected tokens"):

- each tile of BLOCK_N selected tokens loads its positions, then every packed row of those tokens whole: the sign
  bits (D/32 words), the 2-bit key magnitudes and values (D/16 words each) and the (scale, zero) pairs of both. A row
  is contiguous, so the loads are 16-byte vectors; rows of different tokens are independent, so a random selection
  costs whole 32-byte sectors and nothing more (sorting the selection would not make rows share sectors at the
  budgets that matter: at 10% neighbours sit about 10 positions apart);
- codes are unpacked in registers (kivi.py's `_codes`: interleave, shift, mask, exponent-bit int -> float); the key
  magnitude (zero + scale * code, never negative) takes its sign bit by a select, and the per-channel max |k| that
  2+1 divides keys by is folded into the query once (q . (sign * mag * chmax) = (q * chmax) . (sign * mag));
- all query heads of the KV head form the rows of one tensor-core dot (padded to 16), in fp16 for fp16 and bf16
  models alike (the scales are fp16), accumulating in fp32; the centred keys' missing q . mu is added per head;
- each program writes its (o, lse); the last of a (b, h) to finish merges them with a log-sum-exp, as
  flash-decoding's combine does, in the same launch.

16+1 reads the selected tokens' fp16/bf16 rows from kfull/vfull instead. The full-precision set is its own part (slots
with fpos < 0 masked). bf16 keys and values enter the dots as fp16, as in kivi.py: exact for every bf16 value within
fp16's range (fp16 has more mantissa), which holds for attention keys and values in practice.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvbench.kernels.kivi import _codes, _sm_count

BLOCK_N = 64  # tokens per tile
ATTEND_COUNTER = 7  # the workspace counter per (b, h) that counts finished parts (csrc/selfindex.h: 0-5 are select's)
MIN_SPLIT = 64  # selected tokens per program at least: fewer programs than that are not worth their partials
PROGRAMS_PER_SM = 16  # the selection is cut into about this many programs per SM: short ones hide gather latency
MAX_PARTS = 64  # but into no more parts per (b, h) than this: the last program merges them one block of 32 at a time


@triton.jit
def _dequant(words, sz, D: tl.constexpr, BITS: tl.constexpr, SPREAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """2-bit rows [BLOCK_N, D*BITS/32] words and their (scale, zero) pairs sz [BLOCK_N, 2 * D/32] fp16 ->
    zero + scale * code, fp16 [BLOCK_N, D]."""
    NG: tl.constexpr = D // 32
    codes = tl.reshape(_codes(words, BITS, SPREAD, D, tl.float16), (BLOCK_N, NG, 32))
    scale, zero = tl.split(tl.reshape(sz, (BLOCK_N, NG, 2)))
    return tl.reshape(codes * scale[:, :, None] + zero[:, :, None], (BLOCK_N, D))


@triton.jit
def _tile_softmax(q, k, v, s_bias, valid, m_i, l_i, acc):
    """One tile of the online softmax in base 2: q [M, D], k/v [BLOCK_N, D] (same dtype), s_bias [M] added to every
    score, valid [BLOCK_N]."""
    s = tl.dot(q, tl.trans(k)) + s_bias[:, None]
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a head that has seen only masked tokens so far
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _selfindex_attend_kernel(
    Q, FK, FV, FPOS, IDX, SG, KM, KS, VQ, VS, CHMAX, MU, KF, VF, OP, LSE, OUT, CTR, NSEL,
    stride_qb, stride_qh, n_sel, kmax, cap, split, n_parts, qk_scale,
    H: tl.constexpr, GROUP: tl.constexpr, M: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr, NC: tl.constexpr, DYN: tl.constexpr,
):
    if DYN:  # a planned step: how many of the kmax slots of IDX hold this step's selection, read on the device
        n_sel = tl.load(NSEL)
    bh = tl.program_id(0)
    part = tl.program_id(1)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, D)
    head_ok = offs_m < GROUP
    heads = h * GROUP + offs_m
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=head_ok[:, None],
                other=0.0).to(tl.float32) * qk_scale
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    if part == 0:  # the full-precision set: slots [0, F), those with fpos >= 0
        offs_f = tl.arange(0, BLOCK_F)
        ok = (offs_f < F) & (tl.load(FPOS + bh64 * F + offs_f, mask=offs_f < F, other=-1) >= 0)
        rows = (bh64 * F + offs_f)[:, None] * D + offs_d[None, :]
        k = tl.load(FK + rows, mask=ok[:, None], other=0.0).to(tl.float16)
        v = tl.load(FV + rows, mask=ok[:, None], other=0.0).to(tl.float16)
        m_i, l_i, acc = _tile_softmax(q.to(tl.float16), k, v, tl.zeros([M], tl.float32), ok, m_i, l_i, acc)
    else:
        lo = (part - 1) * split
        hi = tl.minimum(lo + split, n_sel)
        if QUANT:
            chm = tl.load(CHMAX + bh64 * D + offs_d)
            bias = tl.sum(q * tl.load(MU + bh64 * D + offs_d)[None, :], 1)  # centred keys lack q . mu
            qq = (q * chm[None, :]).to(tl.float16)
        else:
            bias = tl.zeros([M], tl.float32)
            qq = q.to(tl.float16)
        for start in range(lo, hi, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            ok = j < hi
            tok = bh64 * cap + tl.load(IDX + bh64 * kmax + j, mask=ok, other=0)
            if QUANT:
                signs = tl.load(SG + tok[:, None] * (D // 32) + tl.arange(0, D // 32)[None, :], mask=ok[:, None],
                                other=0)
                neg = _codes(signs, 1, 5, D, tl.int32) == 0
                W: tl.constexpr = D // 16
                sz_offs = tok[:, None] * (D // 16) + tl.arange(0, D // 16)[None, :]
                kw = tl.load(KM + tok[:, None] * W + tl.arange(0, W)[None, :], mask=ok[:, None], other=0)
                mag = _dequant(kw, tl.load(KS + sz_offs, mask=ok[:, None], other=0.0), D, 2, 4, BLOCK_N)
                k = tl.where(neg, -mag, mag)
                vw = tl.load(VQ + tok[:, None] * W + tl.arange(0, W)[None, :], mask=ok[:, None], other=0)
                v = _dequant(vw, tl.load(VS + sz_offs, mask=ok[:, None], other=0.0), D, 2, 4, BLOCK_N)
            else:
                rows = tok[:, None] * D + offs_d[None, :]
                k = tl.load(KF + rows, mask=ok[:, None], other=0.0).to(tl.float16)
                v = tl.load(VF + rows, mask=ok[:, None], other=0.0).to(tl.float16)
            m_i, l_i, acc = _tile_softmax(qq, k, v, bias, ok, m_i, l_i, acc)

    # this part's normalized output and log2-sum-exp2; a part without tokens has lse -inf and weighs nothing
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    rows_out = (b * H * GROUP + heads).to(tl.int64) * n_parts + part
    tl.store(OP + rows_out[:, None] * D + offs_d[None, :], o, mask=head_ok[:, None])
    tl.store(LSE + rows_out, lse, mask=head_ok)
    # the last program of this (b, h) to finish merges all its parts: one launch per step, not two (the host time of
    # a Triton launch is what a decode step at batch 1 costs most)
    tl.debug_barrier()  # every thread's partials are written before the release below
    done = tl.atomic_add(CTR + bh * NC, 1, sem="acq_rel", scope="gpu")
    if done == n_parts - 1:
        _merge_parts(OP, LSE, OUT, (b * H * GROUP + h * GROUP).to(tl.int64), n_parts, GROUP, M, D)
        tl.store(CTR + bh * NC, 0)  # every part has counted: ready for the next step


@triton.jit
def _merge_parts(OP, LSE, OUT, row0, n_parts, GROUP: tl.constexpr, M: tl.constexpr, D: tl.constexpr):
    """out[row0 + i] = the log-sum-exp merge of the n_parts partial outputs of query head row0 + i (i < GROUP),
    whose rows are (row0 + i) * n_parts + part. Rows are read 32 at a time whatever head they belong to; a one-hot
    weight matrix sorts them into heads through a dot."""
    RB: tl.constexpr = 32
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, D)
    n_rows = GROUP * n_parts
    base = row0 * n_parts
    mx = tl.full([M], float("-inf"), tl.float32)
    for r0 in range(0, n_rows, RB):
        r = r0 + tl.arange(0, RB)
        lse = tl.load(LSE + base + r, mask=r < n_rows, other=float("-inf"), cache_modifier=".cg")
        mine = (r // n_parts)[None, :] == offs_m[:, None]  # [M, RB]: row r belongs to head m
        mx = tl.maximum(mx, tl.max(tl.where(mine, lse[None, :], float("-inf")), 1))
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    acc = tl.zeros([M, D], tl.float32)
    wsum = tl.zeros([M], tl.float32)
    for r0 in range(0, n_rows, RB):
        r = r0 + tl.arange(0, RB)
        ok = r < n_rows
        lse = tl.load(LSE + base + r, mask=ok, other=float("-inf"), cache_modifier=".cg")
        mine = (r // n_parts)[None, :] == offs_m[:, None]
        w = tl.where(mine, tl.exp2(lse[None, :] - mx[:, None]), 0.0)  # an empty part (lse -inf) weighs 0
        o = tl.load(OP + (base + r)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0,
                    cache_modifier=".cg")
        acc += tl.dot(w, o, input_precision="ieee")
        wsum += tl.sum(w, 1)
    out = acc / tl.where(wsum == 0.0, 1.0, wsum)[:, None]
    tl.store(OUT + (row0 + offs_m)[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=(offs_m < GROUP)[:, None])


def plan(n_sel: int, bh: int, device: torch.device, split: int | None = None) -> tuple[int, int]:
    """(split, n_parts): selected tokens per program, a multiple of BLOCK_N, and parts per (b, h) including the
    full-precision one. About PROGRAMS_PER_SM programs per SM over the selection, at least MIN_SPLIT tokens each, at
    most MAX_PARTS parts."""
    if n_sel == 0:
        return BLOCK_N, 1
    if split is None:
        split = max(MIN_SPLIT, triton.cdiv(n_sel * bh, PROGRAMS_PER_SM * _sm_count(device)),
                    triton.cdiv(n_sel, MAX_PARTS))
    split = triton.cdiv(split, BLOCK_N) * BLOCK_N
    return split, triton.cdiv(n_sel, split) + 1


def _rows(kv) -> list[torch.Tensor]:
    """The kernel's views of kv's buffers (packed rows as 32-bit words, (scale, zero) pairs as fp16 rows), made once
    per buffer allocation: the views cost more host time than the launch itself."""
    cached = getattr(kv, "_attend_rows", None)
    if cached is not None and cached[0] is kv.signs:
        return cached[1]
    if kv.quantized:
        rows = [kv.signs.view(torch.int32), kv.kmag.view(torch.int32), kv.kscale.flatten(-2),
                kv.vq.view(torch.int32), kv.vscale.flatten(-2), kv.chmax, kv.mu, kv.fk, kv.fk]
    else:
        rows = [kv.fk] * 7 + [kv.kfull, kv.vfull]  # unused pointers: anything valid
    kv._attend_rows = (kv.signs, rows)
    return rows


def scratch(B: int, Hq: int, H: int, D: int, n_sel: int, cap: int, device: torch.device, split: int | None = None):
    """(split, n_parts, partial outputs, lse, counters) for a call over n_sel selected tokens: the workspace's
    buffers, grown here when too small (so a planned step calls it once at reserve(), and never allocates after)."""
    from kvbench.kernels.selfindex import Workspace

    split, n_parts = plan(n_sel, B * H, device, split)
    ws = Workspace.get(device)
    op, lse = ws.partials(B * Hq * n_parts, D)
    _, _, ctr = ws.select_buffers(B * H, cap)
    return split, n_parts, op, lse, ctr[ATTEND_COUNTER:]


def attend(q: torch.Tensor, kv, idx: torch.Tensor, split: int | None = None, *, nsel: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse decode attention of q [B, Hq, D] over the full-precision set of kv (a selfindex.IndexedKV) and the
    positions idx [B, H, K]: [B, Hq, D] in q's dtype. `split`: selected tokens per program (default: plan()).
    A planned step passes nsel (int32 on the device: how many of idx's K slots are live; the grid is sized for K)
    and `out`, so the launch is the same every step."""
    from kvbench.kernels.selfindex import N_COUNTERS

    B, Hq, D = q.shape
    H, F = kv.fk.shape[1], kv.fk.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    n_sel = idx.shape[2]
    split, n_parts, op, lse, ctr = scratch(B, Hq, H, D, n_sel, kv.cap, q.device, split)
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    rows = _rows(kv)
    group = Hq // H
    # with nothing selected IDX still needs a valid pointer of idx's integer type: Triton types `tok` from it
    _selfindex_attend_kernel[(B * H, n_parts)](
        q, kv.fk, kv.fv, kv.fpos, idx if n_sel else idx.new_zeros(1), *rows, op, lse, out, ctr,
        nsel if nsel is not None else ctr,
        q.stride(0), q.stride(1), n_sel, max(1, n_sel), kv.cap, split, n_parts, D**-0.5 * math.log2(math.e),
        H=H, GROUP=group, M=max(16, triton.next_power_of_2(group)), D=D, F=F,
        BLOCK_F=max(16, triton.next_power_of_2(F)), BLOCK_N=BLOCK_N, QUANT=kv.quantized, NC=N_COUNTERS,
        DYN=nsel is not None, num_warps=4, num_stages=2,
    )
    return out


@triton.jit
def _next_plan_kernel(TABLE, STEP, PLAN, W: tl.constexpr):
    i = tl.load(STEP)
    r = tl.arange(0, 8)
    tl.store(PLAN + r, tl.load(TABLE + i * W + r, mask=r < W, other=0), mask=r < W)
    tl.store(STEP, i + 1)


def next_plan(table: torch.Tensor, step: torch.Tensor, plan: torch.Tensor) -> None:
    """plan[:W] = table[step], then step += 1, on the device in one launch: table [n, W] int32 (W <= 8), step int32
    [1], plan int32 [>= W]. How a captured selfindex step learns its position, slot and selection size."""
    _next_plan_kernel[(1,)](table, step, plan, W=table.shape[1], num_warps=1)
