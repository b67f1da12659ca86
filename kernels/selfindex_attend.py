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
import os

import torch
import triton
import triton.language as tl

from kvbench.kernels.kivi import _codes, _sm_count
from kvbench.kernels.split_kv import store_partial

BLOCK_N = 64  # tokens per tile
ATTEND_COUNTER = 7  # the workspace counter per (b, h) that counts finished parts (csrc/selfindex.h: 0-5 are select's)
MIN_SPLIT = 64  # selected tokens per program at least: fewer programs than that are not worth their partials
PROGRAMS_PER_SM = 16  # the selection is cut into about this many programs per SM: short ones hide gather latency
MAX_PARTS = 64  # but into no more parts per (b, h) than this: the last program merges them one block of 32 at a time
NUM_WARPS, NUM_STAGES = 4, 2
# Which kernel runs 2+1 attention: "cuda" (default: csrc/selfindex.cu's attend_kernel, 2-bit rows staged through
# shared memory by cp.async and dequantized straight into mma.sync fragments, 56 instructions a token in its loop
# against the Triton kernel's 102 by the SASS of both for sm_90), "triton" (this file's kernel, the earlier path; the
# CPU interpreter's and the 16+1 setting's) or "triton-ptx" (this kernel with the unpacking in inline PTX, 1416
# instructions a 64-token tile against 1641; opt-in: its GPU parity test has not run yet). The CUDA kernel passed its
# GPU parity test (tests/test_selfindex_kernels.py: test_attend_paths_match_reference, 7 shapes x bf16/fp16, both the
# cp.async and the register variants) on an H200, and took 41.3 us against Triton's 56.2 at 32K x 8, 10% (sweep of
# benchmarks/selfindex_dev.py, CUDA_PROGRAMS_PER_SM 3 the best of 2-16); its source also passes the reference on the
# CPU (tests/test_selfindex_emulated.py). This environment variable picks one for a run, the module attributes below
# for a process (benchmarks/selfindex_dev.py --sweep).
ATTEND_PATHS = ("triton", "cuda", "triton-ptx")
_PATH = os.environ.get("KVBENCH_SELFINDEX_ATTEND", "cuda")
if _PATH not in ATTEND_PATHS:
    raise ValueError(f"KVBENCH_SELFINDEX_ATTEND={_PATH!r}: one of {ATTEND_PATHS}")
USE_CUDA = _PATH == "cuda"  # 2+1 storage takes the CUDA kernel where cuda_path() allows
CUDA_PROGRAMS_PER_SM = 3  # its blocks per SM over the selection (3 are resident at a time: 168 registers a thread)
CUDA_MAX_PARTS, CUDA_MAX_GROUP = 128, 8  # csrc/selfindex.h: kAttMaxParts, kAttMaxGroup
CUDA_ASYNC = True  # rows staged through shared memory by cp.async, 2 tiles a warp in flight (else registers)
# 2-bit rows unpacked by inline PTX, two channels per 32-bit register (rotate, mask, OR into fp16 1024 + code, one
# packed subtract and FMA, the sign bit XOR-ed in). The interpreter cannot run PTX: it takes the plain Triton path.
FAST_DEQUANT = _PATH == "triton-ptx"


