"""Triton scoring kernels of the methods that select tokens every decode step: quest's page bounds, doublesparse's
label scores (both `rowdot`) and qjl's sign-sketch inner products (`sign_rowdot`).

Each decode step of these methods reads a small summary of every token (quest: a page's min and max key; doublesparse:
16 of 128 key channels; qjl: 256 sign bits), so the summary read is what their scoring costs; the kernels read each
summary row once, in one pass over the tokens, and write one fp32 score per token (quest and doublesparse: per KV
head; qjl: per query head, as its scores feed the softmax). Selection (torch.topk) and the exact attention over the
selected tokens stay in PyTorch.

Why Triton: its interpreter (TRITON_INTERPRET=1) runs these very kernels on the CPU, so CI checks them against the
PyTorch references in the method files; the GPU tests check the same code at real shapes.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kvbench.api import KVBenchError
from kvbench.kernels.kivi import _fix_interpreter_for_numpy_2_4

_fix_interpreter_for_numpy_2_4()  # kivi's fix for Triton 3.6's interpreter under numpy >= 2.4 (idempotent)

BLOCK_N = 64  # tokens (or pages) per program (sign_rowdot, qjl_outlier_scores)
ROWDOT_BLOCK = None  # rowdot's rows per program; None: about 16K elements a program (short label rows get many)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(method: str, impl: str, device: torch.device) -> bool:
    """Whether a method with impl "auto" / "triton" / "torch" runs these kernels on `device`; impl=triton where they
    cannot run is a KVBenchError that says what to do."""
    on_cuda = torch.device(device).type == "cuda"
    if impl == "torch" or (impl == "auto" and not on_cuda):
        return False
    if not on_cuda and not interpreting():
        raise KVBenchError(f"{method}:impl=triton runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1); use "
                           "impl=torch or auto")
    return True


@triton.jit
def _rowdot_kernel(X, W, META, OUT, N, C, H, sxb, sxh, sxn, smb, smh, smn, BLOCK: tl.constexpr, CP: tl.constexpr,
                   NIBBLES: tl.constexpr, AFFINE: tl.constexpr):
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, CP)
    ok = (rows[:, None] < N) & (cols[None, :] < C)
    b, h = bh // H, bh % H
    base = X + b * sxb + h * sxh + rows[:, None] * sxn
    if NIBBLES:  # two 4-bit codes a byte: column c in the low (c even) or high half of byte c // 2
        byte = tl.load(base + cols[None, :] // 2, mask=ok, other=0).to(tl.int32)
        x = ((byte >> ((cols[None, :] % 2) * 4)) & 15).to(tl.float32)
    else:
        x = tl.load(base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    w = tl.load(W + bh * C + cols, mask=cols < C, other=0.0)
    dots = tl.sum(x * w[None, :], axis=1)
    if AFFINE:  # codes: x = code * step + minimum per row, so x.w = step (code.w) + minimum sum(w)
        meta = META + b * smb + h * smh + rows * smn
        step = tl.load(meta, mask=rows < N, other=0.0).to(tl.float32)
        low = tl.load(meta + 1, mask=rows < N, other=0.0).to(tl.float32)
        dots = dots * step + low * tl.sum(w, axis=0)
    tl.store(OUT + bh * N + rows, dots, mask=rows < N)


def rowdot(x: torch.Tensor, w: torch.Tensor, meta: torch.Tensor | None = None, nibbles: bool = False) -> torch.Tensor:
    """out[b, h, n] = sum_c x[b, h, n, c] * w[b, h, c]: x [B, H, N, C] (any float dtype, last dim contiguous), w
    [B, H, C] -> [B, H, N] fp32. With meta [B, H, N, 2] (step, minimum per row) x holds uint8 codes (packed two a byte
    when `nibbles`, so C is twice x's last dim) standing for code * step + minimum."""
    B, H, N, C = x.shape
    C = 2 * C if nibbles else C
    assert x.stride(3) == 1 and w.shape == (B, H, C)
    w = w.float().contiguous()
    out = torch.empty(B, H, N, dtype=torch.float32, device=x.device)
    m = x if meta is None else meta
    CP = triton.next_power_of_2(C)
    # doublesparse's 16-channel labels at 64 rows a program made 512-byte programs: latency, not bandwidth
    block = ROWDOT_BLOCK or max(BLOCK_N, min(1024, 16384 // CP))
    if N:
        _rowdot_kernel[(B * H, triton.cdiv(N, block))](
            x, w, m, out, N, C, H, x.stride(0), x.stride(1), x.stride(2), m.stride(0), m.stride(1), m.stride(2),
            BLOCK=block, CP=CP, NIBBLES=nibbles, AFFINE=meta is not None)
    return out


@triton.jit
def _sign_rowdot_kernel(BITS, W, SCALE, OUT, N, G, M, H, sbb, sbh, sbn, BLOCK: tl.constexpr, GP: tl.constexpr,
                        MP: tl.constexpr):
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = tl.arange(0, MP)
    g = tl.arange(0, GP)
    b, h = bh // H, bh % H
    ok = (rows[:, None] < N) & (m[None, :] < M)
    byte = tl.load(BITS + b * sbb + h * sbh + rows[:, None] * sbn + m[None, :] // 8, mask=ok, other=0).to(tl.int32)
    sign = (((byte >> (m[None, :] % 8)) & 1) * 2 - 1).to(tl.float16)  # [BLOCK, MP]: +1 / -1, exact in fp16
    sign = tl.where(ok, sign, 0.0)
    qrow = (b * H + h) * G + g  # this KV head's query heads
    w = tl.load(W + qrow[:, None] * M + m[None, :], mask=(g[:, None] < G) & (m[None, :] < M), other=0.0)
    # tensor-core dot: the sketched queries in fp16 (relative error ~5e-4, far below the estimator's own), fp32 sums
    dots = tl.dot(w.to(tl.float16), tl.trans(sign))  # [GP, BLOCK]
    scale = tl.load(SCALE + bh * N + rows, mask=rows < N, other=0.0)
    tl.store(OUT + qrow[:, None] * N + rows[None, :], dots * scale[None, :],
             mask=(g[:, None] < G) & (rows[None, :] < N))


def sign_rowdot(bits: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """out[b, j, n] = scale[b, h, n] * sum_m w[b, j, m] * s[b, h, n, m] for the query heads j of KV head h, where
    s = +1 / -1 is bit m % 8 of byte m // 8 of bits[b, h, n]: bits [B, H, N, M / 8] uint8 (last dim contiguous),
    w [B, Hq, M], scale [B, H, N] -> [B, Hq, N] fp32."""
    B, H, N, nb = bits.shape
    Hq, M = w.shape[1], w.shape[2]
    assert bits.stride(3) == 1 and M == 8 * nb and Hq % H == 0
    G = Hq // H
    w, scale = w.float().contiguous(), scale.float().contiguous()
    out = torch.empty(B, Hq, N, dtype=torch.float32, device=bits.device)
    if N:
        _sign_rowdot_kernel[(B * H, triton.cdiv(N, BLOCK_N))](
            bits, w, scale, out, N, G, M, H, bits.stride(0), bits.stride(1), bits.stride(2), BLOCK=BLOCK_N,
            GP=max(16, triton.next_power_of_2(G)), MP=max(16, triton.next_power_of_2(M)))  # tl.dot wants >= 16
    return out


@triton.jit
def _qjl_outlier_kernel(IDX, Q, W, P, SIN, NIN, SOUT, NOUT, OUT, N, G, M, MO, D, O, H, GQ, NG, scale_in, scale_out,
                        NP: tl.constexpr, MP: tl.constexpr, OP: tl.constexpr, GP: tl.constexpr):
    bh, grp = tl.program_id(0), tl.program_id(1)  # one program per (sequence, KV head) and group of tokens
    b, h = bh // H, bh % H
    o, m, j = tl.arange(0, OP), tl.arange(0, MP), tl.arange(0, GP)
    rows = grp * NG + tl.arange(0, NP)
    ok_r, ok_m, ok_j = (rows < (grp + 1) * NG) & (rows < N), m < M, j < GQ
    idx = tl.load(IDX + (bh * G + grp) * O + o, mask=o < O, other=0).to(tl.int32)  # this group's outlier channels
    s_o = tl.load(P + idx[:, None] * M + m[None, :], mask=(o < O)[:, None] & ok_m[None, :], other=0.0)  # [OP, MP]
    qrow = b * H * GQ + h * GQ + j  # this KV head's query heads
    q_o = tl.load(Q + qrow[:, None] * D + idx[None, :], mask=ok_j[:, None] & (o < O)[None, :], other=0.0)
    qs_out = tl.dot(q_o, s_o, input_precision="ieee")  # [GP, MP]: the query's outlier part, projected
    w = tl.load(W + qrow[:, None] * M + m[None, :], mask=ok_j[:, None] & ok_m[None, :], other=0.0)
    nb = M // 8
    byte = tl.load(SIN + (bh * N + rows[:, None]) * nb + m[None, :] // 8, mask=ok_r[:, None] & ok_m[None, :], other=0)
    s_in = tl.where(ok_r[:, None] & ok_m[None, :], (((byte.to(tl.int32) >> (m[None, :] % 8)) & 1) * 2 - 1), 0)
    nbo = MO // 8
    ok_mo = m < MO
    byte = tl.load(SOUT + (bh * N + rows[:, None]) * nbo + m[None, :] // 8, mask=ok_r[:, None] & ok_mo[None, :],
                   other=0)
    s_out = tl.where(ok_r[:, None] & ok_mo[None, :], (((byte.to(tl.int32) >> (m[None, :] % 8)) & 1) * 2 - 1), 0)
    dots_in = tl.dot((w - qs_out).to(tl.float16), tl.trans(s_in.to(tl.float16)))  # [GP, NP], fp32 sums
    dots_out = tl.dot(qs_out.to(tl.float16), tl.trans(s_out.to(tl.float16)))
    n_in = tl.load(NIN + bh * N + rows, mask=ok_r, other=0.0).to(tl.float32)
    n_out = tl.load(NOUT + bh * N + rows, mask=ok_r, other=0.0).to(tl.float32)
    est = dots_in * (scale_in * n_in)[None, :] + dots_out * (scale_out * n_out)[None, :]
    tl.store(OUT + qrow[:, None] * N + rows[None, :], est, mask=ok_j[:, None] & ok_r[None, :])


def qjl_outlier_scores(keys, q1: torch.Tensor, w: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """qjl's estimator with outliers (methods/qjl.py outlier_scores_ref) for one query per head: keys an OutlierKeys
    over N tokens in G groups, q1 [B, Hq, D], w = q1 @ proj [B, Hq, m], proj [D, m] -> [B, Hq, N] fp32. One program
    per group: it projects the query's outlier channels (a small dot with those rows of proj), then scores the
    group's inlier and outlier signs."""
    B, H, G, O = keys.idx.shape
    N, Hq, D, M = keys.norms.shape[2], q1.shape[1], q1.shape[2], proj.shape[1]
    MO = keys.out_signs.shape[3] * 8
    out = torch.empty(B, Hq, N, dtype=torch.float32, device=q1.device)
    if N:
        NG = N // G
        c = math.sqrt(math.pi / 2)
        parts = [keys.idx, q1.float(), w.float(), proj.float(), keys.signs, keys.norms, keys.out_signs, keys.out_norms]
        parts = [t.contiguous() for t in parts]
        pow2 = lambda n: max(16, triton.next_power_of_2(n))  # noqa: E731 - tl.dot wants dims >= 16
        _qjl_outlier_kernel[(B * H, G)](*parts, out, N, G, M, MO, D, O, H, Hq // H, NG, c / M, c / MO, NP=pow2(NG),
                                        MP=pow2(M), OP=pow2(O), GP=pow2(Hq // H))
    return out
