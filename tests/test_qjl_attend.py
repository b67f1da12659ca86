"""qjl's decode kernels (kernels/qjl_attend.py: the estimator's scores and the fused attention) against the method's
PyTorch path (reference estimator, softmax, P.V over dequantized values): in Triton's interpreter on the CPU, and on
the GPU (`-m gpu`) at real shapes, odd lengths, batch > 1, GQA ratios, bf16 and fp16."""

import textwrap

import pytest
import torch

from interpreter import run_interpreted

CPU_CASES = [("qjl:bits=128,buffer=32", 8, 2, 64, 100), ("qjl:bits=128,buffer=32,outliers=0", 4, 4, 32, 70),
             # 8 and 4 sign bytes a token: planes padded to tl.dot's K >= 16
             ("qjl:bits=64,outlier_bits=32,buffer=64,group=16,value_bits=4", 8, 1, 128, 150),
             ("qjl:bits=128,buffer=32", 8, 8, 64, 30),  # nothing quantized until the second step fills the buffer
             # the first layers' sketch (512 / 128 bits), and the default one with 4-bit values, at head dim 128
             ("qjl:bits=512,outlier_bits=128,buffer=32", 8, 2, 128, 100),
             ("qjl:buffer=32,value_bits=4", 8, 2, 128, 100)]


def check_kernels(device, dtype, cases, steps=3, B=2, tol=2e-3):
    """Each case (spec, Hq, Hkv, D, T) with impl=triton against impl=torch over decode steps (a step that fills the
    buffer included), decode_fns' attention and score; errors relative to the largest entry. Returns the worst."""
    from kvbench import LayerSpec, parse_method

    worst = 0.0
    g = torch.Generator().manual_seed(0)
    for spec, hq, hkv, d, T in cases:
        def make(impl):
            return parse_method(spec, impl=impl).make_layer(LayerSpec(20, 30, hq, hkv, d, dtype, torch.device(device)))

        fast, ref = make("triton"), make("torch")
        assert fast.info()["impl"] == "triton" and ref.info()["impl"] == "torch", spec
        scale = 1 + 3 * (torch.rand(d, generator=g) < 0.1)  # a few outlier channels
        q = torch.randn(B, hq, T, d, generator=g).to(device, dtype)
        k = (torch.randn(B, hkv, T, d, generator=g) * scale).to(device, dtype)
        v = torch.randn(B, hkv, T, d, generator=g).to(device, dtype)
        fast.prefill(q, k, v), ref.prefill(q, k, v)
        for _ in range(steps):
            q1, k1, v1 = (torch.randn(B, h, 1, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
            got, want = fast.extend(q1, k1, v1), ref.extend(q1, k1, v1)
            assert got.shape == want.shape and got.dtype == dtype
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
            assert err < tol, (spec, err)
            worst = max(worst, err)
        fns, ref_fns = fast.decode_fns(q1), ref.decode_fns(q1)
        got, want = fns["attention"](), ref_fns["attention"]()
        assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < tol
        got, want = fns["score"](), ref_fns["score"]()
        if want.numel():
            assert ((got - want).abs().max() / want.abs().max()).item() < tol, spec
    return worst


INTERPRETER_CHECK = textwrap.dedent("""
    import torch
    from test_qjl_attend import CPU_CASES, check_kernels
    print("worst", check_kernels("cpu", torch.float32, CPU_CASES))
""")


def test_kernels_match_the_torch_path_in_the_interpreter():
    r = run_interpreted(INTERPRETER_CHECK)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "worst" in r.stdout


def test_unsupported_shapes_keep_the_torch_path():
    from kvbench.kernels.qjl_attend import supported

    assert supported(128, 256, 256, 8, 32, 2) and supported(128, 512, 128, 8, 32, 4) and supported(64, 128, 0, 0, 32, 2)
    assert not supported(96, 256, 256, 8, 32, 2) and not supported(128, 136, 136, 8, 32, 2)
    assert not supported(128, 256, 256, 8, 24, 2) and not supported(128, 256, 256, 8, 8, 2)


GPU_CASES = [("qjl", 32, 8, 128, 8192 + 77), ("qjl:outliers=0", 32, 8, 128, 3000), ("qjl:bits=512,outlier_bits=128",
             16, 4, 64, 2000), ("qjl:value_bits=4", 8, 8, 128, 1500), ("qjl", 8, 1, 128, 700),
             ("qjl:buffer=64", 24, 8, 128, 1000 + 63)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_match_the_torch_path_on_gpu(dtype):
    check_kernels("cuda", dtype, GPU_CASES, steps=4, B=3, tol=2e-2)
