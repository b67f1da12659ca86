"""What the split-KV (flash-decoding) decode kernels share: each program attends to one part of the tokens with an
online softmax in base 2 and writes its normalised partial output and log2-sum-exp2; a combine step (dense_decode's
`_combine_kernel`, or the last program of a head) merges the parts by their lse
(https://crfm.stanford.edu/2023/10/12/flashdecoding.html). Used by dense_decode, select_attend, qjl_attend, kivi and
selfindex_attend."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is Linux-only: the PyTorch paths need none of this
    triton = None

if triton is not None:

    @triton.jit
    def store_partial(OP, LSE, rows, acc, l_i, m_i, cols, width, live):
        """One part's result for its query rows `rows` [M] (flat indices of head x part): acc / l_i into
        OP[rows, cols] (row stride `width`) and m_i + log2(l_i) into LSE[rows], where `live` [M]. A part that saw
        no token (l_i = 0) writes zeros and lse -inf, so it weighs nothing in the merge."""
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(OP + rows[:, None] * width + cols[None, :], out, mask=live[:, None])
        tl.store(LSE + rows, lse, mask=live)
