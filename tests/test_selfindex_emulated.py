"""csrc/selfindex.cu's attend_kernel (the 2+1 sparse decode attention, opt-in: KVBENCH_SELFINDEX_ATTEND=cuda) run on
the CPU from its own source: the section between its markers is compiled as host C++ against tests/selfindex_emu.h,
which emulates the CUDA it uses (threads, shared memory, shuffles, mma.sync fragments, fp16), and called through
ctypes on the reference path's storage. It checks the kernel's lane arithmetic (which lane dequantizes which pairs
into which fragment, the bit tricks, the softmax and both merges) where no GPU is; the GPU parity test
(test_selfindex_kernels.py: test_attend_paths_match_reference) checks the rest."""

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from kvbench import LayerSpec, parse_method
from kvbench.kernels import selfindex_attend as sa
from oracles import rand_kv

CSRC = Path(sa.__file__).resolve().parent / "csrc"
HERE = Path(__file__).resolve().parent


def host_source() -> str:
    """The attend section of selfindex.cu with its one PTX function left to the emulator, plus what it needs."""
    src, hdr = (CSRC / "selfindex.cu").read_text(), (CSRC / "selfindex.h").read_text()
    body = src[src.index("constexpr int kAttWarps"):src.index("// dispatch on dtype and head_dim")]
    m0 = body.index("__device__ __forceinline__ void mma_rows8(")
    m1 = body.index("}\n", body.index('asm("mma.sync', m0)) + 2
    body = body[:m0] + body[m1:]
    c0 = body.index("template <int D>\n__device__ __forceinline__ void cp_async_chunk(")  # cp.async: emulated too
    c1 = body.index("\n", body.index("void cp_async_wait()")) + 1
    body = body[:c0] + body[c1:]
    vec = src[src.index("template <typename T> struct Vec;"):src.index("// 4 consecutive elements")]
    params = hdr[hdr.index("constexpr int kAttMaxGroup"):hdr.index("cudaError_t pack(")]
    return f"""#include "selfindex_emu.h"
namespace si {{
constexpr unsigned kFull = 0xffffffffu;
constexpr int kCounters = {hdr.split("kCounters = ")[1].split(";")[0]};
{params}{vec}{body}
}}  // namespace si
template <typename T, int D> static void run(const si::AttendParams* p) {{
  if (p->mode == 1) emu_launch<T, D>(*p, p->n_parts, p->B * p->H, si::attend_kernel<T, D, true>);
  else emu_launch<T, D>(*p, p->n_parts, p->B * p->H, si::attend_kernel<T, D, false>);
}}
extern "C" void run_attend(const si::AttendParams* p, int bf16, int D) {{
  if (bf16) D == 128 ? run<__nv_bfloat16, 128>(p) : run<__nv_bfloat16, 64>(p);
  else D == 128 ? run<__half, 128>(p) : run<__half, 64>(p);
}}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the host emulation")
    d = tmp_path_factory.mktemp("selfindex_emu")
    (d / "emu.cpp").write_text(host_source())
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{HERE}", "-o",
                        str(d / "emu.so"), str(d / "emu.cpp")], capture_output=True, text=True)
    if r.returncode and "_Float16" in r.stderr:
        pytest.skip("this compiler has no _Float16")
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(d / "emu.so"))


V, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class Params(ctypes.Structure):  # csrc/selfindex.h: AttendParams
    _fields_ = [("q", V), ("q_sb", I64), ("q_sh", I64), ("fk", V), ("fv", V), ("fpos", V), ("idx", V), ("kmax", I32),
                ("signs", V), ("kmag", V), ("kscale", V), ("vq", V), ("vscale", V), ("chmax", V), ("mu", V),
                ("part_o", V), ("part_lse", V), ("out", V), ("ctr", V), ("nsel", V), ("B", I32), ("H", I32),
                ("group", I32), ("F", I32), ("cap", I32), ("n_sel", I32), ("split", I32), ("n_parts", I32),
                ("qk_scale", F32), ("mode", I32), ("row", I64)]


def emulated_attend(lib, q, kv, idx, split=None, nsel=None, mode=1):
    """What selfindex_attend.attend does on the CUDA path, with the kernel run by the emulator."""
    B, Hq, D = q.shape
    H, F = kv.fk.shape[1], kv.fk.shape[2]
    n_sel = idx.shape[2]
    split, n_parts = sa.plan(n_sel, B * H, torch.device("cpu"), split, cuda=True)
    part_o = torch.full((B * Hq * n_parts, D), float("nan"))  # nothing unwritten may be read
    part_lse = torch.full((B * Hq * n_parts,), float("nan"))
    out = torch.empty(B, Hq, D, dtype=q.dtype)
    ctr = torch.zeros(B * H * 8, dtype=torch.int32)
    idx = idx.int().contiguous() if n_sel else torch.zeros(B, H, 1, dtype=torch.int32)
    p = Params(q.data_ptr(), q.stride(0), q.stride(1), kv.fk.data_ptr(), kv.fv.data_ptr(), kv.fpos.data_ptr(),
               idx.data_ptr(), idx.shape[2], kv.signs.data_ptr(), kv.kmag.data_ptr(), kv.kscale.data_ptr(),
               kv.vq.data_ptr(), kv.vscale.data_ptr(), kv.chmax.data_ptr(), kv.mu.data_ptr(), part_o.data_ptr(),
               part_lse.data_ptr(), out.data_ptr(), ctr.data_ptr(), None if nsel is None else nsel.data_ptr(),
               B, H, Hq // H, F, kv.cap, n_sel, split, n_parts, 1.4426950408889634 / math.sqrt(D), mode,
               kv.kmag.stride(2))
    lib.run_attend(ctypes.byref(p), int(q.dtype == torch.bfloat16), D)
    assert not ctr.any(), "the last part of each (b, h) resets its counter"
    return out


@pytest.mark.parametrize("shape,dtype", [((1, 8, 8, 64, 333), torch.bfloat16), ((3, 8, 2, 64, 500), torch.float16),
                                         ((2, 32, 8, 128, 700), torch.bfloat16), ((2, 8, 1, 128, 401), torch.float16)])
@pytest.mark.parametrize("mode", [0, 1], ids=["registers", "cp.async"])
def test_attend_kernel_source_matches_reference(emulator, shape, dtype, mode):
    torch.manual_seed(0)
    B, Hq, H, D, T = shape
    lay = parse_method("selfindex:budget=0.3,sinks=8,window=8,impl=torch").make_layer(
        LayerSpec(0, 1, Hq, H, D, dtype, torch.device("cpu")))
    k, v = rand_kv(B, H, T, D, dtype)
    lay.prefill(torch.randn(B, Hq, 1, D).to(dtype), k, v)
    for _ in range(9):  # past the window: appended tokens leave it quantized
        lay.extend(torch.randn(B, Hq, 1, D).to(dtype), *rand_kv(B, H, 1, D, dtype))
    lo, hi = lay.selectable()
    q = torch.randn(B, Hq, D).to(dtype)
    for K in (0, min(hi - lo, 300)):  # nothing selected; a partial last tile and several parts
        idx = torch.stack([torch.stack([torch.randperm(hi - lo)[:K] + lo for _ in range(H)]) for _ in range(B)])
        want = lay._attend(q, idx).float()
        for split in (None, 64):
            torch.testing.assert_close(emulated_attend(emulator, q, lay.kv, idx, split, mode=mode).float(), want,
                                       rtol=2e-2, atol=2e-2)
        buf = torch.zeros(B, H, K + 100, dtype=torch.int32)  # planned: K live of a larger buffer
        buf[:, :, :K] = idx
        got = emulated_attend(emulator, q, lay.kv, buf, nsel=torch.tensor([K], dtype=torch.int32), mode=mode)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------------------------
# score and select: select_kernel (one launch, its blocks waiting on each other: the emulator runs the whole grid at
# once) and the three-kernel path (score, count, place: one block at a time), from their own source


def select_source() -> str:
    src, hdr = (CSRC / "selfindex.cu").read_text(), (CSRC / "selfindex.h").read_text()
    body = src[src.index("constexpr int kSelThreads"):src.index("// sparse decode attention (2+1)")]
    c0 = src.index("inline void chunk_grid(")
    grid = src[c0:src.index("\n}\n", c0) + 3]
    vec = src[src.index("template <typename T> struct Vec;"):src.index("// 4 consecutive elements")]
    params = hdr[hdr.index("constexpr int kNBins"):hdr.index("cudaError_t pack(")]
    return f"""#include "selfindex_emu.h"
