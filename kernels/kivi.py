"""KIVI decode attention on the packed cache: a Triton split-KV (flash-decoding) kernel and its combine, and for large
steps the CUDA kernel of csrc/kivi_attend.cu over the packed tokens, in front of the same ring part and combine.

Why Triton and not CUDA C++ here: Triton's interpreter (TRITON_INTERPRET=1) runs this very kernel on the CPU, so the
CPU-only CI checks it against the PyTorch reference (kivi_ref.attention_ref) on every commit, not just that it
compiles; the GPU tests then check the same code at real shapes. The kernel needs nothing Triton cannot express: 16-byte
loads of packed words, shifts and masks in registers, tensor-core dots and an online softmax.

One decode step reads about 96 bytes per token per KV head at 2 bits and head dim 128 (32 B key codes, 16 B of key
scale/min amortized over 32 tokens, 32 B value codes, 16 B value scale/min) against 512 B for bf16 K+V, so the kernel
is built to stay at the memory floor:
- grid (B * H, splits + 1): the packed tokens [0, Nv) are cut into `splits` ranges so that even batch 1 puts a few
  programs on every SM; the last program of each head attends the full-precision ring (and the new token, if any);
- each program handles all query heads of one KV head (the GQA group, padded to 16 rows for the tensor-core dot), so
  packed keys and values are read once per KV head;
- codes are unpacked in registers: words are loaded as whole rows (16-byte vectors, pipelined with cp.async), spread
  with tl.interleave, shifted and masked; int -> float goes through the exponent bits (OR into 1024.0, subtract)
  since I2F is a slow instruction, as Marlin's dequantization does (github.com/IST-DASLab/marlin);
- dequantization and the tensor-core dots run in fp16 for bf16 and fp16 models alike: the scales are fp16 (KIVI's
  choice), so no per-element bf16 conversion is needed, two elements go through each HFMA2, and fp16 has more mantissa
  than bf16 (anything outside fp16's range would not fit KIVI's fp16 scales either); fp32 models stay in fp32;
- scores and P.V accumulate in fp32 with the softmax in base 2; each split writes (o, lse) and a second small kernel
  combines them with a log-sum-exp, as in flash-decoding (https://crfm.stanford.edu/2023/10/12/flashdecoding.html).

Where it stands: compiled for sm_90 (Triton 3.6, 4 warps, 64-token tiles) the main loop issues ~7 instructions per
unpacked element (per warp and 64-token tile: 889 instructions for 4096 elements, 160 of them register moves, 112
shifts, 136 LOP3, 64 PRMT, 64 HADD2 + 64 HFMA2, and the dequantized fp16 tiles go through shared memory, STS then
LDSM, to reach the tensor-core operand layout). On an H200 (2026-12-02, kernel suite, graph timing) it runs at ~0.7
TB/s: 32K x 8 285.6 us against dense 246.8 (floor 47.8), 128K x 8 1,056 against 981, 32K x 1 41.5 against 47.4,
8K x 1 15.9 against 22.7; a sweep of tiles (32-128), warps (2-8), stages (2-4), the register cap and range counts
found nothing below 283 us at 32K x 8. Triton variants tried offline (codes by broadcasting words over a third axis,
per-element word gathers, keys packed along tokens so the unpacking is elementwise up to the dot) compiled to more
shared-memory traffic, not less. Reaching the floor needs a kernel that dequantizes straight into the mma fragments
(Marlin's approach: the packed layout chosen so each thread's words hold the codes of its own fragment), i.e. CUDA.

The CUDA path (csrc/kivi_attend.cu, loaded by cuda_lib(); Decoder.packed() launches it over the parts [0, n - 1),
then tail() runs this file's split kernel over the ring part alone (part0), then the combine) does that with the
layout unchanged: transposed m16n8k16 dots (query heads as N), a LOP3 + HSUB2 per key pair with the key scales and
mins folded into the query, PRMT + LOP3 + HSUB2 + HFMA2 per value pair. On an H200 (2026-12-02, kernel suite, graph
timing, bf16, Llama-3.1-8B shape, commit 18e7e3a) at 2 bits: 32K x 8 143.5 us against dense 245.3 (1.71x; floor 48.1;
its stages: packed 132.1, tail 6.3, combine 2.8), 8K x 8 50.0 against 69.0, 32K x 1 34.4 against 47.0, 8K x 1 22.7
against 22.6 (where the Triton path had taken 15.9: hence CUDA_MIN_ROWS); 4 bits 149.2, 52.6, 35.8, 23.4. The packed
stage runs at 2.7x its bytes floor; a sweep of parts per head at 32K x 8 found the wave plan's 8 best (147 us; 4: 207,
16: 152). Its main loop is 568 SASS instructions per warp and 16-token tile as measured (528 since the group index
became a shift, not re-measured), about half the issue slots of 132 us at 4 blocks of 4 warps an SM; each warp holds
one tile of rows in flight, so memory latency takes the rest: deeper pipelining (cp.async stages, as
csrc/selfindex.cu's attend kernel has) and fewer LOP3 (130 a tile, about two per fp16 pair) are the next things to try.
Capture-safe decode (methods/kivi.py reserve()): the cache is pinned at its final size with the length in a device
counter (PackedKV.ndev); the split kernel reads it (DEVICE_LEN) over ranges planned for the reserved length, and
_kivi_append_pinned_kernel packs the value leaving the residual and, every R steps, the completed key block, with
the branches taken on the device, so a CUDA graph can replay a step.

`python benchmarks/kivi_dev.py` on a GPU runs a parity check and a timing of kivi against full.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os

import torch
import triton
import triton.language as tl

from kvbench.errors import KVBenchError
from kvbench.kernels.kivi_ref import PackedKV
from kvbench.kernels.split_kv import store_partial


def _fix_interpreter_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter calls int() on 1-element arrays, which numpy >= 2.4 refuses, so any loop with runtime
    bounds fails there (triton-lang/triton#9171, fixed upstream by #9172 after 3.6). Give its scalars an __index__
    that works with every numpy; only under TRITON_INTERPRET=1."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    import triton.runtime.interpreter as interp

    patch = getattr(interp, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "kvbench_fix", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.kvbench_fix = True
    interp._patch_lang_tensor = patched


_fix_interpreter_for_numpy_2_4()


@triton.jit
def _codes(words, BITS: tl.constexpr, SPREAD: tl.constexpr, D: tl.constexpr, OUT: tl.constexpr):
    """[N, W] int32 words -> [N, D] codes as OUT (int32, fp16 or fp32); channel c is bits [(c % E) * BITS, ...) of
    word c // E. Also used by selfindex_attend.py."""
    x = words
    for _ in tl.static_range(SPREAD):  # log2(E) times: every word repeated E times along the row
        x = tl.interleave(x, x)
    shift = (tl.arange(0, D) % (32 // BITS)) * BITS
    codes = (x >> shift[None, :]) & ((1 << BITS) - 1)
    # int -> float through the exponent bits, since I2F is a slow instruction: 0x6400 is 1024 as fp16 and
    # 0x4B000000 is 2^23 as fp32; OR-ing a code into the mantissa gives exactly 1024 + code (2^23 + code)
    if OUT == tl.float16:
        return (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    elif OUT == tl.float32:
        return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    else:
        return codes


@triton.jit
def _packed_keys(KQ, KS, KM, start, rows, ok, BITS: tl.constexpr, SPREAD: tl.constexpr, D: tl.constexpr,
                 G: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    """Keys of tokens `rows` = start + [0, BLOCK_N) (start a multiple of G) where `ok`, dequantized: [BLOCK_N, D]."""
    W: tl.constexpr = D * BITS // 32
    words = tl.load(KQ + rows[:, None] * W + tl.arange(0, W)[None, :], mask=ok[:, None], other=0)
    NG: tl.constexpr = BLOCK_N // G
    grp = start // G + tl.arange(0, NG)
    gok = tl.max(tl.reshape(ok.to(tl.int32), (NG, G)), 1) > 0
    offs = grp[:, None] * D + tl.arange(0, D)[None, :]
    s = tl.load(KS + offs, mask=gok[:, None], other=0.0).to(DOT)
    m = tl.load(KM + offs, mask=gok[:, None], other=0.0).to(DOT)
    # one (scale, min) row per group of G tokens, broadcast over its tokens
    codes = tl.reshape(_codes(words, BITS, SPREAD, D, DOT), (NG, G, D))
    return tl.reshape(codes * s[:, None, :] + m[:, None, :], (BLOCK_N, D))


@triton.jit
def _packed_values(VQ, VS, VM, rows, ok, BITS: tl.constexpr, SPREAD: tl.constexpr, D: tl.constexpr,
                   G: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    """Values of tokens `rows` where `ok`, dequantized: [BLOCK_N, D]."""
    W: tl.constexpr = D * BITS // 32
    words = tl.load(VQ + rows[:, None] * W + tl.arange(0, W)[None, :], mask=ok[:, None], other=0)
    DG: tl.constexpr = D // G
    offs = rows[:, None] * DG + tl.arange(0, DG)[None, :]
    s = tl.load(VS + offs, mask=ok[:, None], other=0.0).to(DOT)
    m = tl.load(VM + offs, mask=ok[:, None], other=0.0).to(DOT)
    # one (scale, min) per group of G channels, broadcast over its channels
    codes = tl.reshape(_codes(words, BITS, SPREAD, D, DOT), (BLOCK_N, DG, G))
    return tl.reshape(codes * s[:, :, None] + m[:, :, None], (BLOCK_N, D))


@triton.jit
def _ring(RING, rows, ok, R: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr):
    """Full-precision tokens `rows` (slot t % R) where `ok`: [BLOCK_N, D]."""
    offs = (rows % R)[:, None] * D + tl.arange(0, D)[None, :]
    return tl.load(RING + offs, mask=ok[:, None], other=0.0).to(DOT)


@triton.jit
def _online_softmax(q, k, v, valid, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr):
    """One tile of the online softmax (base 2): q [M, D], k and v [BLOCK_N, D] (all DOT), valid [BLOCK_N]."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _kivi_split_kernel(
    Q, KQ, KS, KM, VQ, VS, VM, RK, RV, KN, VN, OP, LSE,
    stride_qb, stride_qh, stride_nb, stride_nh,  # q [B, Hq, D] and the new token [B, H, D]
    s_kq, s_ks, s_vq, s_vs, s_r,  # per-(batch, KV head) strides of the packed and ring buffers
    n_k, n_v, n_tok, split_tokens, n_parts, part0, qk_scale,
    H, GROUP,  # KV heads and query heads per KV head: runtime values, so shapes differing only there share a build
    LEN,  # with DEVICE_LEN: int32 [1], the tokens seen (n_k, n_v and n_tok follow from it), read on the device
    M: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
    SPREAD: tl.constexpr, G: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_NEW: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, DEVICE_LEN: tl.constexpr = False,
):
    if DEVICE_LEN:  # a pinned cache (capture-safe steps): the ranges were planned for the reserved length
        n_tok = tl.load(LEN)
        n_k = n_tok // R * R
        n_v = tl.maximum(n_tok - R, 0)
    bh = tl.program_id(0)
    part = tl.program_id(1) + part0  # part0 > 0: the packed parts ran in the CUDA kernel (packed_attention)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, D)
    head_ok = offs_m < GROUP
    heads = h * GROUP + offs_m
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=head_ok[:, None], other=0.0)
    q = q.to(DOT)

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    if part < n_parts - 1:
        # a range of the packed tokens [0, Nv): keys and values both packed
        lo = part * split_tokens
        hi = tl.minimum(lo + split_tokens, n_v)
        for start in range(lo, hi, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            ok = rows < hi
            k = _packed_keys(KQ + bh64 * s_kq, KS + bh64 * s_ks, KM + bh64 * s_ks, start, rows, ok, BITS, SPREAD, D,
                             G, BLOCK_N, DOT)
            v = _packed_values(VQ + bh64 * s_vq, VS + bh64 * s_vs, VM + bh64 * s_vs, rows, ok, BITS, SPREAD, D, G,
                               BLOCK_N, DOT)
            m_i, l_i, acc = _online_softmax(q, k, v, ok, m_i, l_i, acc, qk_scale, PRECISION)
    else:
        # the last min(T, R) tokens: values from the ring, keys packed below Nk and from the ring above
        for start in range(n_v // BLOCK_N * BLOCK_N, n_tok, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            ok = (rows >= n_v) & (rows < n_tok)
            packed = rows < n_k
            k = _packed_keys(KQ + bh64 * s_kq, KS + bh64 * s_ks, KM + bh64 * s_ks, start, rows, ok & packed, BITS,
                             SPREAD, D, G, BLOCK_N, DOT)
            k = tl.where(packed[:, None], k, _ring(RK + bh64 * s_r, rows, ok & (rows >= n_k), R, D, DOT))
            v = _ring(RV + bh64 * s_r, rows, ok, R, D, DOT)
            m_i, l_i, acc = _online_softmax(q, k, v, ok, m_i, l_i, acc, qk_scale, PRECISION)
        if HAS_NEW:
            kn = tl.load(KN + b * stride_nb + h * stride_nh + offs_d).to(tl.float32)
            vn = tl.load(VN + b * stride_nb + h * stride_nh + offs_d).to(tl.float32)
            s = tl.sum(q.to(tl.float32) * kn[None, :], 1) * qk_scale
            m_new = tl.maximum(m_i, s)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * vn[None, :]
            m_i = m_new

    # this part's normalized output and log2-sum-exp2; a part without tokens has lse -inf and weighs nothing
    rows_out = (b * H * GROUP + heads).to(tl.int64) * n_parts + part
    store_partial(OP, LSE, rows_out, acc, l_i, m_i, offs_d, D, head_ok)


@triton.jit
def _kivi_combine_kernel(OP, LSE, OUT, n_parts, stride_ob, stride_oh, HQ, D: tl.constexpr, P: tl.constexpr):
    row = tl.program_id(0)  # b * Hq + query head
    b = row // HQ
    hq = row % HQ
    offs_p = tl.arange(0, P)
    offs_d = tl.arange(0, D)
    ok = offs_p < n_parts
    base = row.to(tl.int64) * n_parts
    lse = tl.load(LSE + base + offs_p, mask=ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    o = tl.load(OP + (base + offs_p)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(OUT + b * stride_ob + hq * stride_oh + offs_d, out.to(OUT.dtype.element_ty))


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _fp16_step(x, UP: tl.constexpr):
    """The fp16 next to x towards +inf (UP, x >= 0) or -inf, as torch.nextafter."""
    bits = x.to(tl.int16, bitcast=True)
    if UP:
        return (bits + 1).to(tl.float16, bitcast=True)
    else:
        neg_tiny = tl.full(bits.shape, -32767, tl.int16)  # 0x8001: the negative subnormal nearest zero
        return tl.where(x > 0, bits - 1, tl.where(x < 0, bits + 1, neg_tiny)).to(tl.float16, bitcast=True)


@triton.jit
def _kivi_append_kernel(
    KN, VN, RK, RV, VQ, VS, VM,
    stride_nb, stride_nh,  # the new token k, v [B, H, D]
    s_r, s_vq, s_vs, n_tok,
    H: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, R: tl.constexpr, QUANT: tl.constexpr,
):
    """One decode step's write, one program per (batch, KV head): when the residual is full, quantize the value of
    token n - R (per token over groups of G channels, exactly as kivi_ref.quantize) into packed row n - R, then put
    the new token in ring slot n % R, where token n - R was."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    offs = tl.arange(0, D)
    ring = bh64 * s_r + (n_tok % R) * D + offs
    if QUANT:
        DG: tl.constexpr = D // G
        E: tl.constexpr = 32 // BITS
        W: tl.constexpr = D // E
        LEVELS: tl.constexpr = (1 << BITS) - 1
        x = tl.reshape(tl.load(RV + ring).to(tl.float32), (DG, G))
        lo = tl.min(x, 1)
        hi = tl.max(x, 1)
        mn = lo.to(tl.float16)
        mn = tl.where(mn.to(tl.float32) > lo, _fp16_step(mn, False), mn)
        want = tl.math.div_rn(hi - mn.to(tl.float32), tl.full(hi.shape, LEVELS, tl.float32))
        scale = want.to(tl.float16)
        scale = tl.where(scale.to(tl.float32) < want, _fp16_step(scale, True), scale)
        safe = tl.where(scale > 0, scale.to(tl.float32), 1.0)
        y = tl.math.div_rn(x - mn.to(tl.float32)[:, None], tl.broadcast_to(safe[:, None], (DG, G)))
        y = (y + 8388608.0) - 8388608.0  # round half to even, as torch.round (exact for 0 <= y < 2^22)
        codes = tl.minimum(tl.maximum(y, 0.0), LEVELS).to(tl.int32)
        shift = tl.arange(0, E) * BITS
        words = tl.reduce(tl.reshape(codes, (W, E)) << shift[None, :], 1, _or)
        row = (n_tok - R).to(tl.int64)
        tl.store(VQ + bh64 * s_vq + row * W + tl.arange(0, W), words)
        tl.store(VS + bh64 * s_vs + row * DG + tl.arange(0, DG), scale)
        tl.store(VM + bh64 * s_vs + row * DG + tl.arange(0, DG), mn)
        tl.debug_barrier()  # the old value is read before its slot is overwritten
    tl.store(RK + ring, tl.load(KN + b * stride_nb + h * stride_nh + offs))
    tl.store(RV + ring, tl.load(VN + b * stride_nb + h * stride_nh + offs))


def append_one(kv: PackedKV, k: torch.Tensor, v: torch.Tensor) -> None:
    """kv.append(k, v) for one token, k and v [B, H, 1, D]: one kernel packs the value leaving the residual and writes
    the token into the ring; once every R steps a completed key block is packed by the reference."""
    B, H, _, D = k.shape
    n, R = kv.n, kv.residual
    quant = n >= R
    kv.reserve((n + 1) // R * R, max(0, n + 1 - R))
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    _kivi_append_kernel[(B * H,)](
        k, v, kv.rk, kv.rv, kv.vq if quant else kv.rk, kv.vs if quant else kv.rk, kv.vm if quant else kv.rk,
        k.stride(0), k.stride(1), kv.rk.stride(1), kv.vq.stride(1), kv.vs.stride(1), n,
        H=H, D=D, BITS=kv.bits, G=kv.group, R=R, QUANT=quant, num_warps=1,
    )
    kv.n = n + 1
    if kv.n % R == 0:  # keys n + 1 - R .. n fill the ring, in slot order
        kv.pack_keys(kv.rk, kv.n - R)


@triton.jit
def _quantize_groups(x, AXIS: tl.constexpr, BITS: tl.constexpr):
    """kivi_ref.quantize of fp32 x (2-D) over groups along AXIS: codes (int32, x's shape), scale and min (fp16, AXIS
    reduced); bit for bit the reference's arithmetic (div_rn; fp16 rounded outwards; round half to even)."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    lo = tl.min(x, AXIS)
    hi = tl.max(x, AXIS)
    mn = lo.to(tl.float16)
    mn = tl.where(mn.to(tl.float32) > lo, _fp16_step(mn, False), mn)
    want = tl.math.div_rn(hi - mn.to(tl.float32), tl.full(hi.shape, LEVELS, tl.float32))
    scale = want.to(tl.float16)
    scale = tl.where(scale.to(tl.float32) < want, _fp16_step(scale, True), scale)
    safe = tl.where(scale > 0, scale.to(tl.float32), 1.0)
    y = tl.math.div_rn(x - tl.expand_dims(mn.to(tl.float32), AXIS),
                       tl.broadcast_to(tl.expand_dims(safe, AXIS), x.shape))
    y = (y + 8388608.0) - 8388608.0  # round half to even, as torch.round (exact for 0 <= y < 2^22)
    return tl.minimum(tl.maximum(y, 0.0), LEVELS).to(tl.int32), scale, mn


@triton.jit
def _pack_rows(codes, N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """codes int32 [N, D] -> words int32 [N, D * BITS / 32] in kivi_ref.pack's layout."""
    E: tl.constexpr = 32 // BITS
    shift = tl.arange(0, E) * BITS
    return tl.reduce(tl.reshape(codes, (N, D // E, E)) << shift[None, None, :], 2, _or)


@triton.jit
def _kivi_append_pinned_kernel(
    KN, VN, RK, RV, KQ, KS, KM, VQ, VS, VM, LEN,
    stride_nb, stride_nh,  # the new token k, v [B, H, D]
    s_r, s_kq, s_ks, s_vq, s_vs, H,
    D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
):
    """append_one with the length n read from LEN (a pinned cache): the value of token n - R is packed when n >= R,
    the new token goes to ring slot n % R, and when it completes a key block ((n + 1) % R == 0) the block's R keys,
    ring slots 0 .. R-1 in token order, are packed too, as kivi_ref.PackedKV.pack_keys does. No host branch, so a
    CUDA graph replays it; the caller moves LEN on afterwards."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    offs = tl.arange(0, D)
    n_tok = tl.load(LEN)
    ring = bh64 * s_r + (n_tok % R) * D + offs
    DG: tl.constexpr = D // G
    W: tl.constexpr = D * BITS // 32
    if n_tok >= R:
        x = tl.reshape(tl.load(RV + ring).to(tl.float32), (DG, G))
        codes, scale, mn = _quantize_groups(x, 1, BITS)
        words = tl.reshape(_pack_rows(tl.reshape(codes, (1, D)), 1, D, BITS), (W,))
        row = (n_tok - R).to(tl.int64)
        tl.store(VQ + bh64 * s_vq + row * W + tl.arange(0, W), words)
        tl.store(VS + bh64 * s_vs + row * DG + tl.arange(0, DG), scale)
        tl.store(VM + bh64 * s_vs + row * DG + tl.arange(0, DG), mn)
    tl.debug_barrier()  # the old value is read before its slot is overwritten
    tl.store(RK + ring, tl.load(KN + b * stride_nb + h * stride_nh + offs))
    tl.store(RV + ring, tl.load(VN + b * stride_nb + h * stride_nh + offs))
    if (n_tok + 1) % R == 0:
        tl.debug_barrier()  # the new key is in the ring before the block is read
        row0 = (n_tok + 1 - R).to(tl.int64)
        for gi in tl.static_range(R // G):  # per channel over each group of G tokens
            t = gi * G + tl.arange(0, G)
            x = tl.load(RK + bh64 * s_r + t[:, None] * D + offs[None, :]).to(tl.float32)
            codes, scale, mn = _quantize_groups(x, 0, BITS)
            words = _pack_rows(codes, G, D, BITS)
            tl.store(KQ + bh64 * s_kq + (row0 + t)[:, None] * W + tl.arange(0, W)[None, :], words)
            tl.store(KS + bh64 * s_ks + (row0 // G + gi) * D + offs, scale)
            tl.store(KM + bh64 * s_ks + (row0 // G + gi) * D + offs, mn)


def append_pinned(kv: PackedKV, k: torch.Tensor, v: torch.Tensor) -> None:
    """One token k, v [B, H, 1, D] into a pinned cache (kv.ndev set, room reserved): the device counter says where,
    and is moved on; kv.n, the host mirror, is the caller's (KiviLayer.advance)."""
    B, H, _, D = k.shape
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    live = lambda t: t if t.numel() else kv.rk  # noqa: E731 - a buffer never written in this run may be empty
    _kivi_append_pinned_kernel[(B * H,)](
        k, v, kv.rk, kv.rv, *(live(t) for t in (kv.kq, kv.ks, kv.km, kv.vq, kv.vs, kv.vm)), kv.ndev,
        k.stride(0), k.stride(1), kv.rk.stride(1), kv.kq.stride(1), kv.ks.stride(1), kv.vq.stride(1),
        kv.vs.stride(1), H, D=D, BITS=kv.bits, G=kv.group, R=kv.residual, num_warps=4,
    )
    kv.ndev.add_(1)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter on the CPU: a few parts are enough to exercise the combine
    return torch.cuda.get_device_properties(device).multi_processor_count


def supported(D: int, bits: int, group: int, residual: int) -> bool:
    """Shapes the kernel handles: power-of-two head dim >= 16 and groups (tl.arange needs powers of two)."""
    pow2 = lambda x: x >= 1 and x & (x - 1) == 0  # noqa: E731
    return pow2(D) and D >= 16 and pow2(group) and pow2(D // group) and group <= 128 and residual % group == 0 \
        and bits in (2, 4)


# tokens per packed range at least: below this a program's fixed cost (query load, output store, its share of the
# combine) outweighs its tiles
MIN_SPLIT = 128
# programs per SM assumed where the compiled kernel cannot be asked (the interpreter; a failed query): sm_90 builds of
# the default configuration take 128 registers and 56 KB of shared memory, so 4 fit
RESIDENT_DEFAULT = 4


def plan(kv: PackedKV, B: int, block_n: int | None = None, splits: int | None = None,
         slots: int | None = None, nv: int | None = None) -> tuple[int, int, int]:
    """(block_n, split_tokens, n_parts): tiles of block_n tokens; the packed tokens [0, Nv) cut into ranges of
    split_tokens, +1 part per head for the ring.

    By default the ranges fit the programs that run at once (`slots`, programs per SM x SMs): the split kernel takes
    about waves x (tiles per range + 1), waves = ceil(B x H x ranges / slots), since equal ranges finish together. The
    old rule (8 programs per SM) made 17 ranges per head at 32K x 8 on 132 SMs: 1088 programs, just over 2 waves of
    4 per SM. In one process on an H200 (benchmarks/kivi_dev.py --sweep): 17 ranges above 306 us, 16 ranges 283 us,
    this plan's 8 (one wave of 4096-token ranges) 284 us."""
    H = kv.rk.shape[1]
    nv = kv.nv if nv is None else nv  # packed values to plan for: now, or at the end of a reserved run
    block_n = max(block_n or 64, kv.group)  # whole key groups per tile
    if nv == 0:
        return block_n, block_n, 1
    tiles = triton.cdiv(nv, block_n)
    if splits is None:
        heads = B * H
        slots = slots or RESIDENT_DEFAULT * _sm_count(kv.rk.device)
        most = max(1, min(tiles, triton.cdiv(nv, MIN_SPLIT), triton.cdiv(4 * slots, heads)))
        best = None
        for p in range(1, most + 1):
            per = triton.cdiv(tiles, p)
            cost = triton.cdiv(heads * triton.cdiv(tiles, per), slots) * (per + 1)
            if best is None or cost < best[0]:  # ties: fewer ranges (a smaller combine)
                best = (cost, per)
        per = best[1]
    else:
        per = triton.cdiv(tiles, max(1, splits))
    return block_n, per * block_n, triton.cdiv(tiles, per) + 1


_RESIDENT: dict[tuple, int | None] = {}  # programs per SM by split-kernel configuration (Decoder._resident)


def _resident(device: torch.device, n_regs: int, shared: int, num_warps: int) -> int:
    """Programs of one compiled kernel that fit on an SM at once: registers (allocated per warp in units of 256),
    shared memory (plus 1 KB the driver reserves per block) and warps."""
    props = torch.cuda.get_device_properties(device)
    regs = 65536 // (triton.cdiv(max(n_regs, 1) * 32, 256) * 256 * num_warps)
    smem = getattr(props, "shared_memory_per_multiprocessor", 233472) // (shared + 1024) if shared else 32
    warps = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
    return max(1, min(regs, smem, warps, 32))


# Which kernel attends the packed tokens [0, Nv) on a GPU: "cuda" (csrc/kivi_attend.cu: the words dequantized straight
# into mma fragments, see that file) where cuda_path() admits the shapes, else "triton" (the split kernel above, for
# every part). The ring part and the combine are Triton's either way. KVBENCH_KIVI_ATTEND picks one for a process.
ATTEND_PATHS = ("cuda", "triton")
_PATH = os.environ.get("KVBENCH_KIVI_ATTEND", "cuda")
if _PATH not in ATTEND_PATHS:
    raise ValueError(f"KVBENCH_KIVI_ATTEND={_PATH!r}: one of {ATTEND_PATHS}")
USE_CUDA = _PATH == "cuda"
# packed (batch x KV head x token) rows from which the CUDA path runs: below, its three launches (CUDA, Triton ring
# part, combine) cost more than Triton's two. On an H200 (kernel suite, graph timing, bf16, Llama-3.1-8B shape) the
# CUDA path took 22.7 us at 8K x 1 (65K rows) where the Triton path had taken 15.9, and won from 32K x 1 (261K rows:
# 34.4 against 41.4); the threshold lies between those two points, not at a measured crossover.
CUDA_MIN_ROWS = 1 << 17
CUDA_BIAS_ROWS = 512  # csrc/kivi_attend.cu: kMaxBiasRows, key groups per part at most (with 2 to spare)


class CudaParams(ctypes.Structure):
    """csrc/kivi_attend.cu's kivi::Params, field for field."""

    _fields_ = ([(n, ctypes.c_void_p) for n in ("q", "kq", "ks", "km", "vq", "vs", "vm", "part_o", "part_lse", "len")]
                + [(n, ctypes.c_int64) for n in ("q_sb", "q_sh", "s_kq", "s_ks", "s_vq", "s_vs")]
                + [(n, ctypes.c_int) for n in ("B", "H", "group", "n_tok", "R", "G", "split", "n_parts")]
                + [("qk_scale", ctypes.c_float)])


@functools.cache
def cuda_lib() -> ctypes.CDLL:
    """csrc/kivi_attend.cu as a shared library (jit.shared_lib: nvcc, once per source and GPU, loaded with ctypes)."""
    from kvbench.kernels import jit

    lib = jit.shared_lib("kivi_attend.cu")
    lib.kivi_attend.argtypes = [ctypes.POINTER(CudaParams), ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.kivi_blocks_per_sm.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.kivi_error_string.restype = ctypes.c_char_p
    return lib


def cuda_path(q: torch.Tensor, kv: PackedKV, nv: int | None = None) -> bool:
    """Whether the packed tokens go through the CUDA kernel: fp16/bf16 on a GPU, head_dim 64 or 128, up to 8 query
    heads per KV head (the mma's N), groups of 16 to 128 tokens, a power of two (a tile's keys share their scales), and
    at least CUDA_MIN_ROWS packed rows (nv: the packed tokens planned for, default kv.nv)."""
    H = kv.rk.shape[1]
    rows = q.shape[0] * H * (kv.nv if nv is None else nv)
    return (USE_CUDA and q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 128) and q.shape[1] // H <= 8
            and kv.group in (16, 32, 64, 128) and rows >= CUDA_MIN_ROWS)


@functools.cache
def _cuda_resident(bf16: bool, D: int, bits: int) -> int:
    """Blocks of the CUDA kernel per SM (the occupancy calculator on the built kernel)."""
    return max(1, cuda_lib().kivi_blocks_per_sm(int(bf16), D, bits))


class Decoder:
    """KIVI decode attention for query q [B, Hq, 1, D] over the current cache (plus an optional new token), with its
    scratch buffers allocated once: `__call__` runs split (packed parts, then the ring part) and combine; the kernel
    suite times them as stages (and, on the CUDA path, `packed` and `tail`, its two launches). Build a new Decoder
    after the cache changes."""

    def __init__(self, q: torch.Tensor, kv: PackedKV, *, block_n: int | None = None, splits: int | None = None,
                 num_warps: int = 4, num_stages: int = 2, maxnreg: int | None = 128, max_tokens: int | None = None,
                 path: str | None = None):
        """max_tokens: a pinned cache (kv.ndev set, room reserved up to max_tokens): the kernels read the length from
        kv.ndev, the ranges are planned for max_tokens (those past the live tokens are empty), and step(q, ...) takes
        each step's query, so one Decoder serves every step of a reserved run. path: "cuda" or "triton" for the
        packed parts (default: cuda_path())."""
        B, Hq, Tq, D = q.shape
        H = kv.rk.shape[1]
        if Tq != 1:
            raise ValueError(f"KIVI's decode kernel takes one query per sequence, got {Tq}")
        if q.stride(-1) != 1:
            q = q.contiguous()
        for t in kv.tensors():
            assert t.is_contiguous(), "the packed cache must be contiguous"
        self.q, self.kv, self.group = q, kv, Hq // H
        self.pinned = max_tokens is not None
        nv = max(0, max_tokens - kv.residual) if self.pinned else None
        self.cuda = cuda_path(q, kv, nv) if path is None else path == "cuda"
        # 128 registers: 4 programs of 4 warps per SM instead of 3 (at 166 registers); sm_90 builds show no spills in
        # the main loop at this cap, and 4 x 56 KB of shared memory still fit
        self.num_warps, self.num_stages, self.maxnreg = num_warps, num_stages, maxnreg
        # zero-size buffers (nothing packed yet) still need a valid pointer
        dummy = lambda t: t if t.numel() else torch.empty(1, dtype=t.dtype, device=t.device)  # noqa: E731
        self.buffers = [dummy(t) for t in kv.tensors()]
        self.strides = [kv.kq.stride(1), kv.ks.stride(1), kv.vq.stride(1), kv.vs.stride(1), kv.rk.stride(1)]
        self.block_n = max(block_n or 64, kv.group)
        # stand-ins of the right dtype for the compile query below (warmup compiles, it does not launch)
        self.op = self.lse = torch.empty(1, dtype=torch.float32, device=q.device)
        self.block_n, self.split_tokens, self.n_parts = self._plan(B, block_n, splits, nv)
        self.op = torch.empty(B * Hq * self.n_parts, D, dtype=torch.float32, device=q.device)
        self.lse = torch.empty(B * Hq * self.n_parts, dtype=torch.float32, device=q.device)
        self.out = torch.empty(B, Hq, 1, D, dtype=q.dtype, device=q.device)
        self.params = self._cuda_params() if self.cuda else None

    def _plan(self, B: int, block_n: int | None, splits: int | None, nv: int | None) -> tuple[int, int, int]:
        """plan() with this path's programs per SM; the CUDA kernel's parts hold at most CUDA_BIAS_ROWS - 16 key
        groups (its q . min table) and are whole tiles of 64 tokens (16 per warp)."""
        kv = self.kv
        if not self.cuda:
            self.resident = self._resident() if splits is None else None
            slots = (self.resident or RESIDENT_DEFAULT) * _sm_count(self.q.device)
            return plan(kv, B, block_n, splits, slots, nv)
        self.resident = _cuda_resident(self.q.dtype == torch.bfloat16, self.q.shape[-1], kv.bits) \
            if self.q.is_cuda else RESIDENT_DEFAULT
        slots = self.resident * _sm_count(self.q.device)
        most = (CUDA_BIAS_ROWS - 16) * kv.group // 64 * 64
        bn, split, parts = plan(kv, B, 64, splits, slots, nv)
        if split > most:
            bn, split, parts = plan(kv, B, 64, triton.cdiv(kv.nv if nv is None else nv, most), slots, nv)
        return bn, split, parts

    def _cuda_params(self) -> CudaParams:
        q, kv = self.q, self.kv
        B, Hq, _, D = q.shape
        H = kv.rk.shape[1]
        ptr = lambda t: t.data_ptr()  # noqa: E731
        kq, ks, km, vq, vs, vm = self.buffers[:6]
        return CudaParams(
            ptr(q), ptr(kq), ptr(ks), ptr(km), ptr(vq), ptr(vs), ptr(vm), ptr(self.op), ptr(self.lse),
            kv.ndev.data_ptr() if self.pinned else None,
            q.stride(0), q.stride(1), kv.kq.stride(1), kv.ks.stride(1), kv.vq.stride(1), kv.vs.stride(1),
            B, H, self.group, kv.n, kv.residual, kv.group, self.split_tokens, self.n_parts,
            D**-0.5 * math.log2(math.e))

    def _resident(self) -> int | None:
        """Programs per SM of this configuration's compiled split kernel (compiled now, as the first launch would);
        None in the interpreter or where Triton cannot say."""
        if not self.q.is_cuda:
            return None
        args, kw = self._launch(None, None, split_tokens=self.block_n, n_parts=2)
        key = (self.q.device, self.q.dtype, *sorted((n, str(v)) for n, v in kw.items()))
        if key not in _RESIDENT:  # once per configuration: a Decoder is built at every eager decode step
            try:
                k = _kivi_split_kernel.warmup(*args, grid=(1,), **kw)
                k._init_handles()
                _RESIDENT[key] = _resident(self.q.device, k.n_regs, k.metadata.shared, k.metadata.num_warps)
            except Exception:  # noqa: BLE001 - Triton internals differ between versions; the default then holds
                _RESIDENT[key] = None
        return _RESIDENT[key]

    def _launch(self, k_new, v_new, split_tokens: int, n_parts: int, part0: int = 0) -> tuple[list, dict]:
        q, kv = self.q, self.kv
        B, Hq, _, D = q.shape
        H = kv.rk.shape[1]
        has_new = k_new is not None
        kn = k_new if has_new else q  # any pointer: not read without HAS_NEW
        vn = v_new if has_new else q
        if has_new and (kn.stride(-1) != 1 or vn.stride(-1) != 1 or kn.stride() != vn.stride()):
            kn, vn = kn.contiguous(), vn.contiguous()
        pinned = self.pinned
        lengths = (0, 0, 0) if pinned else (kv.nk, kv.nv, kv.n)  # pinned: read from kv.ndev on the device
        args = [q, *self.buffers, kn, vn, self.op, self.lse,
                q.stride(0), q.stride(1), kn.stride(0), kn.stride(1),
                *self.strides,
                *lengths, split_tokens, n_parts, part0, D**-0.5 * math.log2(math.e), H, self.group,
                kv.ndev if pinned else self.op]
        kw = dict(
            M=max(16, triton.next_power_of_2(self.group)), D=D, BITS=kv.bits,
            SPREAD=int(math.log2(32 // kv.bits)), G=kv.group, R=kv.residual, BLOCK_N=self.block_n, HAS_NEW=has_new,
            DOT=tl.float32 if q.dtype == torch.float32 else tl.float16,
            # fp32 models: tf32 tensor cores on the GPU (an fp32 FMA dot spills), exact fp32 in the interpreter
            PRECISION="tf32" if q.is_cuda else "ieee", DEVICE_LEN=pinned,
            num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=self.maxnreg,
        )
        return args, kw

    def packed(self) -> None:
        """The CUDA kernel over the packed parts [0, n_parts - 1) (nothing on the Triton path, whose split kernel
        runs every part)."""
        if not self.cuda or self.n_parts < 2:
            return
        q, p = self.q, self.params
        p.q, p.q_sb, p.q_sh = q.data_ptr(), q.stride(0), q.stride(1)
        stream = torch.cuda.current_stream(q.device).cuda_stream if q.is_cuda else None
        lib = cuda_lib()
        err = lib.kivi_attend(ctypes.byref(p), int(q.dtype == torch.bfloat16), q.shape[-1], self.kv.bits, stream)
        if err:
            raise KVBenchError(f"kivi CUDA attention: {lib.kivi_error_string(err).decode()}")

    def tail(self, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> None:
        """The Triton split kernel: the ring part (and the new token), or every part on the Triton path."""
        B = self.q.shape[0]
        H = self.kv.rk.shape[1]
        part0 = self.n_parts - 1 if self.cuda else 0
        args, kw = self._launch(k_new, v_new, self.split_tokens, self.n_parts, part0)
        _kivi_split_kernel[(B * H, self.n_parts - part0)](*args, **kw)

    def split(self, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> None:
        self.packed()
        self.tail(k_new, v_new)

    def combine(self) -> torch.Tensor:
        B, Hq, _, D = self.q.shape
        _kivi_combine_kernel[(B * Hq,)](
            self.op, self.lse, self.out, self.n_parts, self.out.stride(0), self.out.stride(1), Hq,
            D=D, P=triton.next_power_of_2(self.n_parts), num_warps=4,
        )
        return self.out

    def __call__(self, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> torch.Tensor:
        self.split(k_new, v_new)
        return self.combine()

    def step(self, q: torch.Tensor, k_new: torch.Tensor | None = None,
             v_new: torch.Tensor | None = None) -> torch.Tensor:
        """This step's query q (the shape and dtype the Decoder was built for) over the cache and the new token:
        no allocation (the output buffer is reused) and no host synchronisation."""
        if q.shape != self.q.shape or q.dtype != self.q.dtype:
            raise ValueError(f"Decoder built for {tuple(self.q.shape)} {self.q.dtype}, got {tuple(q.shape)} {q.dtype}")
        self.q = q if q.stride(-1) == 1 else q.contiguous()
        return self(k_new, v_new)


def decode_attention(q: torch.Tensor, kv: PackedKV, k_new: torch.Tensor | None = None,
                     v_new: torch.Tensor | None = None, **config) -> torch.Tensor:
    """q [B, Hq, 1, D] attends over the packed cache and then the new token k_new/v_new [B, H, 1, D] (not stored):
    the output [B, Hq, 1, D] of kivi_ref.attention_ref, computed on the packed words."""
    return Decoder(q, kv, **config)(k_new, v_new)
