"""doublesparse: the prompt calibration and a calibration file against float64 restatements, label scores, the tokens
chosen and every output against float64 attention, nbytes the layout, the tiny model."""

import json

import pytest
import torch

from kvbench import KVBenchError, LayerSpec, ParamError, parse_method
from kvbench.methods.doublesparse import label_scores_ref
from oracles import naive_attention, rand_kv


def make(spec, hq=8, hkv=2, d=32, layer=0):
    return parse_method(spec).make_layer(LayerSpec(layer, 2, hq, hkv, d, torch.float32, torch.device("cpu")))


def naive_channels(q, k, r):
    """float64 loops: q [Hq, Tq, D], k [Hkv, T, D] -> per KV head the r channels of largest
    sum_j mean_t |q_jtc k_tc| (the last Tq positions)."""
    Hq, Tq, D = q.shape
    H, T = k.shape[0], k.shape[1]
    g = Hq // H
    out = []
    for h in range(H):
        stat = torch.zeros(D, dtype=torch.float64)
        for j in range(h * g, (h + 1) * g):
            stat += (q[j].double() * k[h, T - Tq :].double()).abs().mean(0)
        out.append(set(stat.topk(r).indices.tolist()))
    return out


def naive_quantized(x, bits):
    """float64: the authors' pseudo_quantize of each row of x (min-max, 2^bits - 1 levels), dequantized."""
    x = x.double()
    lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return ((x - lo) * (2**bits - 1) / span).round() * span / (2**bits - 1) + lo


@pytest.mark.parametrize("hq, hkv, r, budget, bits", [(8, 2, 8, 20, 16), (4, 4, 4, 0.2, 16), (9, 3, 32, 10, 16),
                                                      (8, 2, 8, 20, 4), (9, 3, 32, 10, 4), (4, 4, 6, 0.2, 8)])
