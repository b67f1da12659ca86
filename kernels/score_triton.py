"""Triton scoring kernels of the methods that select tokens every decode step: quest's page bounds (`quest_bounds`),
doublesparse's label scores (`label_scores`); qjl's estimator lives with its attention in kernels/qjl_attend.py.

Each decode step of these methods reads a small summary of every token (quest: a page's min and max key; doublesparse:
16 of 128 key channels), so the summary read is what their scoring costs; the kernels read each summary row once, in
one pass over the tokens, and write one fp32 score per row and KV head. Both kernels also build the query side (the
group's positive and negative parts; the quantized query label) in every program: in PyTorch those were a dozen tiny
launches per step, more time than the summary read (doublesparse's score stage took 57 us at 32K x 8 on an
H200 for 25 MB). Selection is kernels/topk_select.py, the attention over the picks kernels/select_attend.py.

Why Triton: its interpreter (TRITON_INTERPRET=1) runs these very kernels on the CPU, so CI checks them against the
PyTorch references in the method files; the GPU tests check the same code at real shapes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kvbench.api import KVBenchError
from kvbench.kernels.kivi import _fix_interpreter_for_numpy_2_4

_fix_interpreter_for_numpy_2_4()  # kivi's fix for Triton 3.6's interpreter under numpy >= 2.4 (idempotent)


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
def _group_query(Q, b, h, sq_b, sq_h, G, cols, GP: tl.constexpr):
    """This KV head's query heads at the channels cols: [GP, len(cols)] fp32, rows past G zero."""
    g = tl.arange(0, GP)
    ptr = Q + b * sq_b + (h * G + g)[:, None] * sq_h + cols[None, :]
    return tl.load(ptr, mask=(g < G)[:, None] & (cols >= 0)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _quest_kernel(Q, META, SEEN, seen_n, OUT, P, G, H, page, sq_b, sq_h, sm_b, sm_h, sm_p, D: tl.constexpr,
                  DP: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, MASK: tl.constexpr,
                  SEEN_ON_DEVICE: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, DP)
    q = _group_query(Q, b, h, sq_b, sq_h, G, tl.where(d < D, d, -1), GP)
    w_max, w_min = tl.sum(tl.maximum(q, 0.0), 0), tl.sum(tl.minimum(q, 0.0), 0)  # max(q M, q m), summed over heads
    ok = (rows < P)[:, None] & (d < D)[None, :]
    base = META + b.to(tl.int64) * sm_b + h * sm_h + rows[:, None] * sm_p + d[None, :]
    hi = tl.load(base, mask=ok, other=0.0).to(tl.float32)
    lo = tl.load(base + D, mask=ok, other=0.0).to(tl.float32)
    bound = tl.sum(hi * w_max[None, :] + lo * w_min[None, :], 1)
    if MASK:  # pages past the newest are not live (a captured step's buffer), the newest is always attended
        if SEEN_ON_DEVICE:
            seen_n = tl.load(SEEN)
        newest = (seen_n - 1) // page
        bound = tl.where(rows > newest, float("-inf"), tl.where(rows == newest, float("inf"), bound))
    tl.store(OUT + bh * P + rows, bound, mask=rows < P)


def quest_bounds(q1: torch.Tensor, meta: torch.Tensor, pages: int, seen: torch.Tensor | int | None = None,
                 page: int = 1) -> torch.Tensor:
    """quest's page bounds (methods/quest.py page_bounds_ref) with the query side computed in the kernel: q1
    [B, Hq, D], meta [B, Hkv, >= pages, 2D] (max then min; last dim contiguous) -> [B, Hkv, pages] fp32. With seen
    (the tokens held: an int, or int32 [B] on the device) pages past the newest token's are -inf and its page +inf."""
    B, Hq, D = q1.shape
    H = meta.shape[1]
    assert meta.stride(3) == 1 and meta.shape[3] == 2 * D and q1.stride(2) == 1
    out = torch.empty(B, H, pages, dtype=torch.float32, device=q1.device)
    DP = triton.next_power_of_2(D)
    block = max(16, min(128, 4096 // DP))  # 64 rows of 128 channels took 255 registers a thread at 4 warps
    if pages:
        _quest_kernel[(B * H, triton.cdiv(pages, block))](
            q1, meta, seen if isinstance(seen, torch.Tensor) else out, seen if isinstance(seen, int) else 0, out,
            pages, Hq // H, H, page, q1.stride(0), q1.stride(1),
            meta.stride(0), meta.stride(1), meta.stride(2), D=D, DP=DP, GP=triton.next_power_of_2(Hq // H),
            BLOCK=block, MASK=seen is not None, SEEN_ON_DEVICE=isinstance(seen, torch.Tensor))
    return out


_INTERPRETED = tl.constexpr(interpreting())  # read once at import, as Triton reads TRITON_INTERPRET


@triton.jit
def _dequantized(x, BITS: tl.constexpr, lo, hi):
    """doublesparse's pseudo_quantize then dequantize of rows of x with their min lo and max hi [GP] (the authors'
    min-max to 2^BITS - 1 levels), rounded exactly as torch rounds it: IEEE divisions (Triton's fp32 `/` is
    approximate on the GPU), torch's `top / span` as it computes it (a reciprocal times top) and rint (half to even,
    as torch.round). A query code flipped at a rounding boundary moved a score by a whole step: the H200 parity
    failures of 20c760f (bf16 queries land on exact halves often)."""
    top: tl.constexpr = (1 << BITS) - 1.0
    span = tl.where(hi > lo, hi - lo, 1.0)
    scale = tl.math.div_rn(tl.full(span.shape, 1.0, tl.float32), span) * top  # torch's top / span: 1 / span * top
    y = (x - lo[:, None]) * scale[:, None]
    if _INTERPRETED:  # Triton's interpreter has no libdevice; numpy neither contracts nor approximates
        r = tl.floor(y + 0.5)  # differs from half to even only on exact halves
    else:
        r = libdevice.rint(y)
    codes = tl.minimum(tl.maximum(r, 0.0), top)
    return codes * tl.math.div_rn(span, tl.full(span.shape, top, tl.float32))[:, None] + lo[:, None]


@triton.jit
def _label_kernel(Q, CH, X, META, SEEN, OUT, N, G, H, sq_b, sq_h, sc_b, sc_h, sx_b, sx_h, sx_n, sm_b, sm_h, sm_n,
                  C: tl.constexpr, CP: tl.constexpr, GP: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr,
                  MASK: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    c = tl.arange(0, CP)
    cm = c < C
    ch = CH + b * sc_b + h * sc_h
    # the query's label: x0 at the stored columns (at 4 bits the low nibbles: channels 2c), x1 the high nibbles
    if BITS == 4:
        x0 = _group_query(Q, b, h, sq_b, sq_h, G, tl.load(ch + 2 * c, mask=cm, other=-1).to(tl.int32), GP)
        x1 = _group_query(Q, b, h, sq_b, sq_h, G, tl.load(ch + 2 * c + 1, mask=cm, other=-1).to(tl.int32), GP)
    else:
        x0 = _group_query(Q, b, h, sq_b, sq_h, G, tl.load(ch + c, mask=cm, other=-1).to(tl.int32), GP)
        x1 = tl.zeros([GP, CP], tl.float32)
    if BITS < 16:  # quantized per query head as the keys' labels are
        big = float("inf")
        lo = tl.min(tl.where(cm[None, :], x0, big), 1)
        hi = tl.max(tl.where(cm[None, :], x0, -big), 1)
        if BITS == 4:
            lo = tl.minimum(lo, tl.min(tl.where(cm[None, :], x1, big), 1))
            hi = tl.maximum(hi, tl.max(tl.where(cm[None, :], x1, -big), 1))
            x1 = _dequantized(x1, BITS, lo, hi)
        x0 = _dequantized(x0, BITS, lo, hi)
    gm = (tl.arange(0, GP) < G)[:, None] & cm[None, :]
    w0, w1 = tl.sum(tl.where(gm, x0, 0.0), 0), tl.sum(tl.where(gm, x1, 0.0), 0)  # [CP], summed over query heads
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    x = tl.load(X + b.to(tl.int64) * sx_b + h * sx_h + rows[:, None] * sx_n + c[None, :],
                mask=ok[:, None] & cm[None, :], other=0)
    if BITS == 4:
        byte = x.to(tl.int32)
        dots = tl.sum((byte & 15).to(tl.float32) * w0[None, :] + (byte >> 4).to(tl.float32) * w1[None, :], 1)
    else:
        dots = tl.sum(x.to(tl.float32) * w0[None, :], 1)
    if BITS < 16:  # codes: label = code * step + minimum per row, so label.w = step (code.w) + minimum sum(w)
        meta = META + b.to(tl.int64) * sm_b + h * sm_h + rows * sm_n
        row_step = tl.load(meta, mask=ok, other=0.0).to(tl.float32)
        row_min = tl.load(meta + 1, mask=ok, other=0.0).to(tl.float32)
        dots = dots * row_step + row_min * (tl.sum(w0, 0) + tl.sum(w1, 0))
    if MASK:  # the captured step: rows past the live tokens are not candidates
        dots = tl.where(rows < tl.load(SEEN), dots, float("-inf"))
    tl.store(OUT + bh * N + rows, dots, mask=ok)


def label_scores(q1: torch.Tensor, channels: torch.Tensor, labels: torch.Tensor, meta: torch.Tensor | None, bits: int,
                 n: int, seen: torch.Tensor | None = None) -> torch.Tensor:
    """doublesparse's label scores (methods/doublesparse.py label_scores_ref) with the query's label built in the
    kernel: q1 [B, Hq, D], channels [B, Hkv, r], labels [B, Hkv, >= n, r] in the model dtype (bits 16) or uint8
    codes (packed two a byte at 4 bits) with meta [B, Hkv, >= n, 2] (step, minimum) -> [B, Hkv, n] fp32. With seen
    (int32 [B] on the device) rows >= seen[0] are -inf."""
    B, Hq, _ = q1.shape
    H, C = labels.shape[1], labels.shape[3]
    assert labels.stride(3) == 1 and q1.stride(2) == 1 and channels.stride(2) == 1
    out = torch.empty(B, H, n, dtype=torch.float32, device=q1.device)
    m = labels if meta is None else meta
    CP = triton.next_power_of_2(C)
    block = max(64, min(1024, 8192 // CP))  # 16-channel labels: 1,024 rows a program (small ones are latency-bound)
    if n:
        _label_kernel[(B * H, triton.cdiv(n, block))](
            q1, channels, labels, m, out if seen is None else seen, out, n, Hq // H, H, q1.stride(0), q1.stride(1),
            channels.stride(0), channels.stride(1), labels.stride(0), labels.stride(1), labels.stride(2), m.stride(0),
            m.stride(1), m.stride(2), C=C, CP=CP, GP=triton.next_power_of_2(Hq // H), BITS=bits, BLOCK=block,
            MASK=seen is not None)
    return out
