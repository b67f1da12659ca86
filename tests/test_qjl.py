"""qjl: the sign sketch and the estimator against float64, the estimator's unbiasedness, every output against a
float64 restatement of the method, the block rule of the buffer, nbytes the layout, the tiny model."""

import math

import pytest
import torch

from kvbench import KVBenchError, LayerSpec, ParamError, parse_method
from kvbench.kernels import kivi_ref
from kvbench.methods.qjl import pack_signs, scores_ref, sketch, unpack_signs
from oracles import naive_attention, rand_kv


def make(spec, hq=8, hkv=2, d=64, layer=20):
    return parse_method(spec).make_layer(LayerSpec(layer, 30, hq, hkv, d, torch.float32, torch.device("cpu")))


def naive_estimate(q, k, proj):
    """float64: q [Hq, Tq, D], k [Hkv, N, D], proj [D, m] -> sqrt(pi/2)/m ||k|| <q S, sign(k S)> [Hq, Tq, N]."""
    Hq, H, m = q.shape[0], k.shape[0], proj.shape[1]
    g = Hq // H
    p = proj.double()
    out = []
    for j in range(Hq):
        kk = k[j // g].double()
        out.append((q[j].double() @ p) @ torch.sign(kk @ p).T * math.sqrt(math.pi / 2) / m * kk.norm(dim=-1))
    return torch.stack(out)


def test_sketch_signs_and_estimator():
    proj = sketch(64, 256, 42, "cpu")
    torch.testing.assert_close(proj[:, :64].T @ proj[:, :64], 64 * torch.eye(64), atol=1e-3, rtol=0)  # orthogonal
    x = torch.randn(3, 5, 256)
    assert torch.equal(unpack_signs(pack_signs(x)), torch.sign(x))
    q, k = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 50, 64)
    signs, norms = pack_signs(k @ proj), k.norm(dim=-1).half()
    est = scores_ref(q, proj, signs, norms)[0]
    torch.testing.assert_close(est.double(), naive_estimate(q[0], k[0], proj), atol=5e-3, rtol=1e-3)  # fp16 norms
    # unbiased: over many projections the mean estimate approaches q.k
    q1, k1 = torch.randn(64), torch.randn(64)
    ests = [naive_estimate(q1.view(1, 1, 64), k1.view(1, 1, 64), torch.randn(64, 256))[0, 0, 0] for _ in range(400)]
    mean, spread = torch.stack(ests).mean(), torch.stack(ests).std() / 20
    assert abs(mean - q1 @ k1) < 4 * spread


def naive_method(q, k_quant, v_quant, rk, rv, proj, vbits):
    """float64 restatement of a qjl step: estimated logits over the quantized tokens, exact over the buffer (causal
    for the last Tq), softmax, values dequantized from their codes."""
    B, Hq, Tq, D = q.shape
    H = k_quant.shape[1]
    g = Hq // H
    vq, vs, vm = kivi_ref.quantize_values(v_quant, vbits, 32)
    values = kivi_ref.dequantize_values(vq, vs, vm, v_quant.shape[2], vbits, 32).double()
    out = torch.zeros(B, Hq, Tq, D, dtype=torch.float64)
    M = rk.shape[2]
    for b in range(B):
        est = naive_estimate(q[b], k_quant[b], proj)  # [Hq, Tq, Nq]
        for j in range(Hq):
            exact = q[b, j].double() @ rk[b, j // g].double().T  # [Tq, M]
            exact = exact.masked_fill(torch.arange(M) > torch.arange(M - Tq, M)[:, None], float("-inf"))
            p = torch.softmax(torch.cat([est[j], exact], -1) / D**0.5, -1)
            out[b, j] = p[:, : est.shape[-1]] @ values[b, j // g] + p[:, est.shape[-1] :] @ rv[b, j // g].double()
    return out


@pytest.mark.parametrize("hq, hkv, T, R, vbits", [(8, 2, 70, 32, 2), (4, 4, 100, 16, 4), (9, 3, 20, 32, 2)])
def test_outputs_and_buffer_rule_match_float64(hq, hkv, T, R, vbits):
    torch.manual_seed(T)
    B, D = 2, 64
    layer = make(f"qjl:bits=128,buffer={R},value_bits={vbits}", hq, hkv, D)
    q, (k, v) = torch.randn(B, hq, T, D), rand_kv(B, hkv, T, D)
    torch.testing.assert_close(layer.prefill(q, k, v).double(), naive_attention(q, k, v), atol=1e-5, rtol=1e-5)
    ks, vs = [k], [v]
    for t in (1, 1, 7, 1, 30, 1):  # steps, chunks, buffer blocks
        q1, (k1, v1) = torch.randn(B, hq, t, D), rand_kv(B, hkv, t, D)
        allk, allv = torch.cat(ks + [k1], 2), torch.cat(vs + [v1], 2)
        nq = layer.nq
        want = naive_method(q1, allk[:, :, :nq], allv[:, :, :nq], allk[:, :, nq:], allv[:, :, nq:], layer.proj, vbits)
        out = layer.extend(q1, k1, v1)
        torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=2e-3)  # the fp16 norms
        ks.append(k1), vs.append(v1)
        n = sum(x.shape[2] for x in ks)
        assert layer.nq == n // R * R and layer.rk.shape[2] == n % R and layer.seq_len() == n
    assert layer.info()["sketch_bits"] == 128


def test_nbytes_is_the_layout_and_initial_layers_get_more_bits():
    B, H, D, T = 2, 2, 64, 300
    layer = make("qjl", 8, H, D)  # 256 bits, 2-bit values, buffer 128
    q, (k, v) = torch.randn(B, 8, T, D), rand_kv(B, H, T, D)
    layer.prefill(q, k, v)
    nq, r = 256, 44
    per_quant = 256 // 8 + 2 + D * 2 // 32 * 4 + D // 32 * 2 * 2  # signs, norm, value codes, value scale and min
    assert layer.nbytes() == B * H * (nq * per_quant + r * 2 * D * 4) + D * 256 * 4  # + the projection
    assert layer.nbytes() < 2 * B * H * T * D * 4 / 2  # fp32 K and V; the buffer and projection weigh at 300 tokens
    assert make("qjl", layer=3).sketch_bits == 512
    assert set(layer.decode_fns(torch.randn(B, 8, 1, D))) == {"attention", "score"}


def test_bad_parameters_fail_on_construction():
    for spec, name in [("qjl:bits=100", "bits"), ("qjl:initial_bits=8", "initial_bits"), ("qjl:value_bits=3",
                       "value_bits"), ("qjl:buffer=0", "buffer")]:
        with pytest.raises(ParamError) as e:
            parse_method(spec)
        assert e.value.name == name
    with pytest.raises(KVBenchError, match="multiple of 32"):
        make("qjl", d=48)


def test_through_the_bridge_on_a_tiny_model():
    from kvbench.bridge import attach, with_cache
    from test_kivi import token_identical_to_full

    model, ids, full = token_identical_to_full("qjl:buffer=4096")  # everything stays in the buffer
    cache = attach(model, parse_method("qjl:buffer=32"))
    out = model.generate(ids, **with_cache(model, cache), max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 108) and cache.get_seq_length() == 107
    assert cache.nbytes() < full.nbytes()
