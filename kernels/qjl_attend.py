"""qjl's decode step on the GPU: the estimator's scores from the sign bits (`qjl_scores`), and the whole attention in
one split-KV kernel (`qjl_attention`): scores, online softmax and P.V over the 2/4-bit values dequantized in
registers, the full-precision buffer as one more split, merged by log-sum-exp (dense_decode's combine kernel).

Before, a step ran a score kernel, a PyTorch softmax over fp32 scores per query head and P.V over values dequantized to
fp32 [B, Hkv, N, D] in memory: 6.4 ms at 32K x 8 on an H200 where the bytes read take 58 us. The score kernel itself
took 2.3 ms: it compiled to 255 registers plus a stack (spills), one tiny program per 32-token group. A first fused
kernel (commit 9cc3d6a) read the sketch in chunks and unpacked bits through 3-D reshapes (layout shuffles on the GPU):
3,954 us, and it failed its GPU parity test. Here every tile is 2-D: a token's sign bit m is bit m % 8 of byte m // 8
(the byte loaded once per bit from L1), a value's code is bits of word d // E, so nothing is reshaped.

Grid (B * Hkv, splits): a program takes a range of tiles of BLOCK tokens for all query heads of its GQA group (padded
to 16 rows for the tensor-core dots). With outliers a tile is one group of `group` tokens, so it has one set of
outlier channels: the query's outlier part projected, q_o S (an fp32 dot over those rows of S), is taken from the
sketched query w = q S for the inlier term and used alone for the outlier term. Sign dots run on fp16 sketched queries
(relative error ~5e-4, far below the estimator's own), fp32 sums. The references are QJLLayer.estimate and
QJLLayer.attention's PyTorch path (methods/qjl.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvbench.kernels.dense_decode import _combine_kernel
from kvbench.kernels.score_triton import interpreting
from kvbench.kernels.select_attend import _sm_count
from kvbench.kernels.split_kv import store_partial

WAVES = 8  # programs per SM to aim for (attention)
BLOCK_PLAIN = 64  # tokens a tile without outliers (with them: one group)
NUM_WARPS = 8
BLOCK_R = 32  # buffer tokens a tile


def supported(D: int, m: int, mo: int, outliers: int, group: int, value_bits: int) -> bool:
    """Shapes the kernels take (else the PyTorch path runs): powers of two >= 16 for the tl.dot tiles."""
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0  # noqa: E731
    ok = pow2(D) and pow2(m) and value_bits in (2, 4)
    return ok and (not outliers or (pow2(mo) and mo <= m and pow2(group) and outliers <= 16))


@triton.jit
def _signs(SIGNS, tok, ok, m, MB: tl.constexpr):
    """+1 / -1 in fp16 [BLOCK, MB]: sign bit m of each token tok (bit m % 8 of byte m // 8)."""
    byte = tl.load(SIGNS + tok[:, None] * (MB // 8) + (m // 8)[None, :], mask=ok[:, None], other=0).to(tl.int32)
    return (((byte >> (m % 8)[None, :]) & 1) * 2 - 1).to(tl.float16)


@triton.jit
def _estimate(Q, w, PROJ, IDX, SIN, NIN, SOUT, NOUT, bh, t, NQ, NG, qrow, qm, c_in, c_out, D: tl.constexpr,
              M: tl.constexpr, MO: tl.constexpr, O: tl.constexpr, OPAD: tl.constexpr, BLOCK: tl.constexpr,
              HAS_OUT: tl.constexpr):
    """Tile t's estimated q.k [GP, BLOCK] fp32 for the query rows qrow (w = their q S, [GP, M] fp32), with its tokens'
    flat offsets and validity."""
    rows = t * BLOCK + tl.arange(0, BLOCK)
    ok = rows < NQ
    tok = bh.to(tl.int64) * NQ + rows
    m = tl.arange(0, M)
    w_in = w
    if HAS_OUT:  # this group's outlier channels, the query there, and its projection q_o S
        o = tl.arange(0, OPAD)
        om = o < O
        idx = tl.load(IDX + (bh * NG + t) * O + o, mask=om, other=0).to(tl.int32)
        q_o = tl.load(Q + qrow[:, None] * D + idx[None, :], mask=qm[:, None] & om[None, :], other=0.0)
        s_o = tl.load(PROJ + idx[:, None] * M + m[None, :], mask=om[:, None], other=0.0)
        qs_o = tl.dot(q_o, s_o, input_precision="ieee")  # [GP, M]
        w_in = w - qs_o
        if MO == M:
            qs_out = qs_o
        else:  # S' is the first MO columns of S
            mo = tl.arange(0, MO)
            s_o2 = tl.load(PROJ + idx[:, None] * M + mo[None, :], mask=om[:, None], other=0.0)
            qs_out = tl.dot(q_o, s_o2, input_precision="ieee")
        d_out = tl.dot(qs_out.to(tl.float16), tl.trans(_signs(SOUT, tok, ok, tl.arange(0, MO), MO)))
        n_out = tl.load(NOUT + tok, mask=ok, other=0.0).to(tl.float32)
    d_in = tl.dot(w_in.to(tl.float16), tl.trans(_signs(SIN, tok, ok, m, M)))  # [GP, BLOCK]
    n_in = tl.load(NIN + tok, mask=ok, other=0.0).to(tl.float32)
    est = d_in * (c_in * n_in)[None, :]
    if HAS_OUT:
        est += d_out * (c_out * n_out)[None, :]
    return est, tok, ok


@triton.jit
def _scores_kernel(Q, W, PROJ, IDX, SIN, NIN, SOUT, NOUT, OUT, NQ, NG, c_in, c_out, HKV: tl.constexpr,
                   GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, M: tl.constexpr, MO: tl.constexpr,
                   O: tl.constexpr, OPAD: tl.constexpr, BLOCK: tl.constexpr, HAS_OUT: tl.constexpr):
    bh, t = tl.program_id(0), tl.program_id(1)
    rq = tl.arange(0, GP)
    qm = rq < GROUP
    qrow = bh * GROUP + rq
    w = tl.load(W + qrow[:, None] * M + tl.arange(0, M)[None, :], mask=qm[:, None], other=0.0)
    est, tok, ok = _estimate(Q, w, PROJ, IDX, SIN, NIN, SOUT, NOUT, bh, t, NQ, NG, qrow, qm, c_in, c_out, D, M, MO, O,
                             OPAD, BLOCK, HAS_OUT)
    rows = t * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + qrow[:, None].to(tl.int64) * NQ + rows[None, :], est, mask=qm[:, None] & ok[None, :])


@triton.jit
def _attend_kernel(Q, W, PROJ, IDX, SIN, NIN, SOUT, NOUT, VQ, VS, VM, RK, RV, OP, LSE, NQ, NG, R, tiles_per,
                   n_splits, c_in, c_out, qk_log2, srk_b, srk_h, srk_t, srv_b, srv_h, srv_t, HKV: tl.constexpr,
                   GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, M: tl.constexpr, MO: tl.constexpr,
                   O: tl.constexpr, OPAD: tl.constexpr, BLOCK: tl.constexpr, VBITS: tl.constexpr,
                   HAS_OUT: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    bh, s = tl.program_id(0), tl.program_id(1)
    b, h = bh // HKV, bh % HKV
    rq, d = tl.arange(0, GP), tl.arange(0, D)
    qm = rq < GROUP
    qrow = bh * GROUP + rq  # q [B, Hq, D]: this KV head's query heads
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    E: tl.constexpr = 32 // VBITS  # codes a word: channel d is bits (d % E) * VBITS of word d // E
    if s < n_splits - 1:  # quantized tokens, tiles [t0, t1)
        w = tl.load(W + qrow[:, None] * M + tl.arange(0, M)[None, :], mask=qm[:, None], other=0.0)
        t0 = s * tiles_per
        t1 = tl.minimum(t0 + tiles_per, tl.cdiv(NQ, BLOCK))
        for t in range(t0, t1):
            est, tok, ok = _estimate(Q, w, PROJ, IDX, SIN, NIN, SOUT, NOUT, bh, t, NQ, NG, qrow, qm, c_in, c_out, D,
                                     M, MO, O, OPAD, BLOCK, HAS_OUT)
            sc = tl.where(ok[None, :], est * qk_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            word = tl.load(VQ + tok[:, None] * (D // E) + (d // E)[None, :], mask=ok[:, None], other=0)
            code = ((word >> ((d % E) * VBITS)[None, :]) & ((1 << VBITS) - 1)).to(tl.float32)
            g = tok[:, None] * (D // 32) + (d // 32)[None, :]  # scale and minimum per 32 channels
            val = code * tl.load(VS + g, mask=ok[:, None], other=0.0).to(tl.float32) + \
                tl.load(VM + g, mask=ok[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), val.to(tl.float16))
            m_i = m_new
    else:  # the full-precision buffer, exactly
        q = tl.load(Q + qrow[:, None] * D + d[None, :], mask=qm[:, None], other=0.0)
        rk_base = RK + b.to(tl.int64) * srk_b + h * srk_h
        rv_base = RV + b.to(tl.int64) * srv_b + h * srv_h
        for start in range(0, R, BLOCK_R):
            rr = start + tl.arange(0, BLOCK_R)
            ok = rr < R
            k = tl.load(rk_base + rr[:, None] * srk_t + d[None, :], mask=ok[:, None], other=0.0)
            sc = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=PRECISION) * qk_log2
            sc = tl.where(ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(rv_base + rr[:, None] * srv_t + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    row = qrow * n_splits + s  # [B, Hq, splits] partials
    store_partial(OP, LSE, row, acc, l_i, m_i, d, D, qm)


def _key_args(q1: torch.Tensor, proj: torch.Tensor, keys, signs, norms) -> tuple[list, dict, int]:
    """The key-side arguments both kernels take: (tensors, constexprs, groups). keys an OutlierKeys, or None with signs
    [B, Hkv, nq, m / 8] and norms [B, Hkv, nq]."""
    B, Hq, D = q1.shape
    m = proj.shape[1]
    if keys is not None:
        idx, signs, norms, out_signs, out_norms = keys.idx, keys.signs, keys.norms, keys.out_signs, keys.out_norms
        NG, O, mo, block = idx.shape[2], idx.shape[3], out_signs.shape[3] * 8, norms.shape[2] // max(1, idx.shape[2])
    else:
        idx, out_signs, out_norms, NG, O, mo, block = signs, signs, norms, 1, 1, m, BLOCK_PLAIN
    qf = q1.float().contiguous()
    w = qf @ proj  # [B, Hq, m]: the sketched queries
    tensors = [qf, w.contiguous(), proj.float().contiguous()] + [t.contiguous() for t in
                                                                 (idx, signs, norms, out_signs, out_norms)]
    group = Hq // signs.shape[1]
    meta = dict(HKV=signs.shape[1], GROUP=group, GP=max(16, triton.next_power_of_2(group)), D=D, M=m, MO=mo, O=O,
                OPAD=max(16, triton.next_power_of_2(O)), BLOCK=max(16, block), HAS_OUT=keys is not None)
    return tensors, meta, NG


def qjl_scores(q1: torch.Tensor, proj: torch.Tensor, keys=None, signs=None, norms=None) -> torch.Tensor:
    """The estimator for one query per head: q1 [B, Hq, D] over the quantized keys (keys an OutlierKeys, or signs and
    norms without outliers) -> [B, Hq, nq] fp32."""
    B, Hq, D = q1.shape
    nq = (keys.norms if keys is not None else norms).shape[2]
    out = torch.empty(B, Hq, nq, dtype=torch.float32, device=q1.device)
    if nq:
        tensors, meta, NG = _key_args(q1, proj, keys, signs, norms)
        c = math.sqrt(math.pi / 2)
        _scores_kernel[(B * meta["HKV"], triton.cdiv(nq, meta["BLOCK"]))](
            *tensors, out, nq, NG, c / meta["M"], c / meta["MO"], **meta, num_warps=NUM_WARPS)
    return out


def qjl_attention(q1: torch.Tensor, proj: torch.Tensor, keys, signs, norms, vq, vs, vm, value_bits: int,
                  rk: torch.Tensor, rv: torch.Tensor) -> torch.Tensor:
    """One query per head, q1 [B, Hq, D], over the nq quantized tokens (keys as for qjl_scores; values vq int32
    [B, Hkv, nq, W], vs, vm fp16 [B, Hkv, nq, D / 32]) and the buffer rk, rv [B, Hkv, R, D] -> [B, Hq, 1, D] in rk's
    dtype."""
    B, Hq, D = q1.shape
    H, nq, R = vq.shape[1], vq.shape[2], rk.shape[2]
    tensors, meta, NG = _key_args(q1, proj, keys, signs, norms)
    if rk.stride(3) != 1 or rv.stride(3) != 1:
        rk, rv = rk.contiguous(), rv.contiguous()
    tiles = -(-nq // meta["BLOCK"])
    want = max(1, -(-WAVES * _sm_count(q1.device) // (B * H)))
    per = max(1, -(-tiles // max(1, min(want, tiles))))
    splits = -(-tiles // per) + 1  # the last: the buffer
    op = torch.empty(B * Hq * splits, D, dtype=torch.float32, device=q1.device)
    lse = torch.empty(B * Hq * splits, dtype=torch.float32, device=q1.device)
    out = torch.empty(B, Hq, 1, D, dtype=rk.dtype, device=q1.device)
    c = math.sqrt(math.pi / 2)
    exact = rk.dtype == torch.float32 or interpreting()
    _attend_kernel[(B * H, splits)](
        *tensors, vq.contiguous(), vs.contiguous(), vm.contiguous(), rk, rv, op, lse, nq, NG, R, per, splits,
        c / meta["M"], c / meta["MO"], D**-0.5 * math.log2(math.e), rk.stride(0), rk.stride(1), rk.stride(2),
        rv.stride(0), rv.stride(1), rv.stride(2), **meta, VBITS=value_bits, BLOCK_R=BLOCK_R,
        PRECISION="ieee" if exact else "tf32", num_warps=NUM_WARPS, num_stages=2)
    _combine_kernel[(B * Hq,)](op, lse, out, splits, out.stride(0), out.stride(1), HQ=Hq, D=D,
                               P=triton.next_power_of_2(splits), CH=16, num_warps=4)
    return out
