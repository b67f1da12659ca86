"""pyramidkv: the per-layer budgets (KVCache-Factory's arithmetic), the kept sets against snapkv's float64 votes at
each layer's budget, memory, and the method inside a transformers model."""

import pytest
import torch

from kvbench import LayerSpec, ParamError, parse_method
from test_snapkv import check_kept


def spec(layer, n_layers=8, hq=8, hkv=2, d=32):
    return LayerSpec(layer, n_layers, hq, hkv, d, torch.float32, torch.device("cpu"))


def factory_budget(C, w, T, layer, n_layers, beta):
    """PyramidKVCluster.update_kv's arithmetic, restated: prompt tokens kept at this layer, window included."""
    if T <= C:
        return T
    if T < 2 * (C - w):
        return C
    lo = (C - w) // beta
    hi = 2 * (C - w) - lo
    if hi >= T - w:
        hi = T - w
        lo = 2 * (C - w) - hi
    return w + hi - layer * ((hi - lo) // (n_layers - 1))


@pytest.mark.parametrize("C, w, T, beta, L", [(128, 8, 1000, 20, 30), (64, 16, 130, 20, 8), (100, 32, 150, 5, 4),
                                              (64, 8, 60, 20, 8), (300, 8, 2000, 1, 12)])
def test_budgets_follow_the_pyramid_and_total_about_snapkvs(C, w, T, beta, L):
    m = parse_method(f"pyramidkv:capacity={C},window={w},beta={beta}")
    got = [m.prompt_capacity(T, spec(layer, L)) for layer in range(L)]
    assert got == [min(T, factory_budget(C, w, T, layer, L, beta)) for layer in range(L)]
    assert got == sorted(got, reverse=True)  # shrinking with depth
    snap = min(C, T)
    assert snap * L <= sum(got) <= snap * L + L * (L - 1) / 2  # the step is rounded down, as in their code


@pytest.mark.parametrize("layer", [0, 3, 7])
def test_kept_sets_are_snapkv_votes_at_the_layer_budget(layer):
    torch.manual_seed(layer)
    B, T, D = 2, 120, 32
    m = parse_method("pyramidkv:capacity=40,window=8,kernel=5")
    cache = m.make_layer(spec(layer))
    q, k, v = torch.randn(B, 8, T, D), torch.randn(B, 2, T, D), torch.randn(B, 2, T, D)
    cache.prefill(q, k, v)
    C = m.prompt_capacity(T, spec(layer))
    check_kept(cache, q, k, 8, 5, "max", C)
    assert cache.nbytes() == 2 * B * 2 * C * D * 4 + B * 2 * C * 8  # kept K and V, plus their positions
    if layer == 7:
        assert C < 40  # the top layer keeps less than snapkv would


def test_bad_parameters_fail_on_construction():
    with pytest.raises(ParamError) as e:
        parse_method("pyramidkv:beta=0")
    assert e.value.name == "beta"


def test_through_the_bridge_on_a_tiny_model():
    from kvbench.bridge import attach, with_cache
    from test_kivi import token_identical_to_full

    model, ids, full = token_identical_to_full("pyramidkv:capacity=4096")
    cache = attach(model, parse_method("pyramidkv:capacity=40,window=8"))
    with torch.no_grad():
        model(ids, **with_cache(model, cache))
        logits = model(torch.randint(0, 1000, (2, 1)), **with_cache(model, cache)).logits
    assert torch.isfinite(logits).all()
    kept = [c.positions.shape[-1] for c in cache.layer_caches()]
    assert kept == [71, 9]  # two layers, 100 tokens: 8 + 63 and 8 + 63 - 62; the mean is snapkv's 40
