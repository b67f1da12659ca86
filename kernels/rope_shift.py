"""Keys re-rotated to new positions in one pass: the rag suite's composition of stored documents (kvbench/rag.py).

A stored document's keys carry RoPE at the positions it was prefilled at; placed at another offset each key is
rotated once more, k' = k cos + rotate_half(k) sin with the cos and sin of the shift (transformers' half-split
layout: channel c pairs with c + D/2). In PyTorch that is five kernels and float32 temporaries of the whole cache per
layer (k * cos, the rotated halves, addcmul, the cast): on an H200 the composition of 8 documents x 2K tokens of
Llama-3.1-8B took 14.5 ms of GPU time for about 1 GB of keys (benchmarks/records/rag-profile-h200-3835c8c.txt).
Here one Triton program per (batch, head, block of tokens) loads both halves of its rows once, rotates in float32 and
stores the model's dtype: the keys are read once and written once.

`rotate(k, cos, sin, out)` runs the kernel where it applies (a CUDA tensor, float32 cos/sin, half of head_dim a power
of two) and returns None otherwise, so the caller keeps its PyTorch path. It also runs in Triton's interpreter on the
CPU (the tests check it there against the PyTorch rotation).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    import kvbench.kernels.kivi  # noqa: F401  (importing it fixes Triton 3.6's interpreter for numpy >= 2.4)
    from kvbench.kernels.score_triton import interpreting
except ImportError:  # Triton is Linux-only: callers fall back to PyTorch
    triton = None

BLOCK_T = 32  # tokens per program: 32 x 64 float pairs in registers at head_dim 128

if triton is not None:

    @triton.jit
    def _rope_shift(src, dst, cos, sin, T, H, s_b, s_h, s_t, d_b, d_h, d_t, HALF: tl.constexpr,
                    BT: tl.constexpr):
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        c = tl.arange(0, HALF)
        live = t[:, None] < T
        at = src + b * s_b + h * s_h + t[:, None] * s_t + c[None, :]
        x1 = tl.load(at, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(at + HALF, mask=live, other=0.0).to(tl.float32)
        trig = t[:, None] * (2 * HALF) + c[None, :]  # cos/sin [T, 2 * HALF]: both halves equal, the first read
        co = tl.load(cos + trig, mask=live, other=0.0)
        si = tl.load(sin + trig, mask=live, other=0.0)
        to = dst + b * d_b + h * d_h + t[:, None] * d_t + c[None, :]
        tl.store(to, (x1 * co - x2 * si).to(dst.dtype.element_ty), mask=live)
        tl.store(to + HALF, (x2 * co + x1 * si).to(dst.dtype.element_ty), mask=live)


def applies(k: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether `rotate` runs the kernel for these keys [B, H, T, D] (else the caller's PyTorch path)."""
    half = k.shape[-1] // 2
    return (triton is not None and (k.is_cuda or interpreting()) and cos.dtype == torch.float32
            and k.shape[-1] % 2 == 0 and half & (half - 1) == 0 and half >= 16 and k.stride(-1) == 1)


def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None):
    """k [B, H, T, D] rotated by per-token cos/sin [T, D] (float32) into `out` (k's shape, last dim contiguous; a
    new tensor if None); None where the kernel does not apply."""
    if not applies(k, cos) or (out is not None and out.stride(-1) != 1):
        return None
    B, H, T, D = k.shape
    out = torch.empty_like(k) if out is None else out
    cos, sin = cos.contiguous(), sin.contiguous()
    grid = (triton.cdiv(T, BLOCK_T), B * H)
    _rope_shift[grid](k, out, cos, sin, T, H, *k.stride()[:3], *out.stride()[:3], HALF=D // 2, BT=BLOCK_T)
    return out
