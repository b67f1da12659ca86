"""csrc/kivi_attend.cu (KIVI decode attention over the packed tokens) run on the CPU from its own source: compiled as
host C++ with KVBENCH_EMU against tests/kivi_emu.h, which emulates the CUDA it uses (threads, shuffles, mma.sync and
movmatrix fragments, fp16), and called through ctypes with the very Params struct kernels/kivi.py fills. It checks the
kernel's lane arithmetic (which lane dequantizes which codes into which fragment, the folded scales and q . min, the
lazy softmax, the merge of warps) where no GPU is: alone against attention over the dequantized packed tokens, and
inside kivi.Decoder (Triton's ring part and combine in the interpreter) against kivi_ref.attention_ref. The GPU
parity tests (test_kivi.py) check the rest."""

import ctypes
import math
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from interpreter import run_interpreted
from kvbench.kernels import kivi_ref as ref

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent / "kernels" / "csrc"

WRAPPER = """#include "kivi_attend.cu"
template <typename T, int D, int BITS> static void run(const kivi::Params& p) {
  emu_launch<T, D>(p, p.n_parts - 1, p.B * p.H, kivi::attend_kernel<T, D, BITS>);
}
template <typename T, int D> static void by_bits(const kivi::Params& p, int bits) {
  bits == 2 ? run<T, D, 2>(p) : run<T, D, 4>(p);
}
extern "C" int kivi_attend(const kivi::Params* p, int bf16, int D, int bits, void*) {
  if (bf16) D == 128 ? by_bits<__nv_bfloat16, 128>(*p, bits) : by_bits<__nv_bfloat16, 64>(*p, bits);
  else D == 128 ? by_bits<__half, 128>(*p, bits) : by_bits<__half, 64>(*p, bits);
  return 0;
}
extern "C" int kivi_blocks_per_sm(int, int, int) { return 4; }
extern "C" const char* kivi_error_string(int) { return "emulated"; }
"""


def build_emulator(out_dir: Path) -> Path:
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the host emulation")
    (out_dir / "emu.cpp").write_text(WRAPPER)
    so = out_dir / "kivi_emu.so"
    r = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-DKVBENCH_EMU", f"-I{HERE}",
                        f"-I{CSRC}", "-o", str(so), str(out_dir / "emu.cpp")], capture_output=True, text=True)
    if r.returncode and "_Float16" in r.stderr:
        pytest.skip("this compiler has no _Float16")
    assert r.returncode == 0, r.stderr[-3000:]
    return so


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    from kvbench.kernels import kivi as K

    lib = ctypes.CDLL(str(build_emulator(tmp_path_factory.mktemp("kivi_emu"))))
    lib.kivi_attend.argtypes = [ctypes.POINTER(K.CudaParams), ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                ctypes.c_void_p]
    return lib


def rand_cache(B, H, D, T, dtype, bits, G, R=128, seed=0):
    torch.manual_seed(seed)
    kv = ref.PackedKV.empty(B, H, D, dtype, "cpu", bits, G, R)
    # channels with offsets and spreads (outlier channels), values of another scale: every (scale, min) matters
    k = torch.randn(B, H, T, D) * torch.linspace(0.5, 3, D) + torch.linspace(-4, 4, D)
    kv.append(k.to(dtype), (torch.randn(B, H, T, D) * 2 + 0.5).to(dtype))
    return kv