@triton.jit
def _dequant(words, sz, D: tl.constexpr, BITS: tl.constexpr, SPREAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """2-bit rows [BLOCK_N, D*BITS/32] words and their (scale, zero) pairs sz [BLOCK_N, 2 * D/32] fp16 ->
    zero + scale * code, fp16 [BLOCK_N, D]."""
    NG: tl.constexpr = D // 32
    codes = tl.reshape(_codes(words, BITS, SPREAD, D, tl.float16), (BLOCK_N, NG, 32))
    scale, zero = tl.split(tl.reshape(sz, (BLOCK_N, NG, 2)))
    return tl.reshape(codes * scale[:, :, None] + zero[:, :, None], (BLOCK_N, D))


# Inline PTX over pairs of channels (pack=2: element 0 of a pair is the low half of each 32-bit fp16-pair register;
# which elements pair up is Triton's layout's business, so every input is per element and nothing assumes that a
# pair is two neighbouring channels). Per element: w the 32-bit word holding its 2-bit code, ra / rb rotations that
# bring element 0's code to bit 0 and element 1's to bit 16 (shf.wrap rotates by the amount mod 32), s / z its fp16
# (scale, zero); keys also: sw the word holding its sign bit, r15 / r31 rotations bringing element 0's sign bit to
# bit 15 and element 1's to bit 31. 1024 + code is an fp16 by OR-ing the code into 0x6400's mantissa.
# Operands: $0 out; $1 $2 w; $3 $4 ra; $5 $6 rb; $7 s; $8 z; $9 $10 sw; $11 $12 r15; $13 $14 r31.
_MAG_PTX = """
    shf.r.wrap.b32 a, $1, $1, $3;
    shf.r.wrap.b32 b, $2, $2, $6;
    lop3.b32 a, a, 3, 0x64006400, 0xEA;
    lop3.b32 a, b, 0x30000, a, 0xEA;
    mov.b32 b, 0x64006400;
    sub.rn.f16x2 a, a, b;
    fma.rn.f16x2 a, a, $7, $8;
"""
_V_PTX = tl.constexpr("{ .reg .b32 a, b;" + _MAG_PTX + "    mov.b32 $0, a;\n}")
# lop3 0xEA: (a & b) | c; 0xE4: (a & c) | (b & ~c), the two sign bits into bits 15 and 31 of one word; 0xD2:
# a ^ (~b & c), the fp16 sign flipped where the key's sign bit is 0 (the magnitude is never negative)
_K_PTX = tl.constexpr("{ .reg .b32 a, b, m, n;" + _MAG_PTX + """    shf.r.wrap.b32 m, $9, $9, $11;
    shf.r.wrap.b32 n, $10, $10, $14;
    lop3.b32 m, m, n, 0x8000, 0xE4;
    lop3.b32 $0, a, m, 0x80008000, 0xD2;
}""")


@triton.jit
def _per_word(x, BLOCK_N: tl.constexpr, W: tl.constexpr):
    """[BLOCK_N, W/2] per 32-channel group -> [BLOCK_N, W, 1] per 16-channel word (group g = word // 2)."""
    return tl.reshape(tl.join(x, x), (BLOCK_N, W))[:, :, None]


@triton.jit
def _rows_fast(kw, sw, ks, vw, vs, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The fast path's keys and values of a tile: kw, vw [BLOCK_N, D/16] words of 2-bit codes, sw [BLOCK_N, D/32]
    sign words, ks, vs [BLOCK_N, D/16] fp16 (scale, zero) pairs -> k, v fp16 [BLOCK_N, D] (k = +-(zero + scale *
    code), v = zero + scale * code), as words x 16 channels, channel c = 16 * word + j."""
    W: tl.constexpr = D // 16
    NG: tl.constexpr = D // 32
    c = (16 * tl.arange(0, W)[:, None] + tl.arange(0, 16)[None, :])[None, :, :]  # [1, W, 16]
    ra = 2 * c
    rb = ra + 16
    ks_s, ks_z = tl.split(tl.reshape(ks, (BLOCK_N, NG, 2)))
    vs_s, vs_z = tl.split(tl.reshape(vs, (BLOCK_N, NG, 2)))
    k = tl.inline_asm_elementwise(
        _K_PTX, "=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
        [kw[:, :, None], ra, rb, _per_word(ks_s, BLOCK_N, W), _per_word(ks_z, BLOCK_N, W),
         _per_word(sw, BLOCK_N, W), c + 17, c + 1], dtype=tl.float16, is_pure=True, pack=2)
    v = tl.inline_asm_elementwise(
        _V_PTX, "=r,r,r,r,r,r,r,r,r",
        [vw[:, :, None], ra, rb, _per_word(vs_s, BLOCK_N, W), _per_word(vs_z, BLOCK_N, W)],
        dtype=tl.float16, is_pure=True, pack=2)
    return tl.reshape(k, (BLOCK_N, D)), tl.reshape(v, (BLOCK_N, D))


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
    FAST: tl.constexpr, Q2W: tl.constexpr, Q2H: tl.constexpr,
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
                W: tl.constexpr = D // 16
                # one interleaved row per token (selfindex.q2_buffers): Q2W 32-bit words, Q2H fp16 values a row
                sz_offs = tok[:, None] * Q2H + tl.arange(0, D // 16)[None, :]
                kw = tl.load(KM + tok[:, None] * Q2W + tl.arange(0, W)[None, :], mask=ok[:, None], other=0)
                ks = tl.load(KS + sz_offs, mask=ok[:, None], other=0.0)
                vw = tl.load(VQ + tok[:, None] * Q2W + tl.arange(0, W)[None, :], mask=ok[:, None], other=0)
                vs = tl.load(VS + sz_offs, mask=ok[:, None], other=0.0)
                if FAST:
                    k, v = _rows_fast(kw, signs, ks, vw, vs, D, BLOCK_N)
                else:
                    neg = _codes(signs, 1, 5, D, tl.int32) == 0
                    mag = _dequant(kw, ks, D, 2, 4, BLOCK_N)
                    k = tl.where(neg, -mag, mag)
                    v = _dequant(vw, vs, D, 2, 4, BLOCK_N)
            else:
                rows = tok[:, None] * D + offs_d[None, :]
                k = tl.load(KF + rows, mask=ok[:, None], other=0.0).to(tl.float16)
                v = tl.load(VF + rows, mask=ok[:, None], other=0.0).to(tl.float16)
            m_i, l_i, acc = _tile_softmax(qq, k, v, bias, ok, m_i, l_i, acc)

    # this part's normalized output and log2-sum-exp2; a part without tokens has lse -inf and weighs nothing
    rows_out = (b * H * GROUP + heads).to(tl.int64) * n_parts + part
    store_partial(OP, LSE, rows_out, acc, l_i, m_i, offs_d, D, head_ok)
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


def cuda_path(quantized: bool, group: int, D: int, device: torch.device) -> bool:
    """Whether attend() runs the CUDA kernel (csrc/selfindex.cu: attend_kernel): 2+1 storage, up to 8 query heads
    per KV head, head_dim 64 or 128, on a GPU. Elsewhere (16+1, wider groups, the interpreter) the Triton kernel."""
    return (USE_CUDA and quantized and group <= CUDA_MAX_GROUP and D in (64, 128) and device.type == "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1")


def plan(n_sel: int, bh: int, device: torch.device, split: int | None = None, cuda: bool = False) -> tuple[int, int]:
    """(split, n_parts): selected tokens per program, a multiple of BLOCK_N, and parts per (b, h) including the
    full-precision one. About PROGRAMS_PER_SM programs per SM over the selection (CUDA_PROGRAMS_PER_SM for the CUDA
    kernel), at least MIN_SPLIT tokens each, at most MAX_PARTS parts (CUDA_MAX_PARTS - 1 selected ones)."""
    if n_sel == 0:
        return BLOCK_N, 1
    per_sm, max_parts = (CUDA_PROGRAMS_PER_SM, CUDA_MAX_PARTS - 1) if cuda else (PROGRAMS_PER_SM, MAX_PARTS)
    if split is None:
        split = max(MIN_SPLIT, triton.cdiv(n_sel * bh, per_sm * _sm_count(device)), triton.cdiv(n_sel, max_parts))
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


def scratch(B: int, Hq: int, H: int, D: int, n_sel: int, cap: int, device: torch.device, split: int | None = None,
            cuda: bool = False):
    """(split, n_parts, partial outputs, lse, counters) for a call over n_sel selected tokens: the workspace's
    buffers, grown here when too small (so a planned step calls it once at reserve(), and never allocates after).
    `cuda`: the CUDA kernel's plan (cuda_path())."""
    from kvbench.kernels.selfindex import Workspace

    split, n_parts = plan(n_sel, B * H, device, split, cuda)
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
    from kvbench.kernels.selfindex import N_COUNTERS, cuda_ops

    B, Hq, D = q.shape
    H, F = kv.fk.shape[1], kv.fk.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    n_sel = idx.shape[2]
    group = Hq // H
    cuda = cuda_path(kv.quantized, group, D, q.device)
    split, n_parts, op, lse, ctr = scratch(B, Hq, H, D, n_sel, kv.cap, q.device, split, cuda)
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    if cuda and n_parts <= CUDA_MAX_PARTS:
        if idx.dtype != torch.int32 or not idx.is_contiguous():  # an eager caller's selection; planned ones are both
            idx = idx.to(torch.int32).contiguous()
        cuda_ops().attend(q, kv.fk, kv.fv, kv.fpos, idx if n_sel else idx.new_zeros(B, H, 1), kv.signs, kv.kmag,
                          kv.kscale, kv.vq, kv.vscale, kv.chmax, kv.mu, op, lse, out, ctr, nsel, n_sel, split, n_parts,
                          int(CUDA_ASYNC))
        return out
    rows = _rows(kv)
    # with nothing selected IDX still needs a valid pointer of idx's integer type: Triton types `tok` from it
    _selfindex_attend_kernel[(B * H, n_parts)](
        q, kv.fk, kv.fv, kv.fpos, idx if n_sel else idx.new_zeros(1), *rows, op, lse, out, ctr,
        nsel if nsel is not None else ctr,
        q.stride(0), q.stride(1), n_sel, max(1, n_sel), kv.cap, split, n_parts, D**-0.5 * math.log2(math.e),
        H=H, GROUP=group, M=max(16, triton.next_power_of_2(group)), D=D, F=F,
        BLOCK_F=max(16, triton.next_power_of_2(F)), BLOCK_N=BLOCK_N, QUANT=kv.quantized, NC=N_COUNTERS,
        DYN=nsel is not None, FAST=FAST_DEQUANT and q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1",
        Q2W=kv.kmag.stride(2) // 4 if kv.quantized else 1, Q2H=kv.kmag.stride(2) // 2 if kv.quantized else 1,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
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
