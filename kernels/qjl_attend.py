"""qjl's decode attention in one split-KV kernel: the estimator's scores from the sign bits, the online softmax and
P.V over the 2/4-bit values, dequantized in registers, with the full-precision buffer as one more split; merged by
log-sum-exp (dense_decode's combine kernel).

Before, a step ran the score kernel (kernels/score_triton.py, writing fp32 scores per query head), a PyTorch softmax,
and P.V over values dequantized to fp32 [B, Hkv, N, D] in memory: 6.5 ms at 32K x 8 on an H200 where the bytes
read take 58 us. Here every byte of the quantized cache is read once, and nothing of size N is written.

Grid (B * Hkv, splits + 1). A program of the first `splits` takes a range of tiles of BLOCK tokens for all query
heads of its GQA group (padded to 16 rows for the tensor-core dots); with outliers a tile is one group of `group`
tokens, so it has one set of outlier channels. The sketch dimension is read in chunks of CH bits, so no [16, m] tile
sits in registers: per chunk <w - q_o S, s> = 2 <w - q_o S, bits> - sum(w - q_o S), bits in {0, 1} as fp16 (the
sketched queries in fp16, as score_triton's kernels do; relative error ~5e-4, far below the estimator's own). The
last program attends the buffer exactly. The reference is QJLLayer.attention's PyTorch path (methods/qjl.py).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kvbench.kernels.dense_decode import _combine_kernel
from kvbench.kernels.score_triton import interpreting

WAVES = 4  # programs per SM to aim for
CHUNK = 64  # sketch bits per chunk
NUM_WARPS = 8


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def supported(D: int, m: int, mo: int, outliers: int, group: int, value_bits: int) -> bool:
    """Shapes the kernel takes (else the PyTorch path runs): powers of two for the tl.dot tiles."""
    ch = min(CHUNK, m, mo) if outliers else min(CHUNK, m)
    ok = _pow2(D) and D % 32 == 0 and _pow2(m) and m % ch == 0 and value_bits in (2, 4)
    return ok and (not outliers or (_pow2(mo) and mo % ch == 0 and mo <= m and _pow2(group) and outliers <= 16))


@triton.jit
def _sign_dot(w, SIGNS, tok, ok, c0, NB: tl.constexpr, CH: tl.constexpr, BLOCK: tl.constexpr):
    """2 <w, bits> - sum(w) = <w, s> for w [M, CH] fp16 and the CH sign bits from bit c0 of each token: [M, BLOCK]."""
    byte = tl.load(SIGNS + tok[:, None] * NB + (c0 // 8 + tl.arange(0, CH // 8))[None, :], mask=ok[:, None], other=0)
    bits = (byte.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    bits = tl.reshape(bits, (BLOCK, CH)).to(tl.float16)
    return 2.0 * tl.dot(w, tl.trans(bits)) - tl.sum(w.to(tl.float32), 1)[:, None]


@triton.jit
def _qjl_split_kernel(Q, W, PROJ, IDX, SIN, NIN, SOUT, NOUT, VQ, VS, VM, RK, RV, OP, LSE,
                      NQ, NG, R, tiles_per, n_splits, c_in, c_out, qk_log2, srk_b, srk_h, srk_t, srv_b, srv_h, srv_t,
                      HKV: tl.constexpr, GROUP: tl.constexpr, M: tl.constexpr, D: tl.constexpr, MB: tl.constexpr,
                      MO: tl.constexpr, O: tl.constexpr, OPAD: tl.constexpr, CH: tl.constexpr, BLOCK: tl.constexpr,
                      VBITS: tl.constexpr, HAS_OUT: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    bh, s = tl.program_id(0), tl.program_id(1)
    b, h = bh // HKV, bh % HKV
    rq, d = tl.arange(0, M), tl.arange(0, D)
    qm = rq < GROUP
    qrow = bh * GROUP + rq  # q [B, Hq, D]: this KV head's query heads
    q = tl.load(Q + qrow[:, None] * D + d[None, :], mask=qm[:, None], other=0.0)  # fp32
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    NB: tl.constexpr = MB // 8
    NBO: tl.constexpr = MO // 8
    WV: tl.constexpr = D * VBITS // 32
    E: tl.constexpr = 32 // VBITS
    DG: tl.constexpr = D // 32
    if s < n_splits - 1:  # quantized tokens, tiles [t0, t1)
        t0 = s * tiles_per
        t1 = tl.minimum(t0 + tiles_per, tl.cdiv(NQ, BLOCK))
        o = tl.arange(0, OPAD)
        om = o < O
        for t in range(t0, t1):
            rows = t * BLOCK + tl.arange(0, BLOCK)
            ok = rows < NQ
            tok = bh.to(tl.int64) * NQ + rows
            d_in = tl.zeros([M, BLOCK], tl.float32)
            d_out = tl.zeros([M, BLOCK], tl.float32)
            if HAS_OUT:  # this group's outlier channels and the query at them
                idx = tl.load(IDX + (bh * NG + t) * O + o, mask=om, other=0).to(tl.int32)
                q_o = tl.load(Q + qrow[:, None] * D + idx[None, :], mask=qm[:, None] & om[None, :], other=0.0)
            for c in tl.static_range(MB // CH):
                cols = c * CH + tl.arange(0, CH)
                w = tl.load(W + qrow[:, None] * MB + cols[None, :], mask=qm[:, None], other=0.0)  # q S, this chunk
                if HAS_OUT:
                    s_o = tl.load(PROJ + idx[:, None] * MB + cols[None, :], mask=om[:, None], other=0.0)
                    qs_o = tl.dot(q_o, s_o, input_precision=PRECISION)  # [M, CH]: q_o S
                    w = w - qs_o
                    if c * CH < MO:  # S' is the first MO columns of S
                        d_out += _sign_dot(qs_o.to(tl.float16), SOUT, tok, ok, c * CH, NBO, CH, BLOCK)
                d_in += _sign_dot(w.to(tl.float16), SIN, tok, ok, c * CH, NB, CH, BLOCK)
            n_in = tl.load(NIN + tok, mask=ok, other=0.0).to(tl.float32)
            est = d_in * (c_in * n_in)[None, :]
            if HAS_OUT:
                n_out = tl.load(NOUT + tok, mask=ok, other=0.0).to(tl.float32)
                est += d_out * (c_out * n_out)[None, :]
            sc = tl.where(ok[None, :], est * qk_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            # values: channel w * E + e is bits [e * VBITS, ...) of word w; (scale, min) per 32 channels
            words = tl.load(VQ + tok[:, None] * WV + tl.arange(0, WV)[None, :], mask=ok[:, None], other=0)
            codes = (words[:, :, None] >> (tl.arange(0, E) * VBITS)[None, None, :]) & ((1 << VBITS) - 1)
            codes = tl.reshape(codes, (BLOCK, DG, 32)).to(tl.float32)
            goffs = tok[:, None] * DG + tl.arange(0, DG)[None, :]
            sv = tl.load(VS + goffs, mask=ok[:, None], other=0.0).to(tl.float32)
            mv = tl.load(VM + goffs, mask=ok[:, None], other=0.0).to(tl.float32)
            val = tl.reshape(codes * sv[:, :, None] + mv[:, :, None], (BLOCK, D))
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), val.to(tl.float16))
            m_i = m_new
    else:  # the full-precision buffer, exactly
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
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(OP + row[:, None] * D + d[None, :], out, mask=qm[:, None])
    tl.store(LSE + row, lse, mask=qm)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def qjl_attention(q1: torch.Tensor, proj: torch.Tensor, keys, signs, norms, vq, vs, vm, nq: int, value_bits: int,
                  rk: torch.Tensor, rv: torch.Tensor, group: int) -> torch.Tensor:
    """One query per head, q1 [B, Hq, D], over nq quantized tokens (keys an OutlierKeys, or signs [B, Hkv, nq, m / 8]
    and norms [B, Hkv, nq] without outliers; values vq int32 [B, Hkv, nq, W], vs, vm fp16 [B, Hkv, nq, D / 32]) and
    the buffer rk, rv [B, Hkv, R, D] -> [B, Hq, 1, D] in rk's dtype."""
    B, Hq, D = q1.shape
    H, m = vq.shape[1], proj.shape[1]
    R = rk.shape[2]
    has_out = keys is not None
    if has_out:
        idx, signs, norms, out_signs, out_norms = keys.idx, keys.signs, keys.norms, keys.out_signs, keys.out_norms
        NG, O, mo = idx.shape[2], idx.shape[3], out_signs.shape[3] * 8
        block = group
    else:
        idx, out_signs, out_norms, NG, O, mo = signs, signs, norms, 1, 1, m
        block = 64
    ch = min(CHUNK, m, mo)
    qf = q1.float().contiguous()
    w = (qf @ proj).contiguous()  # [B, Hq, m]: the sketched queries
    parts = [t[:, :, :nq].contiguous() if t.shape[2] != nq else t.contiguous()
             for t in (signs, norms, out_signs, out_norms, vq, vs, vm)]
    if rk.stride(3) != 1 or rv.stride(3) != 1:
        rk, rv = rk.contiguous(), rv.contiguous()
    tiles = -(-nq // block)
    want = max(1, -(-WAVES * _sm_count(q1.device) // (B * H)))
    sq = max(1, min(want, tiles))
    per = max(1, -(-tiles // sq))
    sq = max(1, -(-tiles // per))
    splits = sq + 1  # the last: the buffer
    op = torch.empty(B * Hq * splits, D, dtype=torch.float32, device=q1.device)
    lse = torch.empty(B * Hq * splits, dtype=torch.float32, device=q1.device)
    out = torch.empty(B, Hq, 1, D, dtype=rk.dtype, device=q1.device)
    c = math.sqrt(math.pi / 2)
    exact = rk.dtype == torch.float32 or interpreting()
    s_in, n_in, s_out, n_out, vq, vs, vm = parts
    _qjl_split_kernel[(B * H, splits)](
        qf, w, proj.float().contiguous(), idx.contiguous(), s_in, n_in, s_out, n_out, vq, vs, vm, rk, rv, op, lse,
        nq, NG, R, per, splits, c / m, c / mo, D**-0.5 * math.log2(math.e),
        rk.stride(0), rk.stride(1), rk.stride(2), rv.stride(0), rv.stride(1), rv.stride(2),
        HKV=H, GROUP=Hq // H, M=max(16, triton.next_power_of_2(Hq // H)), D=D, MB=m, MO=mo, O=O,
        OPAD=max(16, triton.next_power_of_2(O)), CH=ch, BLOCK=block, VBITS=value_bits, HAS_OUT=has_out, BLOCK_R=32,
        PRECISION="ieee" if exact else "tf32", num_warps=NUM_WARPS, num_stages=2)
    _combine_kernel[(B * Hq,)](op, lse, out, splits, out.stride(0), out.stride(1), HQ=Hq, D=D,
                               P=triton.next_power_of_2(splits), CH=16, num_warps=4)
    return out
