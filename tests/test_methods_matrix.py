"""Every registered method, in a mild and a harsh setting (tests/default_methods.py), through the interface contract:
inside a tiny transformers model (prefill, greedy decode, a question chunk) and as one layer fed the short query tail
the kernel and memory suites use. A new method is tested here by being registered."""

import pytest
import torch

from kvbench import LayerSpec, parse_method
from kvbench.registry import available_methods
from default_methods import SETTINGS, matrix

CASES = matrix(list(available_methods()))
FREES = ("eviction", "quantization", "window")  # families that hold fewer bytes than full


def test_every_built_in_method_has_settings():
    import kvbench.methods  # noqa: F401  (the built-ins)
    from kvbench.registry import _REGISTRY

    built_in = {n for n, c in _REGISTRY.items() if c.__module__.startswith("kvbench.methods.")}
    missing = built_in - set(SETTINGS)
    assert not missing, f"add a mild and a harsh setting to tests/default_methods.py for {missing}"


def check_attended(cache, n, B, H):
    a = cache.attended()
    if a is not None:
        assert a.dtype == torch.int64 and a.shape[:2] == (B, H) and a.shape[2] <= n
        assert int(a.min()) >= -1 and int(a.max()) < n


def run(model, ids, method):
    """Prefill, 6 greedy tokens, the query-agnostic protocol's question chunk, one more step: (cache, logits)."""
    from kvbench.bridge import attach, with_cache

    cache = attach(model, method)
    out = model.generate(ids, **with_cache(model, cache), max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 106) and cache.get_seq_length() == 105
    with torch.no_grad():
        logits = model(torch.randint(0, 1000, (2, 5)), **with_cache(model, cache)).logits
        logits = torch.cat([logits, model(torch.randint(0, 1000, (2, 1)), **with_cache(model, cache)).logits], 1)
    return cache, logits


@pytest.fixture(scope="module")
def tiny():
    from test_kivi import tiny_model

    model = tiny_model()
    ids = torch.randint(0, 1000, (2, 100))
    full, _ = run(model, ids, parse_method("full"))
    return model, ids, full.nbytes()


@pytest.mark.parametrize("spec", [s for _, s in CASES], ids=[i for i, _ in CASES])
def test_in_a_tiny_model(tiny, spec):
    model, ids, full_bytes = tiny
    method = parse_method(spec)
    assert 0 < method.budget_fraction(100) <= 1
    cache, logits = run(model, ids, method)
    assert torch.isfinite(logits).all() and cache.get_seq_length() == 111
    for layer in cache.layer_caches():
        check_attended(layer, 111, 2, 3)
        assert isinstance(layer.info(), dict) and layer.seq_len() == 111
    assert cache.nbytes() > 0
    if type(method).family in FREES and spec in (s[1] for s in SETTINGS.values()):
        assert cache.nbytes() < full_bytes, "the harsh setting holds fewer bytes than full"


def one_layer(spec, device, dtype, B=2, Hq=9, H=3, D=64, T=200):
    """One layer fed the suites' short query tail (4 queries), then decode closures and a step."""
    torch.manual_seed(0)
    layer = parse_method(spec).make_layer(LayerSpec(5, 30, Hq, H, D, dtype, torch.device(device)))
    q, k, v = (torch.randn(B, h, t, D, device=device).to(dtype) for h, t in ((Hq, 4), (H, T), (H, T)))
    out = layer.prefill(q, k, v)  # the kernel and memory suites' prefill: only the last 4 queries
    assert out.shape == (B, Hq, 4, D) and torch.isfinite(out).all()
    assert layer.nbytes() > 0 and layer.seq_len() == T
    q1 = torch.randn(B, Hq, 1, D, device=device).to(dtype)
    for name, fn in layer.decode_fns(q1).items():
        if name == "attention":
            got = fn()  # [B, Hq, 1, D] or [B, Hq, D]
            assert got.numel() == B * Hq * D and torch.isfinite(got).all()
        else:
            fn()
    floor = layer.decode_bytes()
    assert floor is None or 0 < floor <= layer.nbytes() + B * Hq * D * 4
    out = layer.extend(q1, *(torch.randn(B, H, 1, D, device=device).to(dtype) for _ in range(2)))
    assert out.shape == (B, Hq, 1, D) and out.dtype == dtype and torch.isfinite(out).all()
    check_attended(layer, T + 1, B, H)


@pytest.mark.parametrize("spec", [s for _, s in CASES], ids=[i for i, _ in CASES])
def test_one_layer_with_a_short_query_tail(spec):
    one_layer(spec, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", [s for _, s in CASES], ids=[i for i, _ in CASES])
def test_one_layer_on_gpu(spec, dtype):
    one_layer(spec, "cuda", dtype, B=2, Hq=32, H=8, D=128, T=3000)
