"""The Triton scoring kernels of quest, doublesparse and qjl (kernels/score_triton.py) against their PyTorch
references: in Triton's interpreter on the CPU, and on the GPU (`-m gpu`), kernels alone and inside the methods."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvbench import KVBenchError, LayerSpec, parse_method

SELECTING = ["quest:budget=64,dense_layers=0", "doublesparse:budget=64", "doublesparse:budget=64,label_bits=8",
             "doublesparse:budget=64,label_bits=16", "qjl:bits=128,buffer=32",
             "qjl:bits=128,buffer=32,outliers=0"]


def make(spec, hq, hkv, d, dtype=torch.float32, device="cpu"):
    return parse_method(spec).make_layer(LayerSpec(3, 8, hq, hkv, d, dtype, torch.device(device)))


def check_kernels(device, dtype, shapes, tol):
    """rowdot and sign_rowdot against plain PyTorch; returns the worst absolute difference."""
    from kvbench.kernels.score_triton import rowdot, sign_rowdot
    from kvbench.methods.qjl import unpack_signs

    worst = 0.0
    for B, Hq, H, N, C, M in shapes:
        x = torch.randn(B, H, N, 2 * C, device=device).to(dtype)[..., :C]  # rows with a stride, as quest's pages
        w = torch.randn(B, H, C, device=device)
        want = (x.float() * w[:, :, None]).sum(-1)
        got = rowdot(x, w)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        for bits in (4, 8):  # doublesparse's quantized labels: codes (packed at 4 bits) with a step and minimum
            from kvbench.methods.doublesparse import dequantize_labels, pack_nibbles, pseudo_quantize

            codes, step, low = pseudo_quantize(torch.randn(B, H, N, 2 * C, device=device), bits)
            stored = pack_nibbles(codes) if bits == 4 else codes
            meta = torch.stack([step, low], -1).half()
            w2 = torch.randn(B, H, 2 * C, device=device)
            want3 = (dequantize_labels(stored, meta, bits) * w2[:, :, None]).sum(-1)
            torch.testing.assert_close(rowdot(stored, w2, meta, nibbles=bits == 4), want3, atol=1e-3, rtol=1e-4)
        bits = torch.randint(0, 256, (B, H, N, M // 8), dtype=torch.uint8, device=device)
        wq, scale = torch.randn(B, Hq, M, device=device), torch.rand(B, H, N, device=device).half()
        signs = unpack_signs(bits).repeat_interleave(Hq // H, dim=1)  # [B, Hq, N, M]
        want2 = (signs @ wq[..., None])[..., 0] * scale.float().repeat_interleave(Hq // H, dim=1)
        got2 = sign_rowdot(bits, wq, scale)
        torch.testing.assert_close(got2, want2, atol=3e-3 * M**0.5, rtol=2e-3)  # fp16 queries in the dot
        worst = max(worst, (got - want).abs().max().item(), (got2 - want2).abs().max().item() / M**0.5)
    return worst


def check_qjl_outliers(device, shapes):
    """qjl_outlier_scores against the method's reference estimator (outlier_scores_ref); returns the worst absolute
    difference over the scale of the scores."""
    from kvbench.kernels.score_triton import qjl_outlier_scores
    from kvbench.methods.qjl import outlier_scores_ref, quantize_keys, sketch

    worst = 0.0
    for B, Hq, H, N, D, M, MO, O, group in shapes:
        proj = sketch(D, M, 7, device)
        k = torch.randn(B, H, N, D, device=device) * (1 + 5 * (torch.rand(D, device=device) < 0.1))
        keys = quantize_keys(k, proj, O, group, MO)
        q1 = torch.randn(B, Hq, D, device=device)
        want = outlier_scores_ref(q1[:, :, None], proj, keys)[:, :, 0]
        got = qjl_outlier_scores(keys, q1, q1 @ proj, proj)
        assert got.shape == want.shape == (B, Hq, N)
        if N:
            scale = want.abs().max().item() + 1e-6
            torch.testing.assert_close(got / scale, want / scale, atol=2e-3, rtol=0)  # fp16 sketched queries in the dot
            worst = max(worst, (got - want).abs().max().item() / scale)
    return worst


QJL_SHAPES = [(1, 4, 2, 96, 64, 128, 64, 8, 32), (2, 3, 3, 40, 32, 64, 64, 3, 8), (1, 8, 1, 0, 64, 256, 128, 8, 32)]


def check_methods(device, dtype, hq, hkv, d, T, steps, tol):
    """Each selecting method with impl=triton against impl=torch over decode steps: same outputs (and picks)."""
    for spec in SELECTING:
        fast, ref = make(spec + ",impl=triton", hq, hkv, d, dtype, device), make(spec + ",impl=torch", hq, hkv, d,
                                                                                 dtype, device)
        q = torch.randn(2, hq, T, d, device=device).to(dtype)
        k = (torch.randn(2, hkv, T, d, device=device) + torch.linspace(-2, 2, d, device=device)).to(dtype)
        v = torch.randn(2, hkv, T, d, device=device).to(dtype)
        fast.prefill(q, k, v), ref.prefill(q, k, v)
        for _ in range(steps):
            q1 = torch.randn(2, hq, 1, d, device=device).to(dtype)
            k1, v1 = (torch.randn(2, hkv, 1, d, device=device).to(dtype) for _ in range(2))
            torch.testing.assert_close(fast.extend(q1, k1, v1), ref.extend(q1, k1, v1), atol=tol, rtol=tol)
        assert fast.info()["impl"] == "triton" and ref.info()["impl"] == "torch", spec
        fns = fast.decode_fns(q1)
        torch.testing.assert_close(fns["attention"](), ref.decode_fns(q1)["attention"](), atol=tol, rtol=tol)


INTERPRETER_CHECK = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    from test_score_triton import QJL_SHAPES, check_kernels, check_methods, check_qjl_outliers
    torch.manual_seed(0)
    shapes = [(1, 4, 2, 70, 40, 64), (2, 3, 3, 5, 16, 128), (1, 8, 1, 130, 128, 256)]
    worst = check_kernels("cpu", torch.float32, shapes, 1e-4)
    worst = max(worst, check_kernels("cpu", torch.bfloat16, [(1, 4, 2, 33, 64, 16)], 1e-4))
    worst = max(worst, check_qjl_outliers("cpu", QJL_SHAPES))
    check_methods("cpu", torch.float32, 8, 2, 32, 150, 6, 1e-2)
    print("max abs difference", worst)
""")


