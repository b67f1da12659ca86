"""Top-k selection on the device for the selecting methods (quest's pages, doublesparse's tokens): the set of the k
largest fp32 scores of each row, as indices in ascending order, in one Triton kernel that never syncs with the host.

Why not PyTorch: on an H200 at 32K x 8 (64 rows), quest's stable sort of 2,048 pages per row took 39 us and
doublesparse's torch.topk of 3,277 of 32,768 tokens 75 us, more than scoring and attending together. Here one program
per row runs an exact radix select on the scores' bits: 8 passes of 4-bit digits, each a 16-bin tl.histogram (a few
warp ballots per 32 elements) over the candidates still matching the digits found so far, the row held in registers
when it has at most ROW_MAX elements (else re-read per pass). That yields the k-th largest key T and how many of its
ties are needed; a last pass writes every index with a key above T and the lowest-index ties, in index order.

Ties: the lowest indices win, so the set is the first k of a stable descending sort (what quest's sort gave) and is
the same on every call; torch.topk (doublesparse's eager path before) broke ties its own way. k may be a device
tensor (a captured step's budget follows the live length): the output then has kmax columns, the first k valid and
the rest 0 (a slot that is always safe to read). The reference is `topk_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvbench.kernels.kivi import _fix_interpreter_for_numpy_2_4

_fix_interpreter_for_numpy_2_4()  # kivi's fix for Triton 3.6's interpreter under numpy >= 2.4 (idempotent)

ROW_MAX = 32768  # rows up to this long stay in registers across the passes (32 warps: 32 keys a thread)
CHUNK = 1024  # elements per step of the chunked passes (long rows, the output pass)
INT_MIN = tl.constexpr(-2147483648)  # jit code reads globals only as constexpr


def topk_ref(scores: torch.Tensor, k, kmax: int | None = None) -> torch.Tensor:
    """The reference: scores [..., N] fp32, k an int or an int tensor of one element -> int32 [..., kmax] (kmax = k
    if None): the indices of the k largest, lowest index first among equals, in ascending order; 0 past k."""
    k_int = int(k.reshape(-1)[0]) if isinstance(k, torch.Tensor) else int(k)
    kmax = k_int if kmax is None else kmax
    top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k_int].sort(-1).values
    out = torch.zeros(*scores.shape[:-1], kmax, dtype=torch.int32, device=scores.device)
    out[..., :k_int] = top.to(torch.int32)
    return out


@triton.jit
def _keys(x):
    """fp32 -> int32 bit patterns in unsigned order: the float order, -inf and +inf included."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, ~b, b ^ INT_MIN)


@triton.jit
def _load_keys(base, offs, N):
    """The keys of elements offs < N; 0 past N, below every float's key (-inf's is 0x007FFFFF), so with k <= N the
    threshold never comes near them."""
    return tl.where(offs < N, _keys(tl.load(base + offs, mask=offs < N, other=0.0)), 0)


@triton.jit
def _digit_hist(u, prefix, p: tl.constexpr):
    """The 16-bin histogram of digit p (bits 28 - 4p ..) of the keys u that match prefix on the digits before it."""
    digit = (u >> (28 - 4 * p)) & 15
    if p == 0:
        hist = tl.histogram(digit, 16)
    else:
        hist = tl.histogram(digit, 16, mask=((u ^ prefix) & -(1 << (32 - 4 * p))) == 0)
    return hist


@triton.jit(do_not_specialize=["k_arg", "N", "kmax"])  # k = N = 1 must not turn them into constants
def _topk_kernel(S, OUT, KPTR, k_arg, N, kmax, s_row, o_row, K_ON_DEVICE: tl.constexpr, BLOCK: tl.constexpr,
                 IN_REGS: tl.constexpr, CH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = S + row * s_row
    out = OUT + row * o_row
    k = k_arg
    if K_ON_DEVICE:
        k = tl.load(KPTR).to(tl.int32)
    k = tl.minimum(tl.maximum(k, 0), N)
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 16)
    if IN_REGS:
        u_row = _load_keys(base, offs, N)
    prefix = tl.zeros([], tl.int32)
    need = k  # how many of the keys matching prefix are still to be taken
    for p in tl.static_range(8):
        if IN_REGS:
            hist = _digit_hist(u_row, prefix, p)
        else:
            hist = tl.zeros([16], tl.int32)
            for start in range(0, N, BLOCK):
                hist += _digit_hist(_load_keys(base, start + offs, N), prefix, p)
        at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # keys with digit >= d
        d = tl.max(tl.where(at_least >= need, bins, 0), 0)
        need -= tl.sum(tl.where(bins > d, hist, 0), 0)
        prefix = prefix | (d << (28 - 4 * p))
    # prefix is the k-th largest key; take the keys above it and the first `need` equal to it, in index order
    t = prefix ^ INT_MIN  # signed: compares as the unsigned keys do
    c = tl.arange(0, CH)
    taken = tl.zeros([], tl.int32)
    ties = tl.zeros([], tl.int32)
    for start in range(0, N, CH):
        j = start + c
        s = _load_keys(base, j, N) ^ INT_MIN
        eq = (j < N) & (s == t)
        rank = ties + tl.cumsum(eq.to(tl.int32), 0)
        take = (j < N) & ((s > t) | (eq & (rank <= need)))
        pos = taken + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(out + pos, j, mask=take)
        taken += tl.sum(take.to(tl.int32), 0)
        ties += tl.sum(eq.to(tl.int32), 0)
    for start in range(k, kmax, CH):
        tl.store(out + start + c, tl.zeros([CH], tl.int32), mask=start + c < kmax)


def topk_select(scores: torch.Tensor, k, kmax: int | None = None) -> torch.Tensor:
    """topk_ref on the device: scores [..., N] fp32 (last dim contiguous), k an int or an int tensor [1] on the device
    (read there: no host sync) -> int32 [..., kmax] (kmax = k if None; required with a device k)."""
    *lead, N = scores.shape
    on_device = isinstance(k, torch.Tensor)
    assert kmax is not None or not on_device, "a device-side k needs kmax"
    kmax = int(k) if kmax is None else kmax
    rows = scores.reshape(-1, N) if scores.stride(-1) == 1 else scores.contiguous().reshape(-1, N)
    out = torch.empty(rows.shape[0], kmax, dtype=torch.int32, device=scores.device)
    if rows.shape[0] and N:
        block = max(128, triton.next_power_of_2(N)) if N <= ROW_MAX else CHUNK
        _topk_kernel[(rows.shape[0],)](
            rows, out, k if on_device else out, 0 if on_device else int(k), N, kmax, rows.stride(0), out.stride(0),
            K_ON_DEVICE=on_device, BLOCK=block, IN_REGS=N <= ROW_MAX, CH=CHUNK,
            num_warps=min(32, max(4, block // 1024)))
    elif kmax:
        out.zero_()
    return out.view(*lead, kmax)
