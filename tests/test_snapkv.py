"""snapkv against a naive float64 reference: the kept token set per KV head and every output, across GQA ratios,
pooling kinds, token and fraction capacities, short query tails and question chunks; memory really freed; the method
inside a transformers model."""

import pytest
import torch

from kvbench import LayerSpec, ParamError, parse_method
from oracles import naive_attention


def make(spec, hq, hkv, d=32):
    return parse_method(spec).make_layer(LayerSpec(0, 1, hq, hkv, d, torch.float32, torch.device("cpu")))


def naive_votes(q, k, window, kernel, pool):
    """float64 loops: q [Hq, Tq, D] (the last Tq positions), k [Hkv, T, D] -> pooled votes [Hkv, T - w]."""
    Hq, Tq, D = q.shape
    H, T = k.shape[0], k.shape[1]
    g, w = Hq // H, min(window, Tq)
    votes = torch.zeros(H, T - w, dtype=torch.float64)
    for h in range(H):
        for j in range(h * g, (h + 1) * g):
            for i in range(w):
                pos = T - w + i  # this query's position; it sees keys 0..pos
                s = (k[h, : pos + 1].double() @ q[j, Tq - w + i].double()) / D**0.5
                votes[h] += torch.softmax(s, 0)[: T - w] / g
    pooled = torch.empty_like(votes)
    p = kernel // 2
    for t in range(T - w):
        lo, hi = max(0, t - p), min(T - w, t + p + 1)
        pooled[:, t] = votes[:, lo:hi].amax(1) if pool == "max" else votes[:, lo:hi].sum(1) / kernel
    return pooled


def check_kept(layer, q, k, window, kernel, pool, capacity_tokens):
    """The method's kept prompt positions are the window plus a top-(C - w) set of the naive votes."""
    B, _, T, _ = k.shape
    w = min(window, q.shape[2])
    kept = layer.positions
    assert kept.shape[-1] == min(capacity_tokens, T)
    for b in range(B):
        votes = naive_votes(q[b], k[b], window, kernel, pool)
        for h in range(k.shape[1]):
            pos = kept[b, h].tolist()
            assert pos == sorted(set(pos))
            assert pos[-w:] == list(range(T - w, T))  # the window is always kept
            chosen = torch.tensor(pos[:-w], dtype=torch.long)
            others = torch.ones(T - w, dtype=torch.bool)
            others[chosen] = False
            if others.any() and len(chosen):
                # top set: nothing left out scores above anything chosen (ties, as max-pooling makes, may go either
                # way); and where the reference has no tie at the boundary the sets are the same
                assert votes[h, chosen].min() >= votes[h, others].max() - 1e-6
                ranked = votes[h].sort(descending=True).values
                if ranked[len(chosen) - 1] - ranked[len(chosen)] > 1e-6:
                    assert set(chosen.tolist()) == set(votes[h].topk(len(chosen)).indices.tolist())


CASES = [  # spec, Hq, Hkv, capacity in tokens for T = 120
    ("snapkv:capacity=40,window=8,kernel=5", 4, 4, 40),
    ("snapkv:capacity=40,window=8,kernel=5,pool=avg", 8, 2, 40),
    ("snapkv:capacity=0.3,window=16", 9, 3, 36),
    ("snapkv:capacity=0.5,window=8,kernel=1,pool=avg", 8, 2, 60),
    ("snapkv:capacity=50,window=8,kernel=3", 8, 1, 50),
]


@pytest.mark.parametrize("spec, hq, hkv, cap", CASES)
def test_matches_naive_reference(spec, hq, hkv, cap):
    torch.manual_seed(0)
    B, T, D = 2, 120, 32
    method = parse_method(spec)
    layer = make(spec, hq, hkv, D)
    q, k, v = torch.randn(B, hq, T, D), torch.randn(B, hkv, T, D), torch.randn(B, hkv, T, D)
    k[:, :, 17] *= 4  # a few tokens that stand out
    k[:, :, 60] += q[:, :: hq // hkv, -3]
    out = layer.prefill(q, k, v)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v), atol=1e-5, rtol=1e-5)  # prefill is dense
    check_kept(layer, q, k, method.window, method.kernel, method.pool, cap)
    assert 17 in layer.positions[0, 0].tolist()
    # later steps and a question chunk attend densely over the kept tokens plus everything after the prompt
    idx = layer.positions[..., None].expand(-1, -1, -1, D)
    ks, vs = [k.gather(2, idx)], [v.gather(2, idx)]
    for t in (1, 1, 9, 1):
        q1, k1, v1 = torch.randn(B, hq, t, D), torch.randn(B, hkv, t, D), torch.randn(B, hkv, t, D)
        ks.append(k1), vs.append(v1)
        out = layer.extend(q1, k1, v1)
        torch.testing.assert_close(out.double(), naive_attention(q1, torch.cat(ks, 2), torch.cat(vs, 2)),
                                   atol=1e-5, rtol=1e-5)
    assert layer.seq_len() == T + 12
    attended = layer.attended()
    assert attended.shape == (B, hkv, cap + 12)
    assert torch.equal(attended[..., :cap], layer.positions)  # nothing more is evicted after prefill
    assert attended[0, 0, cap:].tolist() == list(range(T, T + 12))


