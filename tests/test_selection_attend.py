"""The selecting methods' attention kernel (kernels/select_attend.py) against its PyTorch reference and against
float64: in Triton's interpreter on the CPU, and on the GPU (`-m gpu`) at random and real shapes, kernel alone and
inside quest and doublesparse."""

import textwrap

import pytest
import torch

from interpreter import run_interpreted


def check_select_attend(device, dtypes, shapes, seed=0):
    """select_attend against attend_ref (same dtype) and float64 over shapes (B, Hq, Hkv, D, cap, N); with and
    without the device-side bounds (limit, live). Returns the worst relative error against float64."""
    from kvbench.kernels.select_attend import attend_ref, select_attend

    g = torch.Generator(device="cpu").manual_seed(seed)
    worst = 0.0
    for dtype in dtypes:
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for B, Hq, H, D, cap, N in shapes:
            k, v = (torch.randn(B, cap, H, D, generator=g).to(device, dtype) for _ in range(2))
            q = torch.randn(B, Hq, 1, D, generator=g).to(device, dtype)
            idx = torch.stack([torch.randperm(cap, generator=g)[:N] for _ in range(B * H)]).view(B, H, N).to(device)
            bounds = [(None, None), (torch.tensor([max(1, N - 7)], device=device),
                                     torch.randint(cap // 2, cap + 1, (B,), generator=g).to(device, torch.int32))]
            for limit, live in bounds:
                if live is not None:  # every head keeps at least one live slot
                    idx[:, :, 0] = 0
                    dead = torch.arange(cap, device=device)[None, :] >= live.long()[:, None]  # [B, cap]
                    k[dead], v[dead] = float("nan"), float("nan")  # not-yet-written slots: never read
                got = select_attend(q, k, v, idx, limit, live)
                want = attend_ref(q, k.nan_to_num(0), v.nan_to_num(0), idx, limit, live)
                assert got.shape == (B, Hq, 1, D) and got.dtype == dtype and not got.isnan().any()
                torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
                exact = attend_ref(q.double(), k.nan_to_num(0).double(), v.nan_to_num(0).double(), idx, limit, live)
                worst = max(worst, ((got.double() - exact).norm() / exact.norm()).item())
    return worst


def check_pages(device, dtypes, shapes, seed=0):
    """select_attend over pages (quest: idx names pages of `page` slots, expanded in the kernel) with the live length
    an int (eager) or a device tensor plus a limit (pinned), against attend_ref. Shapes (B, Hq, Hkv, D, pages, K,
    page)."""
    from kvbench.kernels.select_attend import attend_ref, select_attend

    g = torch.Generator(device="cpu").manual_seed(seed)
    for dtype in dtypes:
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for B, Hq, H, D, P, K, page in shapes:
            n = P * page - page // 2  # the newest page partly filled
            k, v = (torch.randn(B, P * page, H, D, generator=g).to(device, dtype) for _ in range(2))
            q = torch.randn(B, Hq, 1, D, generator=g).to(device, dtype)
            pages = torch.stack([torch.randperm(P, generator=g)[:K] for _ in range(B * H)]).view(B, H, K).to(device)
            pages[..., -1] = P - 1
            live = torch.full((B,), n, dtype=torch.int32, device=device)
            limit = torch.tensor([(K - 1) * page], device=device)
            for lim, lv in ((None, n), (None, live), (limit, live)):
                got = select_attend(q, k, v, pages, lim, lv, page=page)
                want = attend_ref(q, k, v, pages, lim, lv, page=page)
                torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


PAGE_SHAPES = [(2, 8, 2, 32, 9, 4, 4), (1, 4, 4, 64, 20, 3, 16), (2, 6, 3, 48, 7, 7, 8)]


SHAPES = [(2, 8, 2, 64, 100, 37), (1, 4, 4, 32, 50, 20), (3, 8, 1, 128, 300, 129), (2, 6, 2, 48, 70, 33),
          (1, 8, 8, 16, 9, 1)]

INTERPRETER_CHECK = textwrap.dedent("""
    import torch
    from test_selection_attend import SHAPES, check_select_attend
    from test_selection_attend import PAGE_SHAPES, check_pages
    worst = check_select_attend("cpu", [torch.float32, torch.float16], SHAPES)
    check_pages("cpu", [torch.float32], PAGE_SHAPES)
    print("worst relative error", worst)
""")


def test_select_attend_matches_the_reference_in_the_interpreter():
    r = run_interpreted(INTERPRETER_CHECK)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "worst relative error" in r.stdout


GPU_SHAPES = [(8, 32, 8, 128, 32768 + 256, 3277), (1, 32, 8, 128, 4096, 1000), (3, 16, 4, 64, 1001, 517),
              (2, 8, 1, 128, 777, 77), (4, 8, 8, 64, 300, 5), (2, 12, 3, 96, 500, 250)]


@pytest.mark.gpu
def test_select_attend_matches_the_reference_on_gpu():
    worst = check_select_attend("cuda", [torch.bfloat16, torch.float16, torch.float32], GPU_SHAPES, seed=1)
    assert worst < 1e-2, worst
    check_pages("cuda", [torch.bfloat16, torch.float16], PAGE_SHAPES + [(8, 32, 8, 128, 2048, 204, 16),
                                                                        (3, 24, 8, 128, 131, 13, 16)], seed=2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", ["quest:budget=0.1,dense_layers=0", "quest:budget=0.2,page=8,dense_layers=0",
                                  "doublesparse:budget=0.1", "doublesparse:budget=100,label_bits=16"])
def test_methods_attend_their_picks_with_the_kernel_on_gpu(spec, dtype):
    """decode_fns' attention and eager steps over the kernel, against PyTorch's gather + dense attention over the
    very positions the method picked."""
    from kvbench import LayerSpec, parse_method
    from kvbench.methods.selection import attend_positions

    torch.manual_seed(4)
    B, hq, hkv, d, T = 3, 32, 8, 128, 2001
    layer = parse_method(spec).make_layer(LayerSpec(3, 8, hq, hkv, d, dtype, torch.device("cuda")))
    assert layer.triton
    q = torch.randn(B, hq, 16, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, hkv, T, d, device="cuda", dtype=dtype) for _ in range(2))
    layer.prefill(q, k, v)
    for _ in range(5):
        q1 = torch.randn(B, hq, 1, d, device="cuda", dtype=dtype)
        k1, v1 = (torch.randn(B, hkv, 1, d, device="cuda", dtype=dtype) for _ in range(2))
        out = layer.extend(q1, k1, v1)
        want = attend_positions(q1, layer.kv, layer.attended())
        torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    fns = layer.decode_fns(q1)
    idx = layer.select(q1[:, :, 0])
    torch.testing.assert_close(fns["attention"](), attend_positions(q1, layer.kv, idx), atol=2e-2,
                               rtol=2e-2)
    assert set(fns) == {"attention", "score", "select", "attend"}
