"""Capture-safe decode: the reserved (device-side) path of full and streaming against their plain path and a float64
reference, running past the reserved room, the eager fallback with its reason, the dense decode kernels (Triton's
interpreter on the CPU, every backend on the GPU), and graph replays token-identical to eager steps on the GPU."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvbench import LayerSpec, parse_method
from kvbench.api import ReservedRoomError
from kvbench.bridge import with_cache
from kvbench.graph_decode import decode_run, graph_decode, unsafe_reason
from kvbench.kernels import dense_decode
from kvbench.decoding import decode, real_prefill
from oracles import naive_attention

CPU = torch.device("cpu")


def make(spec, hq=8, hkv=2, d=32, dtype=torch.float32, device=CPU):
    return parse_method(spec).make_layer(LayerSpec(0, 1, hq, hkv, d, dtype, torch.device(device)))


def tiny_model(dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, vocab_size=256, max_position_embeddings=4096)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


# --- the reserved path on the CPU (torch-masked reference kernel) ---

@pytest.mark.parametrize("spec", ["full", "streaming:sinks=4,window=16", "streaming:sinks=0,window=8",
                                  "streaming:sinks=3,window=100"])
def test_reserved_steps_match_the_plain_path_and_float64(spec):
    torch.manual_seed(0)
    B, hq, hkv, D = 2, 8, 2, 32
    plain, pinned = make(spec), make(spec)
    ks, vs = [], []
    for step, t in enumerate([40] + [1] * 30 + [5] + [1] * 3):  # prefill, steps (the ring wraps), a chunk, steps
        q, k, v = torch.randn(B, hq, t, D), torch.randn(B, hkv, t, D), torch.randn(B, hkv, t, D)
        ks.append(k), vs.append(v)
        if step == 0:
            plain.prefill(q, k, v), pinned.prefill(q, k, v)
            pinned.reserve(40)
            continue
        want = plain.extend(q, k, v)
        got = pinned.extend(q, k, v)
        assert pinned.seq_len() == plain.seq_len()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if plain.attended() is not None:
            assert torch.equal(pinned.attended(), plain.attended())
            pos = plain.attended()[0, 0]
            allk, allv = torch.cat(ks, 2), torch.cat(vs, 2)
            torch.testing.assert_close(got.double(), naive_attention(q, allk[:, :, pos], allv[:, :, pos]),
                                       atol=1e-5, rtol=1e-5)
    assert pinned.info()["pinned"] and pinned.capture_safe


@pytest.mark.parametrize("spec", ["full", "streaming:sinks=4,window=100"])
def test_a_step_past_the_reserved_room_fails_before_any_write(spec):
    torch.manual_seed(0)
    layer = make(spec)
    layer.prefill(torch.randn(1, 8, 10, 32), torch.randn(1, 2, 10, 32), torch.randn(1, 2, 10, 32))
    layer.reserve(2)
    step = lambda: layer.extend(torch.randn(1, 8, 1, 32), torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))  # noqa
    step(), step()
    before = (layer.pin.k.clone(), layer.pin.v.clone(), layer.seq_len(), layer.nbytes())
    with pytest.raises(ReservedRoomError, match="reserved room"):
        step()
    with pytest.raises(ReservedRoomError):
        layer.advance(1)  # what a graph replay would have done
    assert torch.equal(layer.pin.k, before[0]) and torch.equal(layer.pin.v, before[1])
    assert (layer.seq_len(), layer.nbytes()) == before[2:]


def test_streaming_ring_needs_no_room_once_full():
    layer = make("streaming:sinks=2,window=6")
    layer.prefill(torch.randn(1, 8, 10, 32), torch.randn(1, 2, 10, 32), torch.randn(1, 2, 10, 32))
    layer.reserve(1)  # already sinks + window tokens: the ring is as large as it will ever be
    for _ in range(20):
        layer.extend(torch.randn(1, 8, 1, 32), torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))
    assert layer.seq_len() == 30 and layer.pin.k.shape[1] == 8


@pytest.mark.parametrize("spec", ["selfindex:budget=0.5,impl=torch", "kivi"])
def test_capture_unsafe_method_falls_back_to_eager_with_the_reason(spec):
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    cache, nxt, _ = real_prefill(model, parse_method(spec), torch.randint(0, 256, (1, 70), generator=gen))
    reason = unsafe_reason(cache, torch.device("cuda"))
    assert reason and "not capture-safe" in reason and spec.split(":")[0] in reason
    run = decode_run(model, cache, nxt, 1, 2, graph=True, eager=decode)
    assert run.facts["decode_mode"] == "eager" and "not capture-safe" in run.facts["graph_fallback"]
    assert len(run.times) == 2 and cache.get_seq_length() == 73


def test_full_on_the_cpu_falls_back_for_lack_of_cuda_and_no_graph_is_recorded():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    cache, nxt, _ = real_prefill(model, parse_method("full"), ids)
    assert unsafe_reason(cache, CPU) == "CUDA graphs need a CUDA device"
    run = decode_run(model, cache, nxt, 0, 2, graph=False, eager=decode)
    assert run.facts["graph_fallback"] == "--no-graph" and run.facts["decode_kernel"] == "sdpa-cpu"


def test_reserved_eager_steps_are_token_identical_to_the_plain_loop_on_cpu():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    for spec in ("full", "streaming:sinks=2,window=20"):
        a, nxt, _ = real_prefill(model, parse_method(spec), ids)
        b, _, _ = real_prefill(model, parse_method(spec), ids)
        run, _ = graph_decode(model, a, nxt, 2, 30, graph=False, extra=0)
        want = _plain_tokens(model, b, nxt, 32)
        assert run.tokens.shape == (2, 32) and torch.equal(run.tokens, want), spec
        assert a.get_seq_length() == b.get_seq_length() == 30 + 32


def _plain_tokens(model, cache, nxt, n):
    out = []
    with torch.inference_mode():
        for _ in range(n):
            pos = torch.full((nxt.shape[0], 1), cache.get_seq_length(), dtype=torch.long, device=nxt.device)
            logits = model(input_ids=nxt, **with_cache(model, cache), position_ids=pos, use_cache=True,
                           logits_to_keep=1).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
    return torch.cat(out, 1)


# --- the kernels in Triton's interpreter, on the CPU ---

INTERPRETER_CHECK = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    from kvbench.kernels import dense_decode as dd
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        for B, Hq, H, D, cap, lens in ((2, 4, 2, 32, 300, (1, 257)), (1, 4, 1, 64, 100, (100,)),
                                       (3, 3, 3, 16, 64, (5, 64, 33))):
            k, v = torch.randn(B, cap, H, D).to(dtype), torch.randn(B, cap, H, D).to(dtype)
            q = torch.randn(B, Hq, 1, D).to(dtype)
            live = torch.tensor(lens, dtype=torch.int32)
            want = dd.decode_ref(q, k, v, live)
            for cfg in (dict(block_n=16, splits=3), dict(block_n=32, splits=1), dict(block_n=16, splits=20)):
                out = dd.TritonDecoder(k, v, Hq, **cfg)(q, live).clone()
                tol = 1e-5 if dtype == torch.float32 else 2e-3
                torch.testing.assert_close(out, want, atol=tol, rtol=tol)
            assert dd.DenseDecoder(k, v, Hq).backend == "triton-splitkv"
    for ring in (None, (2, 5), (0, 3)):
        B, H, D, cap = 2, 2, 16, 40
        a = [torch.zeros(B, cap, H, D) for _ in range(2)]
        b = [torch.zeros(B, cap, H, D) for _ in range(2)]
        sa, la = torch.tensor([3, 3], dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
        sb, lb = sa.clone(), la.clone()
        for t in range(12):
            k, v = torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
            dd.append_ref(*a, k, v, sa, la, ring)
            dd.append_token(*b, k, v, sb, lb, ring)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(sa, sb) and torch.equal(la, lb)
    print("interpreter ok")
""")