namespace si {{
constexpr unsigned kFull = 0xffffffffu;
{params}{vec}{body}{grid}
}}  // namespace si
template <typename T, int D> static void run(si::SelectParams p, int nblocks) {{
  si::chunk_grid(p, nblocks);
  if (p.launches == 1) {{
    emu_grid(p, si::select_kernel<T, D>, nblocks, p.H, p.B, si::kSelThreads, true);
  }} else {{
    emu_grid(p, si::score_kernel<T, D>, nblocks, p.H, p.B, si::kSelThreads, false);
    emu_grid(p, si::count_kernel, nblocks, p.H, p.B, si::kSelThreads, false);
    emu_grid(p, si::place_kernel, nblocks, p.H, p.B, si::kSelThreads, false);
  }}
}}
extern "C" void run_select(const si::SelectParams* p, int nblocks, int bf16, int D) {{
  if (bf16) D == 128 ? run<__nv_bfloat16, 128>(*p, nblocks) : run<__nv_bfloat16, 64>(*p, nblocks);
  else D == 128 ? run<__half, 128>(*p, nblocks) : run<__half, 64>(*p, nblocks);
}}
"""


@pytest.fixture(scope="module")
def select_emulator(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the host emulation")
    d = tmp_path_factory.mktemp("selfindex_select_emu")
    (d / "emu.cpp").write_text(select_source())
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{HERE}", "-o",
                        str(d / "emu.so"), str(d / "emu.cpp")], capture_output=True, text=True)
    if r.returncode and "_Float16" in r.stderr:
        pytest.skip("this compiler has no _Float16")
    assert r.returncode == 0, r.stderr[-3000:]
    return ctypes.CDLL(str(d / "emu.so"))


class SelectParams(ctypes.Structure):  # csrc/selfindex.h: SelectParams
    _fields_ = [("q", V), ("q_sb", I64), ("q_sh", I64), ("cb", V), ("signs", V), ("excl", V), ("excl_stride", I32),
                ("B", I32), ("H", I32), ("group", I32), ("cap", I32), ("lo", I32), ("hi", I32), ("k", I32),
                ("chunk", I32), ("bins", V), ("bstride", I32), ("hist", V), ("ctr", V), ("idx", V), ("kmax", I32),
                ("counts", V), ("plan", V), ("launches", I32)]


class SelectWorkspace:
    """kernels/selfindex.py's Workspace for one (B, H, cap) on the CPU; bins start as garbage (never read unwritten)."""

    def __init__(self, bh: int, cap: int):
        self.bstride = -(-cap // 8) * 8
        self.bins = torch.randint(0, 2**15, (bh * self.bstride,), dtype=torch.int16)
        self.hist = torch.zeros(bh * 2048, dtype=torch.int32)
        self.ctr = torch.zeros(bh * 8, dtype=torch.int32)
        self.counts = torch.randint(0, 2**30, (bh * 1024 * 2,), dtype=torch.int32)  # each block zeroes its own

    def clean(self) -> bool:
        """The histogram and the counters that must be zero between calls (1-3 hold the last threshold)."""
        return not self.hist.any() and not self.ctr.view(-1, 8)[:, [0, 4, 5, 6, 7]].any()


def emulated_select(lib, kv, q, lo, hi, K, ws, launches, nblocks, plan=None):
    """What IndexedKV.select does on the CUDA path, the kernels run by the emulator: idx [B, H, K] int32."""
    B, H = kv.signs.shape[:2]
    idx = torch.full((B, H, max(K, 1)), -7, dtype=torch.int32)
    excl = kv.excl
    p = SelectParams(q.data_ptr(), q.stride(0), q.stride(1), kv.cb.data_ptr(), kv.signs.data_ptr(),
                     None if excl is None else excl.data_ptr(), 0 if excl is None else excl.shape[2], B, H,
                     q.shape[1] // H, kv.cap, lo, hi, K, 0, ws.bins.data_ptr(), ws.bstride, ws.hist.data_ptr(),
                     ws.ctr.data_ptr(), idx.data_ptr(), idx.shape[2], ws.counts.data_ptr(),
                     None if plan is None else plan.data_ptr(), launches)
    lib.run_select(ctypes.byref(p), nblocks, int(q.dtype == torch.bfloat16), q.shape[2])
    return idx


@pytest.mark.parametrize("shape,dtype", [((1, 8, 2, 128, 3001), torch.bfloat16), ((2, 2, 1, 64, 1111), torch.float16),
                                         ((1, 8, 8, 64, 777), torch.bfloat16)])
@pytest.mark.parametrize("fixed", ["sinks", "scored"])
def test_select_kernels_source_match_reference(select_emulator, shape, dtype, fixed):
    """Both select paths pick a valid top-K of the reference's bins, the same list, in the documented order, leave
    the workspace clean, and do it again on a second call; a planned call (hi and k from the device plan) too."""
    from test_selfindex_kernels import valid_topk
    from kvbench.kernels import selfindex as ops

    torch.manual_seed(6)
    B, Hq, H, D, T = shape
    lay = parse_method(f"selfindex:budget=0.1,fixed={fixed},impl=torch").make_layer(
        LayerSpec(0, 1, Hq, H, D, dtype, torch.device("cpu")))
    k, v = rand_kv(B, H, T, D, dtype)
    lay.prefill(torch.randn(B, Hq, 1, D).to(dtype), k, v)
    kv, (lo, hi), K = lay.kv, lay.selectable(), lay.n_select()
    q = torch.randn(B, Hq, D).to(dtype)
    ws = SelectWorkspace(B * H, kv.cap)
    nblocks = 3  # chunks per (b, h): the look-back crosses two of them; every emulated thread is an OS thread
    got = {}
    for launches in (1, 3):
        first = emulated_select(select_emulator, kv, q, lo, hi, K, ws, launches, nblocks)
        assert ws.clean(), "histogram and counters are zero between calls"
        assert torch.equal(first, emulated_select(select_emulator, kv, q, lo, hi, K, ws, launches, nblocks))
        got[launches] = first
    assert torch.equal(got[1], got[3])
    qm = q.float().reshape(B, H, Hq // H, D).mean(2)
    excluded = ops.unpack_bits(kv.excl)[:, :, lo:hi] if kv.excl is not None else None
    bins = ops.score_bins_ref(ops.lut8_ref(qm, kv.cb), kv.signs[:, :, lo:hi], excluded)
    for b in range(B):
        for h in range(H):
            valid_topk(got[1][b, h] - lo, bins[b, h], K)
    assert ((got[1][..., 1:] < got[1][..., :-1]).sum(-1) <= 1).all()  # above the threshold bin, then from it
    # planned: a shorter range and fewer picks from the device plan than the grid was sized for, then none at all
    for hi2, k2 in ((hi - 13, K - 5), (hi - 13, 0)):
        plan = torch.tensor([0, 0, -1, hi2, k2, 0, 0, 0], dtype=torch.int32)
        want = emulated_select(select_emulator, kv, q, lo, hi2, k2, ws, 3, nblocks) if k2 else None
        for launches in (1, 3):
            idx = emulated_select(select_emulator, kv, q, lo, hi, K, ws, launches, nblocks, plan)
            assert ws.clean()
            if k2:
                assert torch.equal(idx[..., :k2], want[..., :k2])
            else:
                assert (idx == -7).all()
