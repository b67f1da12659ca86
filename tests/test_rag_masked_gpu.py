"""The rag suite's masked (position-causal) attention on the GPU: FlexAttention against SDPA with a dense mask."""

import pytest
import torch

from kvbench import rag

SHAPES = [  # B, Hq, Hkv, D, T queries, S slots
    (1, 32, 8, 128, 300, 2100),
    (1, 8, 8, 64, 77, 513),
    (1, 4, 1, 128, 1, 129),
    (1, 16, 4, 128, 1500, 4099),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flex_masked_attention_matches_sdpa(shape, dtype, monkeypatch):
    torch.manual_seed(sum(shape))
    B, Hq, H, D, T, S = shape
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype)
    K, V = (torch.randn(B, H, S, D, device="cuda", dtype=dtype) for _ in range(2))
    kpos = torch.randperm(S + 40, device="cuda")[:S].sort().values  # gaps where tokens were dropped
    qpos = kpos[torch.randperm(S, device="cuda")[:T]].sort().values  # recomputed slots: held positions
    qpos[-1] = kpos[-1] + 3 if T > 1 else qpos[-1]  # and one past the end (a question token)
    got = {}
    for kernel in ("sdpa", "flex"):
        monkeypatch.setattr(rag, "MASKED_KERNEL", kernel)
        got[kernel] = rag._masked_attention(q, K, V, qpos, kpos, rag.Observer(), None).float()
    want = got["sdpa"]
    err = ((got["flex"] - want).norm() / want.norm()).item()
    assert err < 1e-2, err
