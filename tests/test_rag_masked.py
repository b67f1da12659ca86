"""The rag suite's masked (position-causal) attention: the block mask (CPU, FlexAttention's eager path) and the
GPU kernel (compiled FlexAttention), each against SDPA with the dense mask."""

import pytest
import torch
import torch.nn.functional as F

from kvbench import rag


def positions(S: int, T: int, gap: int, device="cpu"):
    kpos = torch.randperm(S + gap, device=device)[:S].sort().values  # gaps where tokens were dropped
    qpos = kpos[torch.randperm(S, device=device)[:T]].sort().values  # recomputed slots: held positions
    if T > 1:
        qpos[-1] = kpos[-1] + 3  # and one past the end (a question token)
    return qpos, kpos


@pytest.mark.parametrize("T,S,gap", [(50, 300, 40), (1, 129, 0), (300, 1000, 5), (129, 257, 300), (128, 128, 0)])
def test_position_block_mask_marks_full_and_skipped_blocks_exactly(T, S, gap):
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(T + S)
    qpos, kpos = positions(S, T, gap)
    q, K, V = torch.randn(1, 8, T, 64), torch.randn(1, 2, S, 64), torch.randn(1, 2, S, 64)
    got = flex_attention(q, K, V, block_mask=rag.position_block_mask(qpos, kpos), enable_gqa=True)
    want = F.scaled_dot_product_attention(q, K, V, attn_mask=kpos[None, :] <= qpos[:, None], enable_gqa=True)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


SHAPES = [  # B, Hq, Hkv, D, T queries, S slots (each new shape compiles FlexAttention once: a few seconds)
    (1, 32, 8, 128, 300, 2100),
    (1, 8, 8, 64, 77, 513),
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
    qpos, kpos = positions(S, T, 40, "cuda")
    got = {}
    for kernel in ("sdpa", "flex"):
        monkeypatch.setattr(rag, "MASKED_KERNEL", kernel)
        got[kernel] = rag._masked_attention(q, K, V, qpos, kpos, rag.Observer(), rag.PositionedKV()).float()
    want = got["sdpa"]
    err = ((got["flex"] - want).norm() / want.norm()).item()
    assert err < 1e-2, err


class _KeepProbs(rag.Observer):
    want_probs = True

    def on_probs(self, layer, probs):
        self.probs = probs


@pytest.mark.parametrize("Hq,Hkv,T,S", [(8, 2, 5, 40), (4, 4, 1, 17), (12, 3, 33, 100)])
def test_attention_with_probs_equals_the_repeated_heads_reference(Hq, Hkv, T, S):
    torch.manual_seed(Hq * T + S)
    qpos, kpos = positions(S, T, 7)
    q, K, V = torch.randn(2, Hq, T, 32), torch.randn(2, Hkv, S, 32), torch.randn(2, Hkv, S, 32)
    obs = _KeepProbs()
    got = rag._masked_attention(q, K, V, qpos, kpos, obs, rag.PositionedKV())
    Kx, Vx = K.repeat_interleave(Hq // Hkv, 1), V.repeat_interleave(Hq // Hkv, 1)  # query head h reads KV h // group
    mask = kpos[None, :] <= qpos[:, None]
    probs = ((q @ Kx.transpose(-1, -2)) * 32 ** -0.5).masked_fill(~mask, float("-inf")).softmax(-1)
    torch.testing.assert_close(obs.probs, probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, probs @ Vx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Hq,Hkv,T,S", [(8, 2, 5, 40), (4, 4, 1, 17), (12, 3, 33, 100)])
def test_folded_sdpa_equals_sdpa_with_gqa(Hq, Hkv, T, S):
    torch.manual_seed(Hq + T * S)
    qpos, kpos = positions(S, T, 3)
    q, K, V = torch.randn(1, Hq, T, 64), torch.randn(1, Hkv, S, 64), torch.randn(1, Hkv, S, 64)
    mask = kpos[None, :] <= qpos[:, None]
    want = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=Hq != Hkv)
    torch.testing.assert_close(rag.folded_sdpa(q, K, V, mask), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hkv,R,S", [(8, 128, 2100), (2, 5, 77)])
def test_probe_scores_on_the_gpu_equal_float32_products(dtype, Hkv, R, S):
    """The probe's 16-bit tensor-core scores with float32 output against the float32 product of the same values
    (the products are exact in float32: only the order of the sums differs)."""
    torch.manual_seed(R + S)
    qg = torch.randn(1, Hkv, R, 128, device="cuda", dtype=dtype)
    K = torch.randn(1, Hkv, S, 128, device="cuda", dtype=dtype)
    got = rag._scores_fp32(qg, K, 128 ** -0.5)
    want = (qg.double() @ K.double().transpose(-1, -2)) * 128 ** -0.5
    assert got.dtype == torch.float32 and got.shape == (1, Hkv, R, S)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    print("tensor-core path:", rag._bmm_out_dtype)
