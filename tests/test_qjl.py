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


def naive_outlier_estimate(q, k, proj, o, group, mo):
    """float64, token by token: per group of `group` keys the o channels of largest norm are the outliers; the
    estimate is sqrt(pi/2)/m ||k_i|| <q_i S, sign(k_i S)> + sqrt(pi/2)/mo ||k_o|| <q_o S', sign(k_o S')> [Hq, Tq, N]."""
    Hq, Tq, _ = q.shape
    H, N, D = k.shape
    g, m, c = Hq // H, proj.shape[1], math.sqrt(math.pi / 2)
    p = proj.double()
    out = torch.zeros(Hq, Tq, N, dtype=torch.float64)
    for h in range(H):
        for lo in range(0, N, group):
            kk = k[h, lo : lo + group].double()
            mask = torch.zeros(D, dtype=torch.float64)
            mask[kk.norm(dim=0).topk(o).indices] = 1
            k_in, k_out = kk * (1 - mask), kk * mask
            for j in range(h * g, (h + 1) * g):
                qq = q[j].double()
                est_in = ((qq * (1 - mask)) @ p) @ torch.sign(k_in @ p).T * c / m * k_in.norm(dim=-1)
                est_out = ((qq * mask) @ p[:, :mo]) @ torch.sign(k_out @ p[:, :mo]).T * c / mo * k_out.norm(dim=-1)
                out[j, :, lo : lo + group] = est_in + est_out
    return out


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


def test_outlier_estimator_matches_float64_and_is_unbiased():
    from kvbench.methods.qjl import outlier_scores_ref, quantize_keys

    proj = sketch(64, 128, 42, "cpu")
    q, k = torch.randn(2, 6, 3, 64), torch.randn(2, 2, 96, 64) * (1 + 9 * (torch.rand(64) < 0.1))  # a few big channels
    keys = quantize_keys(k, proj, 8, 32, 64)
    assert keys.idx.shape == (2, 2, 3, 8) and keys.out_signs.shape == (2, 2, 96, 8)
    est = outlier_scores_ref(q, proj, keys)
    for b in range(2):
        torch.testing.assert_close(est[b].double(), naive_outlier_estimate(q[b], k[b], proj, 8, 32, 64), atol=2e-2,
                                   rtol=2e-3)  # fp16 norms
    # unbiased: over many projections the mean estimate approaches q.k
    q1, k1 = torch.randn(1, 1, 64), torch.randn(1, 32, 64) * (1 + 9 * (torch.arange(64) < 4))
    ests = torch.stack([naive_outlier_estimate(q1, k1, torch.randn(64, 256), 4, 32, 128)[0, 0] for _ in range(300)])
    spread = ests.std(0) / 300**0.5
    assert ((ests.mean(0) - (k1[0].double() @ q1[0, 0].double())).abs() < 4 * spread + 1e-9).float().mean() > 0.9
    # with outliers the estimate is closer to q.k than one sketch of the whole key, for keys with outlier channels
    plain = torch.stack([naive_estimate(q1, k1, torch.randn(64, 256))[0, 0] for _ in range(300)])
    assert ests.std(0).mean() < plain.std(0).mean()


def naive_method(q, k_quant, v_quant, rk, rv, proj, vbits, outliers=(0, 32, 0)):
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
        if outliers[0]:
            est = naive_outlier_estimate(q[b], k_quant[b], proj, *outliers)  # [Hq, Tq, Nq]
        else:
            est = naive_estimate(q[b], k_quant[b], proj)
        for j in range(Hq):
            exact = q[b, j].double() @ rk[b, j // g].double().T  # [Tq, M]
            exact = exact.masked_fill(torch.arange(M) > torch.arange(M - Tq, M)[:, None], float("-inf"))
            p = torch.softmax(torch.cat([est[j], exact], -1) / D**0.5, -1)
            out[b, j] = p[:, : est.shape[-1]] @ values[b, j // g] + p[:, est.shape[-1] :] @ rv[b, j // g].double()
    return out


@pytest.mark.parametrize("hq, hkv, T, R, vbits, outliers", [(8, 2, 70, 32, 2, 8), (4, 4, 100, 16, 4, 3),
                                                              (9, 3, 20, 32, 2, 0), (8, 2, 70, 32, 2, 0)])
def test_outputs_and_buffer_rule_match_float64(hq, hkv, T, R, vbits, outliers):
    torch.manual_seed(T)
    B, D = 2, 64
    layer = make(f"qjl:bits=128,buffer={R},value_bits={vbits},outliers={outliers},group={min(R, 32)},outlier_bits=64",
                 hq, hkv, D)
    spec = (outliers, min(R, 32), 64)
    q, (k, v) = torch.randn(B, hq, T, D), rand_kv(B, hkv, T, D)
    torch.testing.assert_close(layer.prefill(q, k, v).double(), naive_attention(q, k, v), atol=1e-5, rtol=1e-5)
    ks, vs = [k], [v]
    for t in (1, 1, 7, 1, 30, 1):  # steps, chunks, buffer blocks
        q1, (k1, v1) = torch.randn(B, hq, t, D), rand_kv(B, hkv, t, D)
        allk, allv = torch.cat(ks + [k1], 2), torch.cat(vs + [v1], 2)
        nq = layer.nq
        want = naive_method(q1, allk[:, :, :nq], allv[:, :, :nq], allk[:, :, nq:], allv[:, :, nq:], layer.proj, vbits,
                            spec)
        out = layer.extend(q1, k1, v1)
        torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=2e-3)  # the fp16 norms
        ks.append(k1), vs.append(v1)
        n = sum(x.shape[2] for x in ks)
        assert layer.nq == n // R * R and layer.rk.shape[2] == n % R and layer.seq_len() == n
    assert layer.info()["sketch_bits"] == 128 and layer.info()["outlier_bits"] == (64 if outliers else 0)


def test_nbytes_is_the_layout_and_initial_layers_get_more_bits():
    B, H, D, T = 2, 2, 64, 300
    layer = make("qjl", 8, H, D)  # 256 bits, 2-bit values, buffer 128
    q, (k, v) = torch.randn(B, 8, T, D), rand_kv(B, H, T, D)
    layer.prefill(q, k, v)
    nq, r = 256, 44
    per_quant = 256 // 8 + 2 + D * 2 // 32 * 4 + D // 32 * 2 * 2  # signs, norm, value codes, value scale and min
    per_quant += 256 // 8 + 2  # the outlier part's signs (256 bits) and norm
    per_group = 8  # the 8 outlier channel indices of each group of 32 tokens, uint8
    want = B * H * (nq * per_quant + nq // 32 * per_group + r * 2 * D * 4) + D * 256 * 4  # + the projection
    assert layer.nbytes() == want
    plain = make("qjl:outliers=0", 8, H, D)
    plain.prefill(q, k, v)
    assert plain.nbytes() == want - B * H * (nq * 34 + nq // 32 * 8)
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