def test_channels_selection_and_outputs_match_float64(hq, hkv, r, budget, bits):
    torch.manual_seed(r + hq)
    B, T, D = 2, 90, 32
    layer = make(f"doublesparse:budget={budget},channels={r},label_bits={bits}", hq, hkv, D)
    q, (k, v) = torch.randn(B, hq, T, D), rand_kv(B, hkv, T, D)
    k[..., 3] *= 5  # a heavy channel
    torch.testing.assert_close(layer.prefill(q, k, v).double(), naive_attention(q, k, v), atol=1e-5, rtol=1e-5)
    for b in range(B):
        assert [set(c.tolist()) for c in layer.channels[b]] == naive_channels(q[b], k[b], r)
    ks, vs = [k], [v]
    g = hq // hkv
    for _ in range(6):
        q1, (k1, v1) = torch.randn(B, hq, 1, D), rand_kv(B, hkv, 1, D)
        ks.append(k1), vs.append(v1)
        allk, allv = torch.cat(ks, 2), torch.cat(vs, 2)
        n = allk.shape[2]
        out = layer.extend(q1, k1, v1)
        K = min(n, int(budget) if budget >= 1 else -(-int(budget * 10) * n // 10))
        for b in range(B):
            for h in range(hkv):
                ch = layer.channels[b, h]
                if bits == 16:
                    est = sum(allk[b, h][:, ch].double() @ q1[b, j, 0, ch].double() for j in range(h * g, (h + 1) * g))
                else:  # the stored codes (checked against the keys below) times the query's quantized labels
                    codes = layer.labels[b, h, :n]
                    codes = torch.stack([codes & 15, codes >> 4], -1).flatten(-2) if bits == 4 else codes
                    step, low = layer.meta[b, h, :n].double().unbind(-1)
                    labels = codes.double() * step[:, None] + low[:, None]
                    err = (labels - allk[b, h][:, ch].double()).abs().max(-1).values
                    fp16 = 1e-3 * (low.abs() + (2**bits - 1) * step)  # what rounding step and min to fp16 moves
                    assert (err <= step / 2 + fp16).all()  # within half a level
                    assert ((labels - naive_quantized(allk[b, h][:, ch], bits)).abs() > 1e-2).float().mean() < 0.02
                    est = sum(labels @ naive_quantized(q1[b, j, 0, ch], bits) for j in range(h * g, (h + 1) * g))
                meta = None if layer.meta is None else layer.meta[b : b + 1, :, :n]
                got = label_scores_ref(q1[b : b + 1, :, 0], layer.labels[b : b + 1, :, :n], layer.channels[b : b + 1],
                                       meta, bits)[0, h]
                tol = 1e-4 if bits == 16 else 2e-2  # the fp16 step and minimum of each token
                torch.testing.assert_close(got.double(), est, atol=tol, rtol=tol)
                pos = layer.attended()[b, h]
                assert set(pos.tolist()) == set(got.topk(K).indices.tolist())
                sel = pos.sort().values
                want = naive_attention(q1[b : b + 1, h * g : (h + 1) * g], allk[b : b + 1, h : h + 1, sel],
                                       allv[b : b + 1, h : h + 1, sel])
                torch.testing.assert_close(out[b : b + 1, h * g : (h + 1) * g].double(), want, atol=1e-5, rtol=1e-5)
    assert layer.info()["calibration"] == "prompt" and layer.info()["label_bits"] == bits
    assert layer.info()["topk"] == "torch"  # the CPU path: torch.topk, not kernels/topk_select.py


def test_calibration_file_in_the_authors_format(tmp_path):
    D, hq, hkv = 32, 4, 2
    ranking = [list(range(D)), list(range(D))[::-1], [5, 7] + [c for c in range(D) if c not in (5, 7)],
               [7, 5] + [c for c in range(D) if c not in (5, 7)]]  # per query head, most important first
    path = tmp_path / "channels.json"
    path.write_text(json.dumps({"model.layers.1.self_attn.qk_proj": ranking}))
    layer = make(f"doublesparse:channels=2,calibration={path}", hq, hkv, D, layer=1)
    q, (k, v) = torch.randn(1, hq, 40, D), rand_kv(1, hkv, 40, D)
    layer.prefill(q, k, v)
    assert set(layer.channels[0, 1].tolist()) == {5, 7}  # the two heads of KV head 1 agree
    assert set(layer.channels[0, 0].tolist()) <= set(range(D)) and layer.info()["calibration"] == str(path)
    with pytest.raises(KVBenchError, match="no entry"):
        make(f"doublesparse:calibration={path}", hq, hkv, D, layer=0).prefill(q, k, v)
    with pytest.raises(KVBenchError, match="not found"):
        parse_method(f"doublesparse:calibration={tmp_path / 'missing.json'}")


def test_nbytes_is_the_layout():
    B, T, D = 2, 100, 64
    q, (k, v) = torch.randn(B, 8, T, D), rand_kv(B, 2, T, D)
    for bits, label_bytes in ((16, 16 * 4), (8, 16 + 4), (4, 8 + 4)):  # per token: fp32 labels, or codes + step, min
        layer = make(f"doublesparse:label_bits={bits}", d=D)
        layer.prefill(q, k, v)
        assert layer.nbytes() == 2 * B * T * 2 * D * 4 + B * 2 * T * label_bytes + B * 2 * 16 * 8  # + channels
        layer.extend(torch.randn(B, 8, 1, D), *rand_kv(B, 2, 1, D))
        assert layer.attended().shape == (B, 2, 7)  # ceil(101 / 16)
        assert layer.decode_bytes() == B * 2 * (101 * label_bytes + 7 * 2 * D * 4)


def test_bad_parameters_fail_on_construction():
    for spec, name in [("doublesparse:budget=0", "budget"), ("doublesparse:channels=0", "channels"),
                       ("doublesparse:impl=x", "impl"), ("doublesparse:label_bits=2", "label_bits"),
                       ("doublesparse:channels=7", "channels")]:
        with pytest.raises(ParamError) as e:
            parse_method(spec)
        assert e.value.name == name


def test_through_the_bridge_on_a_tiny_model():
    from kvbench.bridge import attach, with_cache
    from test_kivi import token_identical_to_full

    model, ids, full = token_identical_to_full("doublesparse:budget=4096")
    cache = attach(model, parse_method("doublesparse:budget=0.2"))
    out = model.generate(ids, **with_cache(model, cache), max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 108) and cache.get_seq_length() == 107
    assert all(c.attended().shape[-1] == 22 for c in cache.layer_caches())  # ceil(0.2 * 107)
