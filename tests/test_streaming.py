"""streaming: which positions are kept and attended, outputs against a float64 reference, memory, and the method
inside a transformers model."""

from pathlib import Path

import pytest
import torch

from kvbench import LayerSpec, ParamError, parse_method
from oracles import naive_attention


def make(spec, hq=8, hkv=2, d=32):
    return parse_method(spec).make_layer(LayerSpec(0, 1, hq, hkv, d, torch.float32, torch.device("cpu")))


@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("sinks", [0, 4])
def test_kept_positions_and_outputs(hq, hkv, sinks):
    torch.manual_seed(0)
    B, D, W = 2, 32, 16
    layer = make(f"streaming:sinks={sinks},window={W}", hq, hkv, D)
    ks, vs, n = [], [], 0
    for step, t in enumerate([50, 1, 1, 5, 1, 20, 1]):  # prefill, steps, a chunk, a chunk longer than the window
        q, k, v = torch.randn(B, hq, t, D), torch.randn(B, hkv, t, D), torch.randn(B, hkv, t, D)
        ks.append(k), vs.append(v)
        out = layer.prefill(q, k, v) if step == 0 else layer.extend(q, k, v)
        allk, allv = torch.cat(ks, 2), torch.cat(vs, 2)
        if step == 0:
            want = list(range(50))  # the prompt attends in full
        else:  # sinks, then the recent tokens, so the new ones see at most sinks + window tokens
            recent = max(W - t, 0)
            want = list(range(sinks)) + list(range(n - recent, n)) + list(range(n, n + t))
        n += t
        pos = torch.tensor(want)
        assert layer.attended()[1, -1].tolist() == want
        assert layer.attended().shape == (B, hkv, len(want))
        torch.testing.assert_close(out.double(), naive_attention(q, allk[:, :, pos], allv[:, :, pos]),
                                   atol=1e-5, rtol=1e-5)
        assert layer.seq_len() == n
        assert layer.nbytes() == 2 * B * hkv * (sinks + W) * D * 4  # what stays after each call


def test_short_contexts_are_not_touched():
    torch.manual_seed(1)
    layer, full = make("streaming:sinks=4,window=60"), make("full")
    q, k, v = torch.randn(1, 8, 30, 32), torch.randn(1, 2, 30, 32), torch.randn(1, 2, 30, 32)
    torch.testing.assert_close(layer.prefill(q, k, v), full.prefill(q, k, v))
    for _ in range(20):
        q, k, v = torch.randn(1, 8, 1, 32), torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
        torch.testing.assert_close(layer.extend(q, k, v), full.extend(q, k, v))
    assert layer.nbytes() == 2 * 50 * 2 * 32 * 4


def test_bad_parameters_fail_on_construction():
    for spec, name in [("streaming:sinks=-1", "sinks"), ("streaming:window=0", "window")]:
        with pytest.raises(ParamError) as e:
            parse_method(spec)
        assert e.value.name == name


def test_through_the_bridge_on_a_tiny_model():
    from kvbench.bridge import attach, with_cache
    from test_kivi import token_identical_to_full

    model, ids, full = token_identical_to_full("streaming:window=200")  # everything fits
    cache = attach(model, parse_method("streaming:window=28"))
    out = model.generate(ids, **with_cache(model, cache), max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 108) and cache.get_seq_length() == 107
    assert all(c.k.shape[2] == 32 for c in cache.layer_caches())
    assert cache.nbytes() < full.nbytes() / 3


@pytest.mark.slow
def test_generates_sensible_text_on_the_embedded_model(embedded):
    from kvbench.bridge import attach, with_cache
    from test_kivi import story_ids

    model, tok = embedded
    ids = story_ids(tok)
    cache = attach(model, parse_method("streaming:window=60"))
    out = model.generate(ids, **with_cache(model, cache), max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    assert all(c.k.shape[2] == 64 for c in cache.layer_caches()) and ids.shape[1] > 150


def test_readme_shows_this_very_file():
    """README's "Add a method" shows methods/streaming.py whole; keep them the same."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    source = (root / "methods" / "streaming.py").read_text()
    assert "```python\n" + source + "```" in readme
    assert f"in {len(source.splitlines())} lines" in readme


@pytest.mark.parametrize("pinned", [False, True])
def test_decode_fns_attend_the_kept_tokens_without_appending(pinned):
    """The kernel suite times decode_fns' attention (one step over the sinks and the window), not extend()."""
    torch.manual_seed(1)
    B, hq, hkv, D = 2, 8, 2, 32
    layer = make("streaming:sinks=4,window=16", hq, hkv, D)
    k, v = torch.randn(B, hkv, 50, D), torch.randn(B, hkv, 50, D)
    layer.prefill(torch.randn(B, hq, 4, D), k, v)
    if pinned:
        layer.reserve(4)
    q = torch.randn(B, hq, 1, D)
    pos = torch.tensor(list(range(4)) + list(range(34, 50)))
    fns = layer.decode_fns(q)
    assert set(fns) == {"attention"}
    torch.testing.assert_close(fns["attention"]().double(), naive_attention(q, k[:, :, pos], v[:, :, pos]),
                               atol=1e-5, rtol=1e-5)
    assert layer.seq_len() == 50 and layer.decode_bytes() == 2 * B * hkv * 20 * D * 4
