"""Capture-safe decode of quest and doublesparse (methods/selection.py): the reserved (device-side) step against the
plain path and float64, the room check, token identity through a model on the CPU, and graph replays token-identical
to eager steps on the GPU."""

import textwrap

import pytest
import torch

from kvbench import LayerSpec, parse_method
from kvbench.api import ReservedRoomError
from kvbench.decoding import real_prefill
from kvbench.graph_decode import graph_decode, unsafe_reason
from interpreter import run_interpreted
from oracles import naive_attention, rand_kv
from test_graph_decode import _plain_tokens, tiny_model

SPECS = ["quest:budget=0.3,page=8,dense_layers=0", "quest:budget=24,page=8,dense_layers=0", "quest:budget=0.2",
         "doublesparse:budget=0.2", "doublesparse:budget=12,label_bits=16", "doublesparse:budget=0.1,label_bits=8"]


def make(spec, hq=8, hkv=2, d=32):
    return parse_method(spec + IMPL).make_layer(LayerSpec(0, 4, hq, hkv, d, torch.float32, torch.device("cpu")))


IMPL = ""  # ",impl=triton": the Triton kernels (in the interpreter on the CPU)


@pytest.mark.parametrize("spec", SPECS)
def test_reserved_steps_match_the_plain_path_and_float64(spec):
    torch.manual_seed(0)
    B, hq, hkv, D = 2, 8, 2, 32
    plain, pinned = make(spec), make(spec)
    ks, vs = [], []
    for step, t in enumerate([40] + [1] * 30 + [5] + [1] * 4):  # prefill, steps (pages fill), a chunk, steps
        q = torch.randn(B, hq, t, D)
        k, v = rand_kv(B, hkv, t, D)
        ks.append(k), vs.append(v)
        if step == 0:
            plain.prefill(q, k, v), pinned.prefill(q, k, v)
            pinned.reserve(40)
            continue
        want, got = plain.extend(q, k, v), pinned.extend(q, k, v)
        assert pinned.seq_len() == plain.seq_len()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if t == 1 and plain.attended() is not None:
            a, b = pinned.attended(), plain.attended()
            assert torch.equal(a.sort(-1).values, b.sort(-1).values)
            allk, allv = torch.cat(ks, 2), torch.cat(vs, 2)
            for h in range(hkv):
                pos = a[0, h].sort().values
                g = hq // hkv
                torch.testing.assert_close(got[:1, h * g : (h + 1) * g].double(),
                                           naive_attention(q[:1, h * g : (h + 1) * g], allk[:1, h : h + 1, pos],
                                                           allv[:1, h : h + 1, pos]), atol=1e-5, rtol=1e-5)
    assert pinned.capture_safe and pinned.kv.pin is not None


INTERPRETER_CHECK = textwrap.dedent("""
    import test_selection_pinned as t
    t.IMPL = ",impl=triton"
    for spec in ("quest:budget=0.3,page=8,dense_layers=0", "doublesparse:budget=0.2"):
        t.test_reserved_steps_match_the_plain_path_and_float64(spec)
    print("pinned triton ok")
""")


def test_reserved_steps_with_the_triton_kernels_in_the_interpreter():
    """The pinned step's Triton path (masked scores, device-side k top-k, page-mode attention) against the plain path
    and float64, as the test above."""
    r = run_interpreted(INTERPRETER_CHECK)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "pinned triton ok" in r.stdout


@pytest.mark.parametrize("spec", ["quest:budget=16,page=8,dense_layers=0", "doublesparse:budget=8"])
def test_a_step_past_the_reserved_room_fails_before_any_write(spec):
    layer = make(spec)
    layer.prefill(torch.randn(1, 8, 30, 32), *rand_kv(1, 2, 30, 32))
    layer.reserve(2)
    step = lambda: layer.extend(torch.randn(1, 8, 1, 32), *rand_kv(1, 2, 1, 32))  # noqa: E731
    step(), step()
    before = (layer.kv.pin.k.clone(), layer.seq_len(), [t.clone() for t in layer.summary()])
    with pytest.raises(ReservedRoomError, match="reserved room"):
        step()
    with pytest.raises(ReservedRoomError):
        layer.advance(1)
    assert torch.equal(layer.kv.pin.k, before[0]) and layer.seq_len() == before[1]
    assert all(torch.equal(a, b) for a, b in zip(layer.summary(), before[2]))


def test_reserved_eager_steps_are_token_identical_to_the_plain_loop_on_cpu():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(1))
    for spec in ("quest:budget=0.3,page=8,dense_layers=1", "doublesparse:budget=0.25"):
        a, nxt, _ = real_prefill(model, parse_method(spec), ids)
        b, _, _ = real_prefill(model, parse_method(spec), ids)
        assert unsafe_reason(a, torch.device("cuda")) is None, spec
        run, _ = graph_decode(model, a, nxt, 2, 30, graph=False, extra=0)
        want = _plain_tokens(model, b, nxt, 32)
        assert torch.equal(run.tokens, want), spec
        assert a.get_seq_length() == b.get_seq_length() == 60 + 32


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", ["quest:budget=0.3,page=8,dense_layers=1", "doublesparse:budget=0.25",
                                  "doublesparse:budget=16,label_bits=16"])
def test_graph_replays_are_token_identical_to_eager_steps(spec, dtype):
    model = tiny_model(dtype, "cuda")
    ids = torch.randint(0, 256, (2, 80), generator=torch.Generator().manual_seed(2)).cuda()
    a, nxt, _ = real_prefill(model, parse_method(spec), ids)
    b, _, _ = real_prefill(model, parse_method(spec), ids)
    eager, _ = graph_decode(model, a, nxt, 2, 30, graph=False, extra=0)
    graph, sg = graph_decode(model, b, nxt, 2, 30, graph=True, extra=0)
    assert graph.facts["decode_mode"] == "graph" and sg.graph is not None
    assert torch.equal(eager.tokens, graph.tokens)
    assert a.get_seq_length() == b.get_seq_length() == 80 + 32
    with pytest.raises(ReservedRoomError):
        sg.replay()
