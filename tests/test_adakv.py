"""adakv: the allocation against a float64 restatement (safeguard, then one top-k across heads), ragged storage that
holds only what each head keeps, the varlen attention against float64 per head, and the tiny model."""

import pytest
import torch

from kvbench import LayerSpec, ParamError, parse_method
from oracles import naive_attention
from test_snapkv import naive_votes


def make(spec, hq=8, hkv=4, d=32):
    return parse_method(spec).make_layer(LayerSpec(0, 1, hq, hkv, d, torch.float32, torch.device("cpu")))


def naive_allocation(votes, n, alpha):
    """votes [H, N] float64 -> kept index sets per head: each head's own top floor(alpha n), then the best of the
    rest across heads until H * n are kept."""
    H, N = votes.shape
    safe = int(alpha * n)
    kept = [set(votes[h].topk(safe).indices.tolist()) for h in range(H)]
    rest = sorted(((votes[h, t].item(), h, t) for h in range(H) for t in range(N) if t not in kept[h]), reverse=True)
    for _, h, t in rest[: H * n - H * safe]:
        kept[h].add(t)
    return kept


def prompt(B, hq, hkv, T, D, seed):
    """Keys where head 0 attends to a few tokens and the last head to many, so the heads' budgets differ."""
    torch.manual_seed(seed)
    q, k, v = torch.randn(B, hq, T, D), torch.randn(B, hkv, T, D), torch.randn(B, hkv, T, D)
    k[:, 0, 5:9] += 3 * q[:, 0, -1:]  # a concentrated head
    k[:, -1] *= 0.1  # a flat one
    return q, k, v


@pytest.mark.parametrize("alpha, hq, hkv", [(0.2, 8, 4), (0.0, 4, 4), (1.0, 8, 2), (0.5, 9, 3)])
def test_allocation_storage_and_outputs_match_float64(alpha, hq, hkv):
    B, T, D, C, w = 2, 100, 32, 30, 8
    q, k, v = prompt(B, hq, hkv, T, D, seed=int(alpha * 10) + hq)
    layer = make(f"adakv:capacity={C},window={w},kernel=1,pool=avg,alpha={alpha}", hq, hkv, D)
    out = layer.prefill(q, k, v)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v), atol=1e-5, rtol=1e-5)
    counts = layer.counts()
    kept = []
    for b in range(B):
        want = naive_allocation(naive_votes(q[b], k[b], w, 1, "avg"), C - w, alpha)
        kept.append([sorted(s) for s in want])
        for h in range(hkv):
            got = layer.fpos[layer.offsets[b * hkv + h] : layer.offsets[b * hkv + h + 1]].tolist()
            assert got == sorted(want[h]), (b, h)
            assert torch.equal(layer.fk[layer.offsets[b * hkv + h] : layer.offsets[b * hkv + h + 1]], k[b, h, got])
    assert counts.sum(-1).tolist() == [hkv * (C - w)] * B  # the layer's budget, spread over its heads
    if alpha < 1:
        assert counts.max() > counts.min()  # really ragged
    else:
        assert (counts == C - w).all()  # alpha 1: every head its own top n, snapkv's allocation
    ragged = 2 * counts.sum().item() * D * 4 + counts.sum().item() * 8 + (B * hkv + 1) * 8
    assert layer.nbytes() == ragged + 2 * B * hkv * w * D * 4  # flat K, V, positions, offsets; window K and V
    ks, vs, n = [k], [v], T
    for t in (1, 1, 5, 1):  # steps and a question chunk: each head over its own tokens
        q1, k1, v1 = torch.randn(B, hq, t, D), torch.randn(B, hkv, t, D), torch.randn(B, hkv, t, D)
        ks.append(k1), vs.append(v1)
        n += t
        out = layer.extend(q1, k1, v1)
        allk, allv = torch.cat(ks, 2), torch.cat(vs, 2)
        g = hq // hkv
        for b in range(B):
            for h in range(hkv):
                pos = torch.tensor(kept[b][h] + list(range(T - w, n)), dtype=torch.long)
                want = naive_attention(q1[b : b + 1, h * g : (h + 1) * g], allk[b : b + 1, h : h + 1, pos],
                                       allv[b : b + 1, h : h + 1, pos])
                torch.testing.assert_close(out[b : b + 1, h * g : (h + 1) * g].double(), want, atol=1e-5, rtol=1e-5)
                att = layer.attended()[b, h]
                assert sorted(att[att >= 0].tolist()) == pos.tolist()
    assert layer.seq_len() == n
    fn = layer.decode_fns(q1[:, :, -1:])["attention"]
    torch.testing.assert_close(fn(), out[:, :, -1:], atol=1e-5, rtol=1e-5)


def test_capacity_beyond_the_context_is_full():
    q, k, v = prompt(1, 8, 4, 50, 32, seed=3)
    layer, full = make("adakv:capacity=4096"), make("full")
    torch.testing.assert_close(layer.prefill(q, k, v), full.prefill(q, k, v))
    for _ in range(4):
        q, k, v = torch.randn(1, 8, 1, 32), torch.randn(1, 4, 1, 32), torch.randn(1, 4, 1, 32)
        torch.testing.assert_close(layer.extend(q, k, v), full.extend(q, k, v))
    assert layer.nbytes() >= full.nbytes() - 2 * 4 * 200 * 32 * 4  # everything kept (full has 200 spare slots)


def test_bad_parameters_fail_on_construction():
    for spec, name in [("adakv:alpha=1.5", "alpha"), ("adakv:capacity=0", "capacity")]:
        with pytest.raises(ParamError) as e:
            parse_method(spec)
        assert e.value.name == name


def test_through_the_bridge_on_a_tiny_model():
    from kvbench.bridge import attach, with_cache
    from test_kivi import token_identical_to_full

    model, ids, full = token_identical_to_full("adakv:capacity=4096")
    cache = attach(model, parse_method("adakv:capacity=0.25,window=8"))
    out = model.generate(ids, **with_cache(model, cache), max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 108) and cache.get_seq_length() == 107
    with torch.no_grad():
        logits = model(torch.randint(0, 1000, (2, 5)), **with_cache(model, cache)).logits
    assert torch.isfinite(logits).all() and cache.get_seq_length() == 112
    assert cache.nbytes() < full.nbytes()  # both grow by the same headroom after the prompt
    assert any(len(set(c.counts().flatten().tolist())) > 1 for c in cache.layer_caches())  # ragged in the model
