"""quest: page bounds against float64 loops, the pages chosen and every output against float64 attention over them,
dense layers and full budgets token-identical to full, nbytes the layout."""

import pytest
import torch

from kvbench import LayerSpec, ParamError, parse_method
from kvbench.methods.quest import page_bounds_ref
from oracles import naive_attention, rand_kv


def make(spec, hq=8, hkv=2, d=32, layer=5):
    return parse_method(spec).make_layer(LayerSpec(layer, 8, hq, hkv, d, torch.float32, torch.device("cpu")))


def naive_bounds(q, k, n, page):
    """float64 loops: q [Hq, D], k [Hkv, n, D] -> [Hkv, P]: per page, the sum over the KV head's query heads of
    sum_i max(q_i max_i, q_i min_i) over the page's keys."""
    Hq, D = q.shape
    H = k.shape[0]
    g, P = Hq // H, -(-n // page)
    out = torch.zeros(H, P, dtype=torch.float64)
    for h in range(H):
        for p in range(P):
            keys = k[h, p * page : min(n, (p + 1) * page)].double()
            mx, mn = keys.amax(0), keys.amin(0)
            for j in range(h * g, (h + 1) * g):
                qj = q[j].double()
                out[h, p] += torch.maximum(qj * mx, qj * mn).sum()
    return out


@pytest.mark.parametrize("hq, hkv, page, budget", [(8, 2, 16, 48), (4, 4, 8, 40), (9, 3, 16, 0.3), (8, 1, 4, 21),
                                                    (8, 2, 16, 8)])
def test_bounds_selection_and_outputs_match_float64(hq, hkv, page, budget):
    torch.manual_seed(page + hq)
    B, T, D = 2, 100, 32
    layer = make(f"quest:budget={budget},page={page}", hq, hkv, D)
    q, k, v = torch.randn(B, hq, T, D), *rand_kv(B, hkv, T, D)
    torch.testing.assert_close(layer.prefill(q, k, v).double(), naive_attention(q, k, v), atol=1e-5, rtol=1e-5)
    ks, vs = [k], [v]
    for step in range(20):  # crosses page boundaries
        q1, (k1, v1) = torch.randn(B, hq, 1, D), rand_kv(B, hkv, 1, D)
        ks.append(k1), vs.append(v1)
        allk, allv = torch.cat(ks, 2), torch.cat(vs, 2)
        n = allk.shape[2]
        out = layer.extend(q1, k1, v1)
        P = -(-n // page)
        K = min(P, max(3, int(budget if budget >= 1 else -(-budget * n // 1)) // page))  # 3 pages at the least
        for b in range(B):
            bounds = naive_bounds(q1[b, :, 0], allk[b], n, page)
            torch.testing.assert_close(page_bounds_ref(q1[b : b + 1, :, 0], layer.meta[b : b + 1, :, :P]).double()[0],
                                       bounds, atol=1e-4, rtol=1e-5)
            g = hq // hkv
            for h in range(hkv):
                heads = range(h * g, (h + 1) * g)
                scores = torch.stack([(q1[b, j, 0].double() @ allk[b, h].double().T) for j in heads])
                for p in range(P):  # an upper bound of the group's summed q.k on every token of the page
                    assert bounds[h, p] >= scores[:, p * page : (p + 1) * page].sum(0).max() - 1e-9
                want_pages = set(bounds[h, : P - 1].topk(K - 1).indices.tolist()) | {P - 1}
                pos = layer.attended()[b, h]
                assert set((pos // page).tolist()) == want_pages and len(set(pos.tolist())) == len(pos)
                sel = pos.sort().values
                want = naive_attention(q1[b : b + 1, h * g : (h + 1) * g], allk[b : b + 1, h : h + 1, sel],
                                       allv[b : b + 1, h : h + 1, sel])
                torch.testing.assert_close(out[b : b + 1, h * g : (h + 1) * g].double(), want, atol=1e-5, rtol=1e-5)
        assert layer.info()["pages_attended"] == K and layer.seq_len() == n and layer.info()["topk"] == "torch"


def test_nbytes_is_the_layout_and_dense_layers_are_full():
    torch.manual_seed(1)
    B, T, D = 2, 100, 32
    q, k, v = torch.randn(B, 8, T, D), *rand_kv(B, 2, T, D)
    layer = make("quest:budget=32", d=D)
    layer.prefill(q, k, v)
    assert layer.nbytes() == 2 * B * T * 2 * D * 4 + B * 2 * 7 * 2 * D * 4  # K, V; max and min per page of 16
    first, full = make("quest:budget=32", d=D, layer=1), make("full", d=D)
    first.prefill(q, k, v), full.prefill(q, k, v)
    for _ in range(3):
        q1, (k1, v1) = torch.randn(B, 8, 1, D), rand_kv(B, 2, 1, D)
        torch.testing.assert_close(first.extend(q1, k1, v1), full.extend(q1, k1, v1))
        layer.extend(q1, k1, v1)
    # 3 pages at the least: 2 + the newest (103 = 6*16+7)
    assert first.attended() is None and layer.attended().shape == (B, 2, 32 + 7)
    # the suite's stage closures run on the current state
    fns = layer.decode_fns(torch.randn(B, 8, 1, D))
    assert set(fns) == {"attention", "score", "select", "attend"} and fns["score"]().shape == (B, 2, 7)
    assert layer.decode_bytes() == B * 2 * (7 * 2 * D * 4 + 39 * 2 * D * 4)


def test_bad_parameters_fail_on_construction():
    for spec, name in [("quest:budget=0", "budget"), ("quest:page=0", "page"),
                       ("quest:dense_layers=-1", "dense_layers"), ("quest:impl=cuda", "impl")]:
        with pytest.raises(ParamError) as e:
            parse_method(spec)
        assert e.value.name == name


def test_through_the_bridge_on_a_tiny_model():
    from kvbench.bridge import attach, with_cache
    from test_kivi import token_identical_to_full

    model, ids, full = token_identical_to_full("quest:budget=4096")
    _, _, _ = token_identical_to_full("quest:budget=16,dense_layers=2")  # both tiny layers dense
    cache = attach(model, parse_method("quest:budget=32,page=8,dense_layers=0"))
    out = model.generate(ids, **with_cache(model, cache), max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 108) and cache.get_seq_length() == 107
    assert all(c.attended().shape[-1] <= 32 for c in cache.layer_caches())
