"""kernels/rope_shift.py: the one-pass key re-rotation of the rag suite's composition, against the PyTorch rotation
(kvbench.rag.Rope), in Triton's interpreter on the CPU and on the GPU."""

import textwrap

import pytest
import torch

from interpreter import run_interpreted

CHECK = textwrap.dedent("""
    import torch
    from kvbench.kernels import rope_shift
    from kvbench.rag import Rope
    torch.manual_seed(0)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 32, 2).float() / 32)
    for dtype in (torch.float32, torch.float16):
        for B, H, T, D in ((1, 2, 37, 32), (2, 3, 70, 64)):
            buf = torch.randn(B, H, T + 5, D).to(dtype)
            head = buf[:, :, :5].clone()
            k = torch.randn(B, H, T, D).to(dtype)
            delta = torch.randint(-50, 5000, (T,))
            freqs = delta.double()[:, None] * (1.0 / 10000 ** (torch.arange(0, D, 2).double() / D))
            emb = torch.cat([freqs, freqs], -1)
            cos, sin = emb.cos().float(), emb.sin().float()
            half = D // 2
            want = torch.addcmul(k * cos, torch.cat([-k[..., half:], k[..., :half]], -1), sin).to(dtype)
            got = rope_shift.rotate(k, cos, sin, out=buf[:, :, 5:])  # into a strided slice, as the composition does
            assert got is not None and got.data_ptr() == buf[:, :, 5:].data_ptr()
            torch.testing.assert_close(buf[:, :, 5:], want, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-3)
            assert torch.equal(buf[:, :, :5], head)  # the slots before the slice untouched
            k2 = k.clone()
            rope_shift.rotate(k2, cos, sin, out=k2)  # in place: each program reads its rows before writing them
            torch.testing.assert_close(k2, want, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-3)
    assert rope_shift.rotate(torch.randn(1, 1, 4, 24), torch.ones(4, 24), torch.zeros(4, 24)) is None  # 12: no
    print("rope ok")
""")


def test_rope_shift_matches_the_pytorch_rotation_in_the_interpreter():
    r = run_interpreted(CHECK)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "rope ok" in r.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_shift_on_the_gpu_matches_the_pytorch_rotation(dtype):
    from kvbench.kernels import rope_shift

    torch.manual_seed(1)
    k = torch.randn(1, 8, 3001, 128, device="cuda", dtype=dtype)
    delta = torch.randint(0, 16384, (3001,), device="cuda")
    freqs = delta.double()[:, None] * (1.0 / 500000 ** (torch.arange(0, 128, 2, device="cuda").double() / 128))
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().float(), emb.sin().float()
    want = torch.addcmul(k * cos, torch.cat([-k[..., 64:], k[..., :64]], -1), sin)
    got = rope_shift.rotate(k, cos, sin)
    assert got is not None and got.dtype == dtype
    # one rounding to the 16-bit dtype at the end on both paths: equal but for float32 rounding of the products
    assert ((got.float() - want).abs() <= want.abs() * 2 ** -7 + 1e-3).all()