def test_triton_kernels_match_the_reference_in_the_interpreter():
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' on Linux)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "interpreter ok" in r.stdout


# --- on the GPU ---

GPU_SHAPES = [  # B, Hq, Hkv, D, cap, live
    (1, 32, 8, 128, 5000, 4097),
    (3, 8, 2, 64, 1024, 1000),
    (2, 4, 4, 128, 64, 1),
    (8, 32, 8, 128, 2300, 2049),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["flash-varlen", "triton-splitkv"])
def test_dense_decode_backends_match_the_reference_on_gpu(shape, dtype, backend):
    torch.manual_seed(sum(shape))
    B, Hq, H, D, cap, n = shape
    k, v = (torch.randn(B, cap, H, D, device="cuda", dtype=dtype) for _ in range(2))
    k[:, n:], v[:, n:] = float("nan"), float("nan")  # slots past the live length must never be read (0 * NaN = NaN)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype)
    live = torch.full((B,), n, dtype=torch.int32, device="cuda")
    dec = dense_decode.DenseDecoder(k, v, Hq, backend=backend)
    assert dec.backend == backend, dec.why
    want = dense_decode.decode_ref(q, k.nan_to_num(0), v.nan_to_num(0), live).float()
    got = dec(q, live).float()
    assert not got.isnan().any()
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-2, err


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", ["full", "streaming:sinks=4,window=24"])
def test_graph_replays_are_token_identical_to_eager_steps(spec, dtype):
    model = tiny_model(dtype, "cuda")
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2)).cuda()
    a, nxt, _ = real_prefill(model, parse_method(spec), ids)
    b, _, _ = real_prefill(model, parse_method(spec), ids)
    eager, _ = graph_decode(model, a, nxt, 2, 30, graph=False, extra=0)
    graph, sg = graph_decode(model, b, nxt, 2, 30, graph=True, extra=0)
    assert graph.facts["decode_mode"] == "graph" and sg.graph is not None
    assert eager.tokens.shape == graph.tokens.shape == (2, 32)
    assert torch.equal(eager.tokens, graph.tokens)
    assert a.get_seq_length() == b.get_seq_length() == 40 + 32
    with pytest.raises(ReservedRoomError):  # the reserved room is spent: the next replay is refused
        sg.replay()
    assert b.get_seq_length() == 72


