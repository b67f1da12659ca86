import pytest
import torch

from kvbench import LayerSpec, parse_method
from oracles import naive_attention


def make(method, hq, hkv, d, dtype=torch.float32):
    return parse_method(method).make_layer(LayerSpec(0, 1, hq, hkv, d, dtype, torch.device("cpu")))


@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (9, 3)])
@pytest.mark.parametrize("d", [64, 128])
def test_full_matches_oracle_through_prefill_decode_and_chunks(hq, hkv, d):
    torch.manual_seed(0)
    B, T = 2, 37
    layer = make("full:grow=5", hq, hkv, d)
    ks, vs = [], []
    for step, t in enumerate([T, 1, 1, 7, 1, 300]):  # prefill, decode steps, a question chunk, a long chunk
        q, k, v = torch.randn(B, hq, t, d), torch.randn(B, hkv, t, d), torch.randn(B, hkv, t, d)
        ks.append(k), vs.append(v)
        out = layer.prefill(q, k, v) if step == 0 else layer.extend(q, k, v)
        ref = naive_attention(q, torch.cat(ks, 2), torch.cat(vs, 2))
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    n = sum(k.shape[2] for k in ks)
    assert layer.seq_len() == n
    cap = layer.k.shape[1]
    assert cap >= n
    assert layer.nbytes() == 2 * B * cap * hkv * d * 4


def test_full_prefill_allocates_exactly_the_prompt():
    layer = make("full", 4, 2, 64, torch.float16)
    x = torch.randn(1, 4, 100, 64, dtype=torch.float16)
    layer.prefill(x, x[:, :2], x[:, :2])
    assert layer.nbytes() == 2 * 100 * 2 * 64 * 2


def test_prefill_with_a_query_tail():
    torch.manual_seed(1)
    layer = make("full", 8, 2, 64)
    k, v = torch.randn(2, 2, 50, 64), torch.randn(2, 2, 50, 64)
    q = torch.randn(2, 8, 3, 64)  # queries of positions 47, 48, 49
    out = layer.prefill(q, k, v)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert layer.seq_len() == 50
