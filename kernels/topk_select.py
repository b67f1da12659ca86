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

Rows of more than SPLIT_MIN elements take the split path instead: one program per row leaves most SMs idle when
there are fewer rows than SMs (doublesparse at 32K x 1 has 8 rows: 130 us there, and 1 ms at 128K where the row is
re-read from L2 for each of the 8 passes). There each row is cut into SPLIT-element pieces, one program each, and the
select runs as 4 launches of 8-bit digits: every program re-derives the digits found so far from the row's global
histograms (256 ints a round, cheap) and adds its piece's histogram of the next digit with atomics. Two more launches
write the output in index order: one counts each piece's keys above the threshold and its ties, the next gives each
piece its offset from the counts of the pieces before it. No host sync, and the launch count is fixed (graph-safe).

With KVBENCH_TOPK=cuda (on CUDA, not under the Triton interpreter) both paths give way to csrc/topk_select.cu: one
launch, one block of 1024 threads per row, three radix rounds of 11-bit digits over shared-memory histograms and an
ordered pass that writes each index at its column (its docstring says why); the same set, in the same order. Opt-in
until it is timed on a GPU: its source passes the emulated tests (tests/test_topk_emulated.py) and compiles with nvcc,
but no device was lent the session that wrote it; benchmarks/topk_bench.py times all three paths and
tests/test_topk_select.py's GPU test checks both.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
import triton
import triton.language as tl

from kvbench.kernels.kivi import _fix_interpreter_for_numpy_2_4

_fix_interpreter_for_numpy_2_4()  # kivi's fix for Triton 3.6's interpreter under numpy >= 2.4 (idempotent)

ROW_MAX = 32768  # rows up to this long stay in registers across the passes (32 warps: 32 keys a thread)
CHUNK = 1024  # elements per step of the chunked passes (long rows, the output pass)
SPLIT = 4096  # elements per program on the split path
SPLIT_MIN = 8192  # rows longer than this take the split path
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
    """fp32 -> int32 bit patterns in unsigned order: the float order, -inf and +inf included, -0 equal to +0 (as the
    reference's sort has them)."""
    b = tl.where(x == 0.0, 0, x.to(tl.int32, bitcast=True))
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


@triton.jit
def _row_k(KPTR, k_arg, N, K_ON_DEVICE: tl.constexpr):
    k = k_arg
    if K_ON_DEVICE:
        k = tl.load(KPTR).to(tl.int32)
    return tl.minimum(tl.maximum(k, 0), N)


@triton.jit(do_not_specialize=["k_arg", "N", "kmax"])  # k = N = 1 must not turn them into constants
def _topk_kernel(S, OUT, KPTR, k_arg, N, kmax, s_row, o_row, K_ON_DEVICE: tl.constexpr, BLOCK: tl.constexpr,
                 IN_REGS: tl.constexpr, CH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = S + row * s_row
    out = OUT + row * o_row
    k = _row_k(KPTR, k_arg, N, K_ON_DEVICE)
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


@triton.jit
def _digits_so_far(row_hist, k, ROUNDS: tl.constexpr):
    """The 8-bit digits of the k-th largest key found by the first ROUNDS rounds (their histograms at row_hist, 256
    ints a round) as a prefix, and how many keys equal to it on those digits are still to be taken."""
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], tl.int32)
    need = k
    for p in tl.static_range(ROUNDS):
        hist = tl.load(row_hist + p * 256 + bins)
        at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        d = tl.max(tl.where(at_least >= need, bins, 0), 0)
        need -= tl.sum(tl.where(bins > d, hist, 0), 0)
        prefix = prefix | (d << (24 - 8 * p))
    return prefix, need


