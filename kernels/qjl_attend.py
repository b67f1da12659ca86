"""qjl's decode step on the GPU: the estimator's scores from the sign bits (`qjl_scores`), and the whole attention in
one split-KV kernel (`qjl_attention`): scores, online softmax and P.V over the 2/4-bit values dequantized in
registers, the full-precision buffer as one more split, merged by log-sum-exp (dense_decode's combine kernel).

History. A step first ran a score kernel, a PyTorch softmax and P.V over values dequantized to fp32 in memory: 6.4 ms
at 32K x 8 on an H200, where the bytes read take 58 us. The first fused kernel (dc298f8) took 6.2 ms (dense: 0.25 ms);
ncu (benchmarks/records/qjl-ncu-h200-dc298f8.txt): L1/TEX 82% busy, DRAM 0.65%, 179 registers at 8 warps, so one
program an SM. It was bound by L1 / shared-memory traffic from replicated loads: each sign byte loaded once per bit
(8,192 one-byte loads per 32-token tile, inlier and outlier signs both), the [BLOCK, M] fp16 +1 / -1 tiles taken
through shared memory to the tensor-core layout, and each value word, scale and minimum loaded once per channel.

Now every tile loads its data once, in contiguous rows, and expands it in registers:
- sign dots by bit planes. A token's sign bit 8 c + j is bit j of byte c; plane j is the [BLOCK, M / 8] matrix of
  those bits as +1 / -1 fp16 (shift, mask, XOR into 1.0's bit pattern), and w s^T = sum_j w_j S_j^T with w_j =
  w[:, j::8], loaded once per program. The planes are elementwise in the bytes, so Triton moves the bytes (int8, 1 KB
  a tile, by cp.async) to the tensor-core operand layout and extracts the bits there: no [BLOCK, M] tile goes
  through shared memory. M / 8 < 16 (64-bit sketches, few outlier bits) is zero-padded to tl.dot's K >= 16;
- outliers. q_o S is no longer formed per tile. The group's O rows of S (a plane-major fp16 copy [D, 8, M / 8] made
  per call) meet the same sign planes, C = S_idx s^T [OPAD, BLOCK], and one small dot gives both corrections:
  est = c_in n_in (w s_in^T - q_o C_in) + c_out n_out q_o C_out. The inlier term is now a difference of two fp16-input
  dots rather than one dot of the fp32 difference w - q_o S. Its rounding error grows with the query's weight on the
  group's outlier channels, and it stays orders of magnitude below the estimator's own noise (~1 / sqrt(m));
- values by kivi's `_packed_values`: the words, scales and minima of a token are loaded once ([BLOCK, D / E] and
  [BLOCK, D / 32]), the codes are spread by tl.interleave in registers and dequantized in fp16 (one HFMA2 per pair on
  sm_90, so still one rounding; the interpreter rounds the product and the sum apart, hence its larger error);
- 4 warps. A tile's [16, BLOCK] scores are 4 m16n8 slices; with 8 warps each slice, and its bit expansion, was
  computed twice.

What is measured (Triton 3.6, compiled for sm_90 on the CPU with the JIT's alignment specialization; Llama-3.1-8B
shape, GQA 4, 32-token groups, 8 outliers, 2-bit values): the main loop per 32-token tile, over all warps, fell from
13,008 to 4,120 warp instructions (M = 256 bits, MO = 256), and from 19,792 to 5,344 in the first layers (512 / 128).
Global loads fell from 976 to 76 instructions (1,176 to 112 at 512 / 128). Shared-memory traffic fell from ~427 to
~104 KiB (~647 to ~185). Registers went from 179 at 8 warps (255 with a spill at 512 bits) to 166 at 4 warps (138),
and shared memory from 57 to 29 KiB (105 to 50 KiB). No GPU timing yet: run `python benchmarks/qjl_profile.py --context
32768 --batch 8`. What is left in the loop: the w and S-row planes are re-read from shared memory each tile (A
operands, 16 rows for 4 or 8 useful), and the bit expansion costs ~5 instructions per fp16 pair plus register moves
for the kWidth = 4 operand layout the int8 path imposes. Packing pairs (inline PTX) would cut that, but the
interpreter could not check it.

Grid (B * Hkv, splits): a program takes a range of tiles of BLOCK tokens for all query heads of its GQA group (padded
to 16 rows for the tensor-core dots); with outliers a tile is one group of `group` tokens, so it has one set of
outlier channels. The references are QJLLayer.estimate and QJLLayer.attention's PyTorch path (methods/qjl.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvbench.kernels.dense_decode import _combine_kernel
from kvbench.kernels.kivi import _packed_values
from kvbench.kernels.score_triton import interpreting
from kvbench.kernels.select_attend import _sm_count
from kvbench.kernels.split_kv import store_partial

WAVES = 8  # programs per SM to aim for (attention)
BLOCK_PLAIN = 64  # tokens a tile without outliers (with them: one group)
NUM_WARPS = 4  # a tile is [16, BLOCK] scores: 4 warps cover it; 8 would duplicate its bit expansion
BLOCK_R = 32  # buffer tokens a tile


def supported(D: int, m: int, mo: int, outliers: int, group: int, value_bits: int) -> bool:
    """Shapes the kernels take (else the PyTorch path runs): powers of two >= 16 for the tl.dot tiles."""
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0  # noqa: E731
    ok = pow2(D) and pow2(m) and value_bits in (2, 4)
    return ok and (not outliers or (pow2(mo) and mo <= m and pow2(group) and outliers <= 16))


@triton.jit
def _bits(byte, j: tl.constexpr):
    """+1 / -1 fp16 from bit j of each byte (int32): the bit is moved to the fp16 sign bit and XOR-ed into -1.0's
    pattern 0xBC00, so 1 -> 0x3C00 (+1.0) and 0 -> -1.0, with no int -> float conversion instruction."""
    return (((byte << (15 - j)) & 0x8000) ^ 0xBC00).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _sign_planes(SIGNS, tok, ok, NB: tl.constexpr, KB: tl.constexpr):
    """The tokens' sign bits as 8 planes: a tuple of +1 / -1 fp16 [KB, BLOCK], plane j's row c = bit j of byte c
    (sign bit 8 c + j). The bytes are one contiguous [BLOCK, NB] load (rows past NB, up to tl.dot's K >= 16, are
    padding that meets zero plane columns); Triton moves them to the tensor-core operand layout once, as int8, and
    takes the bits there."""
    c = tl.arange(0, KB)
    mask = ok[:, None] & (c < NB)[None, :] if NB < KB else ok[:, None]  # no column mask where none is needed,
    byte = tl.load(SIGNS + tok[:, None] * NB + c[None, :], mask=mask, other=0).to(tl.int32)  # so the load vectorizes
    planes = ()
    for j in tl.static_range(8):
        planes = planes + (tl.trans(_bits(byte, j)),)
    return planes


@triton.jit
def _plane_rows(A, rows, rm, stride, NB: tl.constexpr, KB: tl.constexpr, STEP: tl.constexpr, PLANE: tl.constexpr):
    """Rows `rows` (where rm) of a row-major fp32 / fp16 matrix whose columns pair with sign bits, as 8 planes to match
    _sign_planes: a tuple of fp16 [R, KB], plane j's column c (< NB, else 0) = matrix column c * STEP + j * PLANE."""
    c = tl.arange(0, KB)
    mask = rm[:, None] & (c < NB)[None, :] if NB < KB else rm[:, None]
    planes = ()
    for j in tl.static_range(8):
        ptr = A + rows[:, None] * stride + (c * STEP + j * PLANE)[None, :]
        planes = planes + (tl.load(ptr, mask=mask, other=0.0).to(tl.float16),)
    return planes