def test_kernels_match_the_references_in_the_interpreter():
    """The very kernels the GPU runs, executed by Triton's interpreter (a subprocess: TRITON_INTERPRET must be set
    before triton is imported)."""
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' on Linux)")
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "max abs difference" in r.stdout


def test_triton_impl_on_cpu_says_how_to_fix():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the interpreter runs Triton on the CPU")
    for spec in SELECTING:
        with pytest.raises(KVBenchError, match="impl=torch"):
            make(spec + ",impl=triton", 8, 2, 64)


GPU_SHAPES = [  # B, Hq, Hkv, N, C, M
    (1, 32, 8, 32768, 256, 256), (4, 32, 8, 4097, 16, 512), (2, 9, 3, 777, 128, 128), (1, 8, 8, 1, 32, 16)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_match_the_references_on_gpu(dtype):
    torch.manual_seed(1)
    check_kernels("cuda", dtype, GPU_SHAPES, 2e-3)


@pytest.mark.gpu
def test_qjl_outlier_kernel_matches_the_reference_on_gpu():
    torch.manual_seed(3)
    check_qjl_outliers("cuda", QJL_SHAPES + [(1, 32, 8, 32768, 128, 256, 256, 8, 32), (4, 32, 8, 4096, 128, 512, 128,
                                                                                        8, 32)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(32, 8, 128, 3000), (9, 3, 64, 700)])
def test_methods_decode_with_the_kernels_on_gpu(dtype, shape):
    torch.manual_seed(2)
    hq, hkv, d, T = shape
    check_methods("cuda", dtype, hq, hkv, d, T, 40, 2e-2)
