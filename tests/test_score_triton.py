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
    """quest_bounds and label_scores against the methods' PyTorch references; returns the worst absolute difference
    over the head dim. Shapes (B, Hq, Hkv, N, D): N pages or label rows, D the head dim."""
    from kvbench.kernels.score_triton import label_scores, quest_bounds
    from kvbench.methods.doublesparse import label_scores_ref, pack_nibbles, pseudo_quantize
    from kvbench.methods.quest import page_bounds_ref

    worst = 0.0
    for B, Hq, H, N, D in shapes:
        q1 = torch.randn(B, Hq, D, device=device).to(dtype)
        meta = torch.randn(B, H, N + 3, 2 * D, device=device).to(dtype)  # a buffer longer than the live pages
        want = page_bounds_ref(q1, meta[:, :, :N])
        got = quest_bounds(q1, meta, N)
        torch.testing.assert_close(got, want, atol=tol * D, rtol=tol)
        seen = torch.full((B,), max(1, 16 * (N // 2)), dtype=torch.int32, device=device)
        masked = quest_bounds(q1, meta, N, seen, 16)
        newest = (int(seen[0]) - 1) // 16
        assert (masked[..., newest + 1 :] == float("-inf")).all() and (masked[..., newest] == float("inf")).all()
        torch.testing.assert_close(masked[..., :newest], want[..., :newest], atol=tol * D, rtol=tol)
        worst = max(worst, (got - want).abs().max().item() / D)
        r = min(16, D)
        channels = torch.stack([torch.randperm(D)[:r] for _ in range(B * H)]).view(B, H, r).to(device)
        x = torch.randn(B, H, N + 5, r, device=device)
        for bits in (16, 8, 4):  # doublesparse's labels: the model dtype, or codes (packed at 4 bits), step, minimum
            if bits == 16:
                labels, lmeta = x.to(dtype), None
            else:
                codes, step, low = pseudo_quantize(x, bits)
                labels, lmeta = (pack_nibbles(codes) if bits == 4 else codes), torch.stack([step, low], -1).half()
            want3 = label_scores_ref(q1, labels[:, :, :N], channels, None if lmeta is None else lmeta[:, :, :N], bits)
            got3 = label_scores(q1, channels, labels, lmeta, bits, N)
            torch.testing.assert_close(got3, want3, atol=1e-3 * r, rtol=1e-3)
            live = torch.full((B,), N // 2, dtype=torch.int32, device=device)
            got4 = label_scores(q1, channels, labels, lmeta, bits, N, live)
            assert (got4[..., N // 2 :] == float("-inf")).all()
            torch.testing.assert_close(got4[..., : N // 2], got3[..., : N // 2], atol=1e-5, rtol=1e-5)
    return worst


def check_qjl_outliers(device, shapes):
    """qjl_scores (kernels/qjl_attend.py) against the method's reference estimators (outlier_scores_ref, and
    scores_ref with O = 0); returns the worst absolute difference over the scale of the scores."""
    from kvbench.kernels.qjl_attend import qjl_scores
    from kvbench.methods.qjl import outlier_scores_ref, pack_signs, quantize_keys, scores_ref, sketch

    worst = 0.0
    for B, Hq, H, N, D, M, MO, O, group in shapes:
        proj = sketch(D, M, 7, device)
        k = torch.randn(B, H, N, D, device=device) * (1 + 5 * (torch.rand(D, device=device) < 0.1))
        q1 = torch.randn(B, Hq, D, device=device)
        if O:
            keys = quantize_keys(k, proj, O, group, MO)
            want = outlier_scores_ref(q1[:, :, None], proj, keys)[:, :, 0]
            got = qjl_scores(q1, proj, keys)
        else:
            signs, norms = pack_signs(k @ proj), k.norm(dim=-1).half()
            want = scores_ref(q1[:, :, None], proj, signs, norms)[:, :, 0]
            got = qjl_scores(q1, proj, None, signs, norms)
        assert got.shape == want.shape == (B, Hq, N)
        if N:
            scale = want.abs().max().item() + 1e-6
            torch.testing.assert_close(got / scale, want / scale, atol=2e-3, rtol=0)  # fp16 sketched queries in the dot
            worst = max(worst, (got - want).abs().max().item() / scale)
    return worst


QJL_SHAPES = [(1, 4, 2, 96, 64, 128, 64, 8, 32), (2, 3, 3, 48, 32, 64, 64, 3, 16), (1, 8, 1, 0, 64, 256, 128, 8, 32),
              (2, 4, 2, 70, 32, 64, 64, 0, 1)]


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
    shapes = [(1, 4, 2, 70, 40), (2, 3, 3, 5, 16), (1, 8, 1, 130, 128), (1, 8, 2, 3, 6)]
    worst = check_kernels("cpu", torch.float32, shapes, 1e-4)
    worst = max(worst, check_kernels("cpu", torch.bfloat16, [(1, 4, 2, 33, 64)], 1e-4))
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


GPU_SHAPES = [  # B, Hq, Hkv, N, D
    (8, 32, 8, 32768, 128), (4, 32, 8, 4097, 128), (2, 9, 3, 777, 64), (1, 8, 8, 1, 32), (3, 12, 4, 2049, 96)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_match_the_references_on_gpu(dtype):
    torch.manual_seed(1)
    check_kernels("cuda", dtype, GPU_SHAPES, 2e-3)


@pytest.mark.gpu
def test_qjl_outlier_kernel_matches_the_reference_on_gpu():
    torch.manual_seed(3)
    check_qjl_outliers("cuda", QJL_SHAPES + [(1, 32, 8, 32768, 128, 256, 256, 8, 32),
                                             (4, 32, 8, 4096, 128, 512, 128, 8, 32), (3, 24, 8, 999, 128, 256, 256, 0, 1)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(32, 8, 128, 3000), (9, 3, 64, 700)])
def test_methods_decode_with_the_kernels_on_gpu(dtype, shape):
    torch.manual_seed(2)
    hq, hkv, d, T = shape
    check_methods("cuda", dtype, hq, hkv, d, T, 40, 2e-2)
