"""The capture-safe (reserved) decode path of the methods beyond full and streaming, on the CPU: reserved steps equal
the plain eager path, the room is checked before any write, and methods that stay eager say why."""

import pytest
import torch

from kvbench import LayerSpec, parse_method
from kvbench.api import ReservedRoomError


def make(spec, layer=1, n_layers=4, hq=8, hkv=2, d=32):
    return parse_method(spec).make_layer(LayerSpec(layer, n_layers, hq, hkv, d, torch.float32, torch.device("cpu")))


def run_pair(spec, prompt=80, steps=24, reserve=40, B=2, hq=8, hkv=2, d=32, chunk_at=None):
    """Feed the same tokens to a plain layer and a reserved one: (outputs plain, outputs reserved, the two layers)."""
    torch.manual_seed(0)
    plain, pinned = make(spec, hq=hq, hkv=hkv, d=d), make(spec, hq=hq, hkv=hkv, d=d)
    q, k, v = torch.randn(B, hq, prompt, d), torch.randn(B, hkv, prompt, d), torch.randn(B, hkv, prompt, d)
    plain.prefill(q, k, v), pinned.prefill(q, k, v)
    pinned.reserve(reserve)
    want, got = [], []
    for i in range(steps):
        t = 3 if i == chunk_at else 1
        q, k, v = torch.randn(B, hq, t, d), torch.randn(B, hkv, t, d), torch.randn(B, hkv, t, d)
        want.append(plain.extend(q, k, v)), got.append(pinned.extend(q, k, v))
        assert pinned.seq_len() == plain.seq_len()
    return want, got, plain, pinned


@pytest.mark.parametrize("spec", ["snapkv:capacity=24,window=4", "snapkv:capacity=0.3,window=8,pool=avg",
                                  "pyramidkv:capacity=30,window=4", "adakv:capacity=24,window=4",
                                  "adakv:capacity=0.3,window=8,alpha=0"])
@pytest.mark.parametrize("chunk_at", [None, 10])
def test_prompt_eviction_reserved_steps_equal_the_plain_path(spec, chunk_at):
    want, got, plain, pinned = run_pair(spec, chunk_at=chunk_at)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert torch.equal(pinned.attended(), plain.attended())
    assert pinned.capture_safe and not plain.info()["pinned"]
    assert pinned.info()["pinned"] == (chunk_at is None or not spec.startswith("adakv"))  # a chunk unpins adakv


def _state(layer) -> list:
    """Everything a refused step must leave as it was: the stored tensors, the length and the bytes."""
    stored = [layer.kept.pin.k, layer.kept.pin.v] if hasattr(layer, "kept") else \
        [layer.pk, layer.pv, layer.seen] if hasattr(layer, "pk") else layer.kv.tensors()
    return [t.clone() for t in stored] + [layer.seq_len(), layer.nbytes()]


@pytest.mark.parametrize("spec", ["snapkv:capacity=24,window=4", "adakv:capacity=24,window=4",
                                  "selfindex:budget=0.3,sinks=4,window=8"])
def test_a_step_past_the_reserved_room_fails_before_any_write(spec):
    layer = make(spec)
    with pytest.raises(ReservedRoomError, match="before prefill"):
        layer.reserve(4)
    layer.prefill(torch.randn(1, 8, 60, 32), torch.randn(1, 2, 60, 32), torch.randn(1, 2, 60, 32))
    layer.reserve(2)
    for _ in range(2):
        layer.extend(torch.randn(1, 8, 1, 32), torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))
    before = _state(layer)
    with pytest.raises(ReservedRoomError, match="reserved room"):
        layer.extend(torch.randn(1, 8, 1, 32), torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))
    with pytest.raises(ReservedRoomError):
        layer.advance(1)  # what a graph replay would have done
    after = _state(layer)
    assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(before, after))


@pytest.mark.parametrize("spec, words", [("kivi", "residual")])
def test_methods_that_stay_eager_give_their_reason(spec, words):
    from kvbench.graph_decode import unsafe_reason

    class Cache:  # the two things unsafe_reason reads of a KVBenchCache
        method = parse_method(spec)

        def layer_caches(self):
            return [make(spec)]

    reason = unsafe_reason(Cache(), torch.device("cuda"))
    assert reason.startswith(f"method '{spec}' is not capture-safe") and words in reason


# --- selfindex: the reserved steps' plan, on the CPU reference (the CUDA kernels read the same rows on the GPU) ---

SELFINDEX = ["selfindex:budget=0.3,sinks=4,window=8", "selfindex:budget=40,sinks=4,window=8,setting=16+1",
             "selfindex:budget=0.3,sinks=6,window=8,fixed=scored", "selfindex:budget=0.9,sinks=30,window=8"]


@pytest.mark.parametrize("spec", SELFINDEX)
def test_selfindex_plan_rows_are_what_each_eager_step_uses(spec):
    """The table a reserved CUDA step reads its host values from equals what the eager path computes step by step,
    the budget's growth with the context (a fraction) and a prompt shorter than the sinks included."""
    torch.manual_seed(1)
    layer = make(spec)
    T = 20 if "sinks=30" in spec else 80
    layer.prefill(torch.randn(2, 8, T, 32), torch.randn(2, 2, T, 32), torch.randn(2, 2, T, 32))
    rows = layer.plan_rows(40)
    for row in rows:
        p = layer.kv.n
        slot, old = layer._slot(p)
        layer.extend(torch.randn(2, 8, 1, 32), torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32))
        want = (p, slot, old if layer.kv.quantized else -1, layer.selectable()[1], layer.n_select())
        assert row == want
        if want[4]:
            assert layer.last_idx.shape[-1] == want[4]
    assert len({r[4] for r in rows}) > 1 or "budget=40" in spec  # a fractional budget grows with the context


@pytest.mark.parametrize("spec", SELFINDEX)
def test_selfindex_reserved_steps_equal_the_plain_path(spec):
    want, got, plain, pinned = run_pair(spec, prompt=20 if "sinks=30" in spec else 80, chunk_at=10)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert torch.equal(pinned.attended(), plain.attended())
    assert pinned.capture_safe and pinned.rows is None  # the chunk dropped the plan: reserve again before capture


def test_selfindex_with_the_torch_reference_stays_eager_and_says_why():
    assert not make("selfindex:impl=torch").capture_safe
    assert "host value" in make("selfindex:impl=torch").capture_unsafe_reason