def packed_parts(lib, q, kv, split, n_parts, pinned_len=None):
    """The kernel's parts [0, n_parts - 1), merged with a log-sum-exp: attention over the packed tokens [0, Nv)."""
    from kvbench.kernels import kivi as K

    B, Hq, _, D = q.shape
    H = kv.rk.shape[1]
    op = torch.full((B * Hq * n_parts, D), float("nan"))  # nothing unwritten may be read
    lse = torch.full((B * Hq * n_parts,), float("nan"))
    length = torch.tensor([kv.n if pinned_len is None else pinned_len], dtype=torch.int32)
    p = K.CudaParams(q.data_ptr(), kv.kq.data_ptr(), kv.ks.data_ptr(), kv.km.data_ptr(), kv.vq.data_ptr(),
                     kv.vs.data_ptr(), kv.vm.data_ptr(), op.data_ptr(), lse.data_ptr(),
                     length.data_ptr() if pinned_len is not None else None,
                     q.stride(0), q.stride(1), kv.kq.stride(1), kv.ks.stride(1), kv.vq.stride(1), kv.vs.stride(1),
                     B, H, Hq // H, kv.n, kv.residual, kv.group, split, n_parts, D**-0.5 * math.log2(math.e))
    assert lib.kivi_attend(ctypes.byref(p), int(q.dtype == torch.bfloat16), D, kv.bits, None) == 0
    op = op.view(B * Hq, n_parts, D)[:, :-1]
    lse = lse.view(B * Hq, n_parts)[:, :-1]
    assert not op.isnan().any() and not lse.isnan().any()
    w = torch.exp2(lse - lse.amax(1, keepdim=True))
    return ((op * w[..., None]).sum(1) / w.sum(1, keepdim=True)).view(B, Hq, 1, D)


def dense(q, k, v):
    Hq, H = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(Hq // H, 1).double(), v.repeat_interleave(Hq // H, 1).double()
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s, -1) @ v


CASES = [  # B, Hq, H, D, T, bits, G, split
    (1, 8, 2, 128, 600, 2, 32, 128),    # GQA 4, a partial last tile in a part
    (2, 8, 8, 64, 333, 4, 32, 64),      # GQA 1, odd length
    (1, 16, 2, 128, 500, 4, 16, 192),   # GQA 8, groups of 16
    (2, 6, 2, 64, 459, 2, 64, 256),     # GQA 3 (padding heads), groups of 64
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Hq{}-H{}-D{}-T{}-b{}-G{}".format(*c[:7]))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kernel_source_matches_attention_over_the_packed_tokens(emulator, case, dtype):
    B, Hq, H, D, T, bits, G, split = case
    kv = rand_cache(B, H, D, T, dtype, bits, G, seed=sum(case))
    q = torch.randn(B, Hq, 1, D).to(dtype)
    nv = kv.nv
    n_parts = -(-nv // split) + 1
    want = dense(q, kv.keys()[:, :, :nv], kv.values()[:, :, :nv])
    got = packed_parts(emulator, q, kv, split, n_parts)
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
    # a pinned cache reads the length on the device: parts past it are empty (lse -inf) and weigh nothing
    got = packed_parts(emulator, q, kv, split, n_parts + 2, pinned_len=kv.n)
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


DECODER_CHECK = textwrap.dedent("""
    import ctypes, sys
    from pathlib import Path
    import torch
    from kvbench.kernels import kivi as K
    from kvbench.kernels.kivi_ref import PackedKV, attention_ref
    lib = ctypes.CDLL(sys.argv[1])
    lib.kivi_attend.argtypes = [ctypes.POINTER(K.CudaParams), ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                ctypes.c_void_p]
    lib.kivi_error_string.restype = ctypes.c_char_p
    K.cuda_lib = lambda: lib  # the emulated kernel in place of the nvcc build
    torch.manual_seed(0)
    for dtype, B, Hq, H, D, T, bits in ((torch.bfloat16, 2, 8, 2, 64, 300, 2), (torch.float16, 1, 4, 4, 64, 261, 4)):
        kv = PackedKV.empty(B, H, D, dtype, "cpu", bits, 32, 128)
        kv.append((torch.randn(B, H, T, D) * 2 + 1).to(dtype), torch.randn(B, H, T, D).to(dtype))
        q = torch.randn(B, Hq, 1, D).to(dtype)
        kn, vn = torch.randn(B, H, 1, D).to(dtype), torch.randn(B, H, 1, D).to(dtype)
        for args in ((), (kn, vn)):
            dec = K.Decoder(q, kv, path="cuda", splits=2)
            assert dec.cuda and dec.n_parts == 3
            torch.testing.assert_close(dec(*args), attention_ref(q, kv, *args), atol=2e-2, rtol=2e-2)
    # the capture-safe path: a reserved layer's steps read the length from the device counter, over parts planned
    # for the reserved length, across two key blocks, against the PyTorch path
    from kvbench import LayerSpec, parse_method
    K.cuda_path = lambda q, kv, nv=None: True
    spec = LayerSpec(0, 1, 8, 2, 64, torch.bfloat16, torch.device("cpu"))
    pinned, plain = (parse_method(f"kivi:residual=64{impl}").make_layer(spec) for impl in (",impl=triton", ""))
    k, v = (torch.randn(1, 2, 150, 64).to(torch.bfloat16) for _ in range(2))
    q = torch.randn(1, 8, 1, 64).to(torch.bfloat16)
    pinned.prefill(q, k, v), plain.prefill(q, k, v)
    pinned.reserve(60)
    assert pinned.pin.cuda and pinned.pin.n_parts > 2
    for _ in range(60):
        q, k, v = (torch.randn(1, h, 1, 64).to(torch.bfloat16) for h in (8, 2, 2))
        torch.testing.assert_close(pinned.extend(q, k, v), plain.extend(q, k, v), atol=2e-2, rtol=2e-2)
    assert int(pinned.kv.ndev) == pinned.seq_len() == 210
    print("decoder on the emulated kernel matches")
""")


def test_decoder_on_the_emulated_kernel_matches_the_reference(tmp_path):
    """kivi.Decoder's CUDA path end to end on the CPU: its Params, the kernel's parts, Triton's ring part (part0) and
    combine in the interpreter, with and without the new token; and a reserved layer's steps (the device length)."""
    so = build_emulator(tmp_path)
    r = run_interpreted(DECODER_CHECK.replace("sys.argv[1]", repr(str(so))))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "decoder on the emulated kernel matches" in r.stdout