@triton.jit(do_not_specialize=["k_arg", "N"])
def _split_hist_kernel(S, H, KPTR, k_arg, N, s_row, ROUND: tl.constexpr, K_ON_DEVICE: tl.constexpr,
                       PIECE: tl.constexpr):
    """Round ROUND: the histogram of digit ROUND over this piece's keys that match the digits found before it."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * PIECE + tl.arange(0, PIECE)
    k = _row_k(KPTR, k_arg, N, K_ON_DEVICE)
    row_hist = H + row * 1024
    prefix, need = _digits_so_far(row_hist, k, ROUND)
    u = _load_keys(S + row * s_row, j, N)
    live = j < N
    if ROUND > 0:
        live = live & (((u ^ prefix) & -(1 << (32 - 8 * ROUND))) == 0)
    hist = tl.histogram((u >> (24 - 8 * ROUND)) & 255, 256, mask=live)
    tl.atomic_add(row_hist + ROUND * 256 + tl.arange(0, 256), hist, sem="relaxed")


@triton.jit(do_not_specialize=["k_arg", "N"])
def _split_count_kernel(S, H, C, KPTR, k_arg, N, s_row, n_pieces, K_ON_DEVICE: tl.constexpr, PIECE: tl.constexpr):
    """Per piece: how many keys lie above the threshold (the k-th largest key) and how many equal it."""
    row = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    j = piece * PIECE + tl.arange(0, PIECE)
    t, need = _digits_so_far(H + row * 1024, _row_k(KPTR, k_arg, N, K_ON_DEVICE), 4)
    s = _load_keys(S + row * s_row, j, N) ^ INT_MIN
    t = t ^ INT_MIN  # signed: compares as the unsigned keys do
    c = C + (row * n_pieces + piece) * 2
    tl.store(c, tl.sum(((j < N) & (s > t)).to(tl.int32), 0))
    tl.store(c + 1, tl.sum(((j < N) & (s == t)).to(tl.int32), 0))


@triton.jit(do_not_specialize=["k_arg", "N", "kmax"])
def _split_write_kernel(S, H, C, OUT, KPTR, k_arg, N, kmax, s_row, o_row, n_pieces, K_ON_DEVICE: tl.constexpr,
                        PIECE: tl.constexpr, PIECES: tl.constexpr):
    """Per piece: its keys above the threshold and its ties still needed (lowest index first), at the offset the
    pieces before it leave; the columns past k are zeroed, a share of them by each piece."""
    row = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    k = _row_k(KPTR, k_arg, N, K_ON_DEVICE)
    t, need = _digits_so_far(H + row * 1024, k, 4)
    t = t ^ INT_MIN
    before = tl.arange(0, PIECES)
    c = C + row * n_pieces * 2 + before * 2
    gt = tl.sum(tl.load(c, mask=before < piece, other=0), 0)
    ties = tl.sum(tl.load(c + 1, mask=before < piece, other=0), 0)
    taken = gt + tl.minimum(ties, need)
    j = piece * PIECE + tl.arange(0, PIECE)
    s = _load_keys(S + row * s_row, j, N) ^ INT_MIN
    eq = (j < N) & (s == t)
    take = (j < N) & ((s > t) | (eq & (ties + tl.cumsum(eq.to(tl.int32), 0) <= need)))
    out = OUT + row * o_row
    tl.store(out + taken + tl.cumsum(take.to(tl.int32), 0) - 1, j, mask=take)
    for start in range(k + piece * PIECE, kmax, n_pieces * PIECE):
        cols = start + tl.arange(0, PIECE)
        tl.store(out + cols, tl.zeros([PIECE], tl.int32), mask=cols < kmax)


def _split_select(rows, out, k, on_device: bool, N: int, kmax: int):
    """The split path of topk_select (module docstring) over rows [R, N] into out [R, kmax]."""
    n_pieces = triton.cdiv(N, SPLIT)
    hist = torch.zeros(rows.shape[0], 4, 256, dtype=torch.int32, device=rows.device)
    counts = torch.empty(rows.shape[0], n_pieces, 2, dtype=torch.int32, device=rows.device)
    kptr, k_arg = (k, 0) if on_device else (out, int(k))
    grid = (rows.shape[0], n_pieces)
    warps = max(4, min(16, SPLIT // 512))
    for r in range(4):
        _split_hist_kernel[grid](rows, hist, kptr, k_arg, N, rows.stride(0), ROUND=r, K_ON_DEVICE=on_device,
                                 PIECE=SPLIT, num_warps=warps)
    _split_count_kernel[grid](rows, hist, counts, kptr, k_arg, N, rows.stride(0), n_pieces, K_ON_DEVICE=on_device,
                              PIECE=SPLIT, num_warps=warps)
    _split_write_kernel[grid](rows, hist, counts, out, kptr, k_arg, N, kmax, rows.stride(0), out.stride(0), n_pieces,
                              K_ON_DEVICE=on_device, PIECE=SPLIT, PIECES=max(2, triton.next_power_of_2(n_pieces)),
                              num_warps=warps)


class CudaParams(ctypes.Structure):
    """csrc/topk_select.cu's topk::Params, field for field."""

    _fields_ = ([(n, ctypes.c_void_p) for n in ("scores", "out", "k_dev")] + [(n, ctypes.c_int64) for n in ("s_row",
                "o_row")] + [(n, ctypes.c_int) for n in ("R", "N", "kmax", "k_host", "k_is_64")])


