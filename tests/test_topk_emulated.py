"""csrc/topk_select.cu (the exact top-k of the selecting methods on CUDA) run on the CPU from its own source: compiled
as host C++ with KVBENCH_EMU against tests/topk_emu.h (threads, barriers, shuffles, __match_any_sync, shared atomics)
and called through ctypes with the very Params struct kernels/topk_select.py fills, against topk_ref: ties to the
lower index (-0 equal to +0), infinities, k from the host and from a device int32 or int64, k = 0, k = N, k past N, kmax past k, rows
at a stride, lengths that are not a multiple of the block. Blocks of 64 and 128 threads (the GPU build runs 1024), so
each thread owns 32 or 16 histogram bins and a row spans many tiles. The GPU parity test (test_topk_select.py) checks
the nvcc build."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from kvbench.kernels import topk_select as ts

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent / "kernels" / "csrc"

WRAPPER = """#include "topk_select.cu"
extern "C" int topk_select(const topk::Params* p, void*) {
  if (EMU_THREADS == 64) emu_grid(*p, topk::topk_kernel<64>, p->R, 1, 1, 64, false);
  else emu_grid(*p, topk::topk_kernel<128>, p->R, 1, 1, 128, false);
  return 0;
}
extern "C" const char* topk_error_string(int) { return "emulated"; }
"""


@pytest.fixture(scope="module", params=[64, 128])
def emulator(request, tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the host emulation")
    out = tmp_path_factory.mktemp(f"topk_emu{request.param}")
    (out / "emu.cpp").write_text(WRAPPER)
    so = out / "topk_emu.so"
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-DKVBENCH_EMU",
                        f"-DEMU_THREADS={request.param}", f"-I{HERE}", f"-I{CSRC}", "-o", str(so), str(out / "emu.cpp")],
                       capture_output=True, text=True)
    if r.returncode and "_Float16" in r.stderr:
        pytest.skip("this compiler has no _Float16")
    assert r.returncode == 0, r.stderr[-3000:]
    lib = ctypes.CDLL(str(so))
    lib.topk_select.argtypes = [ctypes.POINTER(ts.CudaParams), ctypes.c_void_p]
    lib.topk_error_string.restype = ctypes.c_char_p
    return lib


def run(lib, rows, k, kmax):
    out = torch.full((rows.shape[0], kmax), -7, dtype=torch.int32)  # every column must be written
    on_device = isinstance(k, torch.Tensor)
    ts._cuda_select(rows, out, k, on_device, lib=lib)
    return out


def scores(kind: str, R: int, N: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values: the threshold bin holds many equal keys, -0 among the zeros
        x = torch.randint(-3, 4, (R, N), generator=g).float()
        x[:, ::3] *= -1
        return x
    if kind == "close":  # one exponent: the first round's bins are few, the later rounds decide
        return 1.0 + torch.rand(R, N, generator=g) * 1e-3
    x = torch.randn(R, N, generator=g) * 10
    x[:, :: max(1, N // 7)] = float("inf")  # rows that must be attended (a pinned step's scores)
    x[:, 1 :: max(2, N // 5)] = float("-inf")  # rows past the live ones
    return x


CASES = [  # kind, R, N, k, kmax
    ("randn", 3, 1000, 100, 100),
    ("ties", 2, 777, 250, 300),
    ("close", 2, 1500, 1, 4),
    ("randn", 1, 50, 50, 64),     # k = N, N below one tile
    ("ties", 2, 300, 0, 8),       # k = 0: all columns zero
    ("randn", 2, 129, 500, 520),  # k past N: clamped to N
]


@pytest.mark.parametrize("case", CASES)
def test_kernel_source_matches_the_reference_top_k(emulator, case):
    kind, R, N, k, kmax = case
    x = scores(kind, R, N, seed=N + k)
    assert torch.equal(run(emulator, x, k, kmax), ts.topk_ref(x, min(k, N), kmax))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_a_device_k_and_strided_rows(emulator, dtype):
    x = scores("ties", 2, 900, seed=1)
    wide = torch.zeros(2, 1000)
    wide[:, :900] = x
    rows = wide[:, :900]  # rows 1000 elements apart
    k = torch.tensor([311], dtype=dtype)
    assert torch.equal(run(emulator, rows, k, 400), ts.topk_ref(x, 311, 400))


def test_a_bad_path_name_is_refused(monkeypatch):
    from kvbench.errors import KVBenchError

    monkeypatch.setenv("KVBENCH_TOPK", "cub")
    with pytest.raises(KVBenchError, match="KVBENCH_TOPK='cub'"):
        ts.use_cuda(torch.device("cpu"))
    monkeypatch.setenv("KVBENCH_TOPK", "cuda")
    assert not ts.use_cuda(torch.device("cpu")) and ts.backend(torch.device("cpu")) == "triton"
