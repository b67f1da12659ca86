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
                ("qk_scale", F32), ("mode", I32)]


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
               B, H, Hq // H, F, kv.cap, n_sel, split, n_parts, 1.4426950408889634 / math.sqrt(D), mode)
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