@functools.cache
def cuda_lib() -> ctypes.CDLL:
    """csrc/topk_select.cu as a shared library (jit.shared_lib)."""
    from kvbench.kernels import jit

    lib = jit.shared_lib("topk_select.cu")
    lib.topk_select.argtypes = [ctypes.POINTER(CudaParams), ctypes.c_void_p]
    lib.topk_error_string.restype = ctypes.c_char_p
    return lib


def use_cuda(device: torch.device) -> bool:
    """Whether topk_select runs csrc/topk_select.cu for scores on `device`: asked for (KVBENCH_TOPK=cuda), a GPU, not
    under the Triton interpreter."""
    from kvbench.errors import KVBenchError

    path = os.environ.get("KVBENCH_TOPK", "triton")
    if path not in ("cuda", "triton"):
        raise KVBenchError(f"KVBENCH_TOPK={path!r}: use 'cuda' (csrc/topk_select.cu) or 'triton' (the default)")
    return (torch.device(device).type == "cuda" and path == "cuda"
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


def backend(device: torch.device) -> str:
    """The path topk_select takes on `device`, for records: "cuda" or "triton"."""
    return "cuda" if use_cuda(device) else "triton"


def _cuda_select(rows: torch.Tensor, out: torch.Tensor, k, on_device: bool, lib=None) -> None:
    """csrc/topk_select.cu over rows [R, N] (last dim contiguous) into out [R, kmax] on the current stream; `lib`: the
    library to call (the CPU emulation in tests), by default the nvcc build."""
    from kvbench.errors import KVBenchError

    lib = lib or cuda_lib()
    if on_device and k.dtype not in (torch.int32, torch.int64):
        raise KVBenchError(f"topk_select: a device-side k must be int32 or int64, not {k.dtype}")
    p = CudaParams(rows.data_ptr(), out.data_ptr(), k.data_ptr() if on_device else None, rows.stride(0),
                   out.stride(0), rows.shape[0], rows.shape[1], out.shape[1], 0 if on_device else int(k),
                   int(on_device and k.dtype == torch.int64))
    stream = torch.cuda.current_stream(rows.device).cuda_stream if rows.is_cuda else None
    err = lib.topk_select(ctypes.byref(p), stream)
    if err:
        raise KVBenchError(f"topk_select CUDA kernel: {lib.topk_error_string(err).decode()}")


def topk_select(scores: torch.Tensor, k, kmax: int | None = None) -> torch.Tensor:
    """topk_ref on the device: scores [..., N] fp32 (last dim contiguous), k an int or an int tensor [1] on the device
    (read there: no host sync) -> int32 [..., kmax] (kmax = k if None; required with a device k)."""
    *lead, N = scores.shape
    on_device = isinstance(k, torch.Tensor)
    assert kmax is not None or not on_device, "a device-side k needs kmax"
    kmax = int(k) if kmax is None else kmax
    rows = scores.reshape(-1, N) if scores.stride(-1) == 1 else scores.contiguous().reshape(-1, N)
    out = torch.empty(rows.shape[0], kmax, dtype=torch.int32, device=scores.device)
    if rows.shape[0] and N and use_cuda(scores.device):
        _cuda_select(rows, out, k, on_device)
    elif rows.shape[0] and N > SPLIT_MIN:
        _split_select(rows, out, k, on_device, N, kmax)
    elif rows.shape[0] and N:
        block = max(128, triton.next_power_of_2(N)) if N <= ROW_MAX else CHUNK
        _topk_kernel[(rows.shape[0],)](
            rows, out, k if on_device else out, 0 if on_device else int(k), N, kmax, rows.stride(0), out.stride(0),
            K_ON_DEVICE=on_device, BLOCK=block, IN_REGS=N <= ROW_MAX, CH=CHUNK,
            num_warps=min(32, max(4, block // 1024)))
    elif kmax:
        out.zero_()
    return out.view(*lead, kmax)
