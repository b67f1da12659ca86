import pytest
import torch

from kvbench.records import read_records
from kvbench.registry import available_methods, parse_method
from kvbench.suites import throughput
from kvbench.suites.throughput import Runner, decode, real_prefill, synthetic_cache


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer Llama with random weights (GQA 4:2; head_dim 64, the smallest every method supports)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, vocab_size=256, max_position_embeddings=4096)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _records(path):
    records, problems = read_records([path])
    assert not problems and records
    return records


def test_synthetic_fill_then_real_decode_continues_the_positions(tiny):
    cache = synthetic_cache(tiny, parse_method("full"), 2, 48, q_tail=8, seed=0)
    assert cache.get_seq_length() == 48 and len(cache.layer_caches()) == 2
    assert cache.nbytes() == 2 * (2 * 2 * 48 * 2 * 64 * 4)  # layers x (K and V: B x T x Hkv x D x fp32)
    times = decode(tiny, cache, torch.zeros(2, 1, dtype=torch.long), warmup=1, steps=3)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert cache.get_seq_length() == 52  # 4 steps appended


def test_real_prefill_gives_the_first_token(tiny):
    gen = torch.Generator().manual_seed(0)
    cache, nxt, dt = real_prefill(tiny, parse_method("full"), throughput.random_ids(tiny, 1, 20, gen))
    assert nxt.shape == (1, 1) and dt > 0 and cache.get_seq_length() == 20


@pytest.mark.slow  # every registered method's CPU reference through the model
def test_tiny_grid_with_every_registered_method(tiny, tmp_path, monkeypatch):
    names = list(available_methods())
    # 64 x 1 fits the real-prefill limit, 64 x 2 does not: one cell of each fill
    res = throughput.run(names, tmp_path, model="tiny", loaded=(tiny, None), contexts="64", batches="1,2",
                         prefill_tokens="64", steps=2, warmup_steps=1, max_batch=2, search_context="64",
                         show_progress=False)
    records = _records(tmp_path / "throughput.jsonl")
    assert res.ok == len(records) == 3 * len(names), [r["error"] for r in records if r["status"] != "ok"]
    for r in records:
        m = r["metrics"]
        assert m["decode_tok_s"] > 0 and m["latency_ms"] > 0 and m["batch"] >= 1
        if r["cell"]["task"] == "decode":
            assert m["ttft_s"] > 0 and m["ttft_batch"] == 1 and m["seq_len"] == 64 + 1 + 2
            assert r["cell"]["fill"] == ("prefill" if r["cell"]["batch"] == 1 else "synthetic")
        else:
            assert m["max_batch"] == 2 and m["reached_limit"] and [p["n"] for p in m["probes"]] == [1, 2]
    assert (tmp_path / "throughput.provenance.json").exists()


def test_batch_search_stops_at_out_of_memory_and_keeps_the_best(tiny, monkeypatch):
    real = throughput.synthetic_cache

    def limited(model, method, batch, context, **kw):  # a device that holds 5 sequences
        if batch > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, method, batch, context, **kw)

    monkeypatch.setattr(throughput, "synthetic_cache", limited)
    r = Runner(tiny, warmup_steps=0, steps=2, q_tail=8, seed=0, search_limit=64)
    m = r.search(parse_method("full"), 32)
    assert m["max_batch"] == 5 and not m["reached_limit"]
    assert [p["n"] for p in m["probes"]] == [1, 2, 4, 8, 6, 5]
    fitting = [p for p in m["probes"] if p["fits"]]
    assert m["best_decode_tok_s"] == max(p["decode_tok_s"] for p in fitting)
    assert all("out of memory" in p["why"] for p in m["probes"] if not p["fits"])


def test_out_of_memory_cell_is_recorded_and_the_sweep_goes_on(tiny, tmp_path, monkeypatch):
    real = throughput.decode

    def fake(model, cache, next_ids, warmup, steps):
        if next_ids.shape[0] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(model, cache, next_ids, warmup, steps)

    monkeypatch.setattr(throughput, "decode", fake)
    res = throughput.run(["full"], tmp_path, model="tiny", loaded=(tiny, None), contexts="32", batches="1,2,3",
                         steps=1, search=False, show_progress=False)
    status = {r["cell"]["batch"]: r["status"] for r in _records(tmp_path / "throughput.jsonl")}
    assert status == {1: "ok", 2: "oom", 3: "ok"} and res.oom == 1


@pytest.mark.slow
def test_embedded_model_on_cpu(tmp_path):
    res = throughput.run(["full"], tmp_path, model="embedded", contexts="128", batches="1", steps=2, warmup_steps=1,
                         search=False, show_progress=False)
    (r,) = _records(tmp_path / "throughput.jsonl")
    assert res.ok == 1 and r["cell"]["model"] == "embedded" and r["cell"]["fill"] == "prefill"
    assert r["metrics"]["ttft_s"] > 0 and r["metrics"]["decode_tok_s"] > 0


@pytest.mark.gpu
def test_gpu_throughput_small(tmp_path):
    res = throughput.run(["full"], tmp_path, model="synthetic:smollm2-135m", contexts="1K", batches="1,4",
                         prefill_tokens="1K", steps=4, max_batch=8, show_progress=False)
    records = _records(tmp_path / "throughput.jsonl")
    assert res.ok == len(records) == 3, [r["error"] for r in records]
    for r in records:
        assert r["metrics"]["decode_tok_s"] > 0 and r["metrics"]["telemetry"]["available"] in (True, False)
    fills = {r["cell"].get("batch"): r["cell"]["fill"] for r in records if r["cell"]["task"] == "decode"}
    assert fills == {1: "prefill", 4: "synthetic"}