def test_short_query_tail_uses_the_queries_it_has():
    torch.manual_seed(1)
    B, T, D = 1, 200, 32
    layer = make("snapkv:capacity=50,window=32", 8, 2, D)
    q, k, v = torch.randn(B, 8, 4, D), torch.randn(B, 2, T, D), torch.randn(B, 2, T, D)  # queries of the last 4
    out = layer.prefill(q, k, v)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v), atol=1e-5, rtol=1e-5)
    check_kept(layer, q, k, 32, 7, "max", 50)
    assert layer.positions[0, 0, -4:].tolist() == [196, 197, 198, 199]


def test_memory_is_freed_and_small_or_large_capacities():
    torch.manual_seed(2)
    B, T, D = 2, 300, 64
    q, k, v = torch.randn(B, 8, T, D), torch.randn(B, 2, T, D), torch.randn(B, 2, T, D)
    full = make("full", 8, 2, D)
    full.prefill(q, k, v)
    layer = make("snapkv:capacity=0.2", 8, 2, D)
    layer.prefill(q, k, v)
    assert layer.nbytes() == 2 * B * 60 * 2 * D * 4 + B * 2 * 60 * 8  # kept K and V, plus their positions
    assert layer.nbytes() < full.nbytes() / 4
    # capacity beyond the context keeps everything: the same outputs as full
    everything = make("snapkv:capacity=4096", 8, 2, D)
    everything.prefill(q, k, v)
    q1, k1, v1 = torch.randn(B, 8, 1, D), torch.randn(B, 2, 1, D), torch.randn(B, 2, 1, D)
    torch.testing.assert_close(everything.extend(q1, k1, v1), full.extend(q1, k1, v1))
    # capacity below the window keeps the most recent tokens
    tiny = make("snapkv:capacity=10,window=32", 8, 2, D)
    tiny.prefill(q, k, v)
    assert tiny.positions[1, 1].tolist() == list(range(290, 300))


def test_bad_parameters_fail_on_construction():
    for spec, name in [("snapkv:capacity=0", "capacity"), ("snapkv:capacity=1.5", "capacity"),
                       ("snapkv:kernel=4", "kernel"), ("snapkv:window=0", "window"), ("snapkv:pool=min", "pool")]:
        with pytest.raises(ParamError) as e:
            parse_method(spec)
        assert e.value.name == name


def test_through_the_bridge_on_a_tiny_model():
    from kvbench.bridge import attach, with_cache
    from test_kivi import token_identical_to_full

    model, ids, full = token_identical_to_full("snapkv:capacity=4096")  # keeps everything
    # query-agnostic protocol: the prompt is compressed, then a question chunk arrives and nothing more is evicted
    cache = attach(model, parse_method("snapkv:capacity=0.25,window=16"))
    with torch.no_grad():
        model(ids, **with_cache(model, cache))
        kept = [c.positions.clone() for c in cache.layer_caches()]
        model(torch.randint(0, 1000, (2, 6)), **with_cache(model, cache))
        logits = model(torch.randint(0, 1000, (2, 1)), **with_cache(model, cache)).logits
    assert torch.isfinite(logits).all() and cache.get_seq_length() == 107
    for c, before in zip(cache.layer_caches(), kept):
        assert torch.equal(c.attended()[..., :25], before)
    assert cache.nbytes() < full.nbytes()


@pytest.mark.slow
def test_generates_sensible_text_on_the_embedded_model(embedded):
    from kvbench.bridge import attach, with_cache
    from test_kivi import story_ids

    model, tok = embedded
    ids = story_ids(tok)
    cache = attach(model, parse_method("snapkv:capacity=64"))
    out = model.generate(ids, **with_cache(model, cache), max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    assert all(c.positions.shape[-1] == 64 for c in cache.layer_caches()) and ids.shape[1] > 150