@triton.jit
def _dot_planes(a, s, acc):
    """acc + sum over the 8 planes of a[j] . s[j] (fp16 in, fp32 sums): a row block times the sign matrix."""
    for j in tl.static_range(8):
        acc = tl.dot(a[j], s[j], acc)
    return acc


@triton.jit
def _estimate(Q, w, PROJ, IDX, SIN, NIN, SOUT, NOUT, bh, t, NQ, NG, qrow, qm, c_in, c_out, GP: tl.constexpr,
              D: tl.constexpr, M: tl.constexpr, MO: tl.constexpr, O: tl.constexpr, OPAD: tl.constexpr,
              BLOCK: tl.constexpr, HAS_OUT: tl.constexpr, KB: tl.constexpr, KBO: tl.constexpr):
    """Tile t's estimated q.k [GP, BLOCK] fp32 for the query rows qrow (w: their q S as _plane_rows planes), with its
    tokens' flat offsets and validity. With outliers, q_o S is not formed: the group's rows of S (PROJ, plane-major
    fp16 [D, 8, M / 8]) meet the sign bits, C = S_idx s^T [OPAD, BLOCK], and q_o C corrects the inlier term and is the
    outlier term: est = c_in n_in (w s_in^T - q_o C_in) + c_out n_out q_o C_out."""
    rows = t * BLOCK + tl.arange(0, BLOCK)
    ok = rows < NQ
    tok = bh.to(tl.int64) * NQ + rows
    s_in = _sign_planes(SIN, tok, ok, M // 8, KB)
    scale_in = c_in * tl.load(NIN + tok, mask=ok, other=0.0).to(tl.float32)
    est = _dot_planes(w, s_in, tl.zeros([GP, BLOCK], tl.float32)) * scale_in[None, :]
    if HAS_OUT:  # this group's outlier channels, the query there, and their rows of S
        o = tl.arange(0, OPAD)
        om = o < O
        idx = tl.load(IDX + (bh * NG + t) * O + o, mask=om, other=0).to(tl.int32)
        q_o = tl.load(Q + qrow[:, None] * D + idx[None, :], mask=qm[:, None] & om[None, :], other=0.0)
        p_in = _plane_rows(PROJ, idx, om, M, M // 8, KB, 1, M // 8)
        c_i = _dot_planes(p_in, s_in, tl.zeros([OPAD, BLOCK], tl.float32))
        if MO == M:
            p_out = p_in
        else:  # S' is the first MO columns of S: the first MO / 8 of each plane
            p_out = _plane_rows(PROJ, idx, om, M, MO // 8, KBO, 1, M // 8)
        c_o = _dot_planes(p_out, _sign_planes(SOUT, tok, ok, MO // 8, KBO), tl.zeros([OPAD, BLOCK], tl.float32))
        scale_out = c_out * tl.load(NOUT + tok, mask=ok, other=0.0).to(tl.float32)
        mix = c_o * scale_out[None, :] - c_i * scale_in[None, :]
        est += tl.dot(q_o, mix, input_precision="tf32")
    return est, tok, ok


@triton.jit
def _scores_kernel(Q, W, PROJ, IDX, SIN, NIN, SOUT, NOUT, OUT, NQ, NG, c_in, c_out, HKV: tl.constexpr,
                   GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, M: tl.constexpr, MO: tl.constexpr,
                   O: tl.constexpr, OPAD: tl.constexpr, BLOCK: tl.constexpr, HAS_OUT: tl.constexpr,
                   KB: tl.constexpr, KBO: tl.constexpr):
    bh, t = tl.program_id(0), tl.program_id(1)
    rq = tl.arange(0, GP)
    qm = rq < GROUP
    qrow = bh * GROUP + rq
    w = _plane_rows(W, qrow, qm, M, M // 8, KB, 8, 1)
    est, tok, ok = _estimate(Q, w, PROJ, IDX, SIN, NIN, SOUT, NOUT, bh, t, NQ, NG, qrow, qm, c_in, c_out, GP, D, M,
                             MO, O, OPAD, BLOCK, HAS_OUT, KB, KBO)
    rows = t * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + qrow[:, None].to(tl.int64) * NQ + rows[None, :], est, mask=qm[:, None] & ok[None, :])


@triton.jit
def _attend_kernel(Q, W, PROJ, IDX, SIN, NIN, SOUT, NOUT, VQ, VS, VM, RK, RV, OP, LSE, NQ, NG, R, tiles_per,
                   n_splits, c_in, c_out, qk_log2, srk_b, srk_h, srk_t, srv_b, srv_h, srv_t, HKV: tl.constexpr,
                   GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, M: tl.constexpr, MO: tl.constexpr,
                   O: tl.constexpr, OPAD: tl.constexpr, BLOCK: tl.constexpr, VBITS: tl.constexpr,
                   HAS_OUT: tl.constexpr, KB: tl.constexpr, KBO: tl.constexpr, BLOCK_R: tl.constexpr,
                   PRECISION: tl.constexpr):
    bh, s = tl.program_id(0), tl.program_id(1)
    b, h = bh // HKV, bh % HKV
    rq, d = tl.arange(0, GP), tl.arange(0, D)
    qm = rq < GROUP
    qrow = bh * GROUP + rq  # q [B, Hq, D]: this KV head's query heads
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    SPREAD: tl.constexpr = 5 - VBITS // 2  # log2(codes a word): 4 at 2 bits, 3 at 4 bits
    if s < n_splits - 1:  # quantized tokens, tiles [t0, t1)
        w = _plane_rows(W, qrow, qm, M, M // 8, KB, 8, 1)  # the sketched queries, once
        t0 = s * tiles_per
        t1 = tl.minimum(t0 + tiles_per, tl.cdiv(NQ, BLOCK))
        for t in range(t0, t1):
            est, tok, ok = _estimate(Q, w, PROJ, IDX, SIN, NIN, SOUT, NOUT, bh, t, NQ, NG, qrow, qm, c_in, c_out, GP,
                                     D, M, MO, O, OPAD, BLOCK, HAS_OUT, KB, KBO)
            sc = tl.where(ok[None, :], est * qk_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            # words, scales and minima (per 32 channels) loaded once a token, codes spread in registers
            val = _packed_values(VQ, VS, VM, tok, ok, VBITS, SPREAD, D, 32, BLOCK, tl.float16)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), val)
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
    # S plane-major in fp16 for the outlier rows' sign dots: [D, 8, m / 8], plane j holding columns 8 c + j
    s_planes = proj.float().view(D, m // 8, 8).transpose(1, 2).contiguous().half() if keys is not None else proj
    tensors = [qf, w.contiguous(), s_planes] + [t.contiguous() for t in (idx, signs, norms, out_signs, out_norms)]
    group = Hq // signs.shape[1]
    meta = dict(HKV=signs.shape[1], GROUP=group, GP=max(16, triton.next_power_of_2(group)), D=D, M=m, MO=mo, O=O,
                OPAD=max(16, triton.next_power_of_2(O)), BLOCK=max(16, block), HAS_OUT=keys is not None,
                KB=max(16, m // 8), KBO=max(16, mo // 8))  # sign bytes a token, padded to tl.dot's K >= 16
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