@pytest.mark.gpu
def test_graph_run_records_mode_kernel_and_step_accounting():
    model = tiny_model(torch.bfloat16, "cuda")
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3)).cuda()
    cache, nxt, _ = real_prefill(model, parse_method("full"), ids)
    run = decode_run(model, cache, nxt, 2, 4, eager=decode)
    f = run.facts
    assert f["decode_mode"] == "graph" and f["decode_kernel"] in dense_decode.BACKENDS
    assert f["floor_ms"] > 0 and f["copy_gbs"] > 100 and f["step_over_floor"] > 0
    assert f["gpu_busy_ms"] > 0 and 0 < f["busy_over_step"] <= 1.5 and f["kernels"] > 10


@pytest.mark.parametrize("graph", [True, False])
def test_throughput_records_say_which_decode_mode_ran_and_why(graph, tmp_path):
    from kvbench.records import read_records
    from kvbench.suites import throughput

    model = tiny_model()
    throughput.run(["full", "snapkv"], tmp_path, model="tiny", loaded=(model, None), contexts="64", batches="1",
                   steps=2, warmup_steps=1, search=False, show_progress=False, graph=graph)
    records, _ = read_records([tmp_path / "throughput.jsonl"])
    assert len(records) == 2
    for r in records:
        m = r["metrics"]
        assert r["status"] == "ok" and r["cell"]["decode"] == ("graph" if graph else "eager")
        assert m["decode_mode"] == "eager" and m["decode_kernel"]  # no CUDA here
        if not graph:
            assert m["graph_fallback"] == "--no-graph"
        else:  # both are capture-safe: only the device stops them
            assert m["graph_fallback"] == "CUDA graphs need a CUDA device"


CAPTURE_SAFE = ["snapkv:capacity=48,window=8", "pyramidkv:capacity=48,window=8", "adakv:capacity=48,window=8",
                "selfindex:budget=0.3,sinks=4,window=8", "selfindex:budget=0.3,sinks=4,window=8,setting=16+1",
                "selfindex:budget=64,sinks=8,window=16,fixed=scored", "selfindex:budget=0.1",
                "h2o:heavy=0.1,recent=0.05", "tova:capacity=0.15", "kivi", "kivi:bits=4"]


@pytest.mark.gpu
@pytest.mark.parametrize("spec", CAPTURE_SAFE)
def test_graph_replays_of_the_compressing_methods_are_token_identical_to_eager_steps(spec):
    """32 steps over a 300-token prompt (bf16: selfindex's kernels take half precision): the graph's tokens are the
    eager steps' tokens, and the reserved room is enforced at the end."""
    model = tiny_model(torch.bfloat16, "cuda")
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(4)).cuda()
    a, nxt, _ = real_prefill(model, parse_method(spec), ids)
    b, _, _ = real_prefill(model, parse_method(spec), ids)
    assert unsafe_reason(b, torch.device("cuda")) is None
    eager, _ = graph_decode(model, a, nxt, 2, 30, graph=False, extra=0)
    graph, sg = graph_decode(model, b, nxt, 2, 30, graph=True, extra=0)
    assert graph.facts["decode_mode"] == "graph" and sg.graph is not None, graph.facts
    assert torch.equal(eager.tokens, graph.tokens)
    assert a.get_seq_length() == b.get_seq_length() == 300 + 32
    with pytest.raises(ReservedRoomError):
        sg.replay()


# --- kvbench generate: graph-replayed greedy generation ---

def test_generate_greedy_on_the_cpu_is_transformers_generate():
    from kvbench.bridge import attach
    from kvbench.graph_decode import generate_greedy

    model = tiny_model()
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(5))
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)[:, 30:]
    with torch.inference_mode():
        got, facts = generate_greedy(model, attach(model, parse_method("full")), ids, 12)
    assert torch.equal(got, want)
    assert facts["decode_mode"] == "eager" and facts["graph_fallback"] == "CUDA graphs need a CUDA device"


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["full", "selfindex:budget=0.3,sinks=4,window=8", "kivi", "qjl"])
def test_generate_greedy_replays_graphs_token_identical_to_transformers_generate(spec):
    """kvbench generate's path on the GPU (graph for capture-safe methods, eager steps for qjl) gives the tokens of
    transformers' generate through the same method's cache, and cuts after the first stop token."""
    from kvbench.bridge import attach
    from kvbench.graph_decode import generate_greedy

    model = tiny_model(torch.bfloat16, "cuda")
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(6)).cuda()
    with torch.inference_mode():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), **with_cache(model, attach(
            model, parse_method(spec))), max_new_tokens=24, do_sample=False)[:, 300:]
        got, facts = generate_greedy(model, attach(model, parse_method(spec)), ids, 24)
        assert facts["decode_mode"] == ("eager" if spec == "qjl" else "graph"), facts
        assert torch.equal(got, want)
        stop = int(want[0, 5])
        cut, _ = generate_greedy(model, attach(model, parse_method(spec)), ids, 24, stop={stop})
        first = want[0].tolist().index(stop)
        assert torch.equal(cut, want[:, : first + 1])
