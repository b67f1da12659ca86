"""The device top-k of quest and doublesparse (kernels/topk_select.py) against its PyTorch reference (a stable sort):
ties, infinities, signed zeros, device-side k with padding, rows kept in registers and rows re-read in chunks; in
Triton's interpreter on the CPU and on the GPU (`-m gpu`) at the methods' real shapes."""

import textwrap

import pytest
import torch

from interpreter import run_interpreted


def check_topk(device, cases, seed=0):
    """topk_select against topk_ref over cases (rows, N, k, kmax or None, ties); k both as an int and as a device
    tensor (then kmax >= k)."""
    from kvbench.kernels.topk_select import topk_ref, topk_select

    g = torch.Generator().manual_seed(seed)
    for rows, N, k, kmax, ties in cases:
        s = torch.randint(0, 5, (rows, N), generator=g).float() if ties else torch.randn(rows, N, generator=g)
        if N > 20:
            s[0, 3], s[0, 10:20] = float("inf"), float("-inf")  # quest's forced and masked pages
            s[-1, :5] = -s[-1, :5].abs()
        s = s.to(device)
        for kk in (k, torch.tensor([k], device=device)):
            km = kmax if kmax is not None else (k + 3 if isinstance(kk, torch.Tensor) else None)
            got, want = topk_select(s, kk, km), topk_ref(s, kk, km)
            assert got.dtype == torch.int32 and got.shape == want.shape, (rows, N, k)
            assert torch.equal(got, want), (rows, N, k, kmax, ties)


CASES = [(3, 100, 7, None, False), (2, 1, 1, None, False), (4, 700, 70, None, True), (2, 300, 300, None, False),
         (5, 77, 3, 10, False), (1, 64, 0, 4, False)]

INTERPRETER_CHECK = textwrap.dedent("""
    import kvbench.kernels.topk_select as ts
    from test_topk_select import CASES, check_topk
    check_topk("cpu", CASES)
    ts.ROW_MAX = 256  # the chunked passes, as rows longer than ROW_MAX take
    check_topk("cpu", [(2, 1500, 301, None, False), (2, 999, 40, 64, True)])
    ts.ROW_MAX, ts.SPLIT, ts.SPLIT_MIN = 32768, 256, 300  # the split path: pieces of 256, the last one partial
    check_topk("cpu", [(2, 1500, 301, None, False), (3, 999, 40, 64, True), (1, 700, 700, None, False),
                       (2, 301, 0, 5, False), (2, 1000, 1, None, True)], seed=2)
    import torch
    s = torch.zeros(2, 700)
    s[:, ::2] = -0.0  # signed zeros tie: the lowest indices win
    assert torch.equal(ts.topk_select(s, 77), torch.arange(77, dtype=torch.int32).expand(2, -1))
    print("topk ok")
""")


def test_topk_matches_the_reference_in_the_interpreter():
    r = run_interpreted(INTERPRETER_CHECK)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "topk ok" in r.stdout


GPU_CASES = CASES + [(64, 2048, 204, None, False), (64, 32768, 3277, None, False), (8, 32768, 3277, 3300, True),
                     (64, 2064, 206, 210, False), (3, 40000, 4000, None, False), (2, 5000, 4999, None, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["cuda", "triton"])
def test_topk_matches_the_reference_on_gpu(path, monkeypatch):
    """csrc/topk_select.cu (KVBENCH_TOPK=cuda) and the Triton paths (the default, KVBENCH_TOPK=triton)."""
    from kvbench.kernels.topk_select import topk_select

    monkeypatch.setenv("KVBENCH_TOPK", path)
    check_topk("cuda", GPU_CASES + [(5, 999, 300, 320, True)], seed=1)
    s = torch.zeros(3, 5000, device="cuda")
    s[:, ::2] = -0.0  # signed zeros tie: the lowest indices win
    assert torch.equal(topk_select(s, 77), torch.arange(77, device="cuda", dtype=torch.int32).expand(3, -1))
