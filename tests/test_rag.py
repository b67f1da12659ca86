"""The RAG scenario (kvbench/rag.py, methods/rag_*.py) on a tiny random Llama in float64: composition and position
re-encoding against a model that prefills the same tokens there, reuse == recompute with one document, cacheblend
and samkv at a 100% budget == recompute, and clear errors for bad inputs."""

import pytest
import torch

from kvbench.errors import KVBenchError, ParamError
from kvbench.rag import PositionedKV, RagPrompt, Rope, Scene, _forward, layered_cache, parse_rag, store_documents


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval().to(torch.float64)


def prompt(n_docs: int, seed: int = 0, doc_len: int = 12) -> RagPrompt:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, 97, (n,), generator=g).tolist()  # noqa: E731
    return RagPrompt(prefix=ids(5), docs=[ids(doc_len + i) for i in range(n_docs)], question=ids(4))


def first(model, p: RagPrompt, spec: str):
    scene = Scene(model, p, store_documents(model, p))
    return parse_rag(spec).first_token(scene)


def test_rerotated_keys_equal_a_prefill_at_those_positions(model):
    """A document prefilled alone at 0..n-1, its keys shifted by 37, against the model prefilling it at 37..."""
    ids, shift = torch.randint(1, 97, (10,), generator=torch.Generator().manual_seed(3)).tolist(), 37
    layers_0 = [PositionedKV() for _ in range(3)]
    _forward(model, layered_cache(model, layers_0), ids)
    layers_s = [PositionedKV(k[:, :, :0], v[:, :, :0], torch.zeros(0, dtype=torch.long)) for k, v in
                ((lc.k, lc.v) for lc in layers_0)]
    for lc in layers_s:
        lc.n = shift  # nothing held, positions continue at `shift`
    _forward(model, layered_cache(model, layers_s), ids, torch.arange(shift, shift + len(ids)))
    rope = Rope(model)
    for a, b in zip(layers_0, layers_s):  # transformers computes cos/sin in float32: float32-sized differences
        assert (a.k - b.k).abs().max() > 0.1  # unshifted keys are far off
        torch.testing.assert_close(rope.shift(a.k, shift), b.k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.v, b.v, rtol=1e-5, atol=1e-6)
        assert b.pos.tolist() == list(range(shift, shift + len(ids)))


def test_reuse_equals_recompute_with_one_document(model):
    p = prompt(1)
    _, ref, _ = first(model, p, "recompute")
    _, got, facts = first(model, p, "reuse")
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert facts["recompute_ratio"] == 0.0 and facts["kept_ratio"] == 1.0


def test_reuse_differs_from_recompute_with_several_documents(model):
    p = prompt(3)
    _, ref, _ = first(model, p, "recompute")
    _, got, _ = first(model, p, "reuse")
    assert (got - ref).abs().max() > 1e-6  # the documents never attended to each other


@pytest.mark.parametrize("spec", ["cacheblend:ratio=1", "samkv:budget=1", "epic:tokens=100"])
def test_full_budget_equals_recompute(model, spec):
    p = prompt(3)
    _, ref, _ = first(model, p, "recompute")
    _, got, facts = first(model, p, spec)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert facts["recompute_ratio"] == 1.0 and facts["kept_ratio"] == 1.0


def test_decoding_goes_on_through_extend(model):
    """After samkv's first token the cache decodes: positions continue after the question, as with recompute."""
    p = prompt(3)
    outs = {}
    for spec in ("recompute", "samkv:budget=1"):
        cache, logits, _ = first(model, p, spec)
        toks = []
        for _ in range(4):
            toks.append(int(logits.argmax(-1)))
            logits = _forward(model, cache, [toks[-1]])
        outs[spec] = (toks, logits)
        assert cache.get_seq_length() == len(p.ids()) + 4
    assert outs["recompute"][0] == outs["samkv:budget=1"][0]
    torch.testing.assert_close(outs["recompute"][1], outs["samkv:budget=1"][1], rtol=1e-8, atol=1e-8)


def test_samkv_keeps_its_budget_of_every_document(model):
    p = prompt(4, doc_len=20)
    scene = Scene(model, p, store_documents(model, p))
    sel = parse_rag("samkv:budget=0.25").select(scene)
    spans = p.spans()
    per_doc = [int(((sel.keep >= s) & (sel.keep < e)).sum()) for s, e in spans]
    assert all(n >= 3 for n in per_doc)  # floor: half of ceil(0.25 x n_d) at least
    assert len(sel.keep) == sum(-(-(e - s) // 4) for s, e in spans)
    cache, _, facts = parse_rag("samkv:budget=0.25").first_token(scene)
    assert facts["kept_ratio"] == pytest.approx(len(sel.keep) / p.doc_tokens)
    held = cache.layers[0].cache.k.shape[2]
    assert held == len(p.prefix) + len(sel.keep) + len(p.question)


def test_cacheblend_recomputes_its_ratio(model):
    p = prompt(3, doc_len=20)
    _, _, facts = first(model, p, "cacheblend:ratio=0.2")
    assert facts["recompute_ratio"] == pytest.approx(-(-0.2 * p.doc_tokens // 1) / p.doc_tokens)
    assert facts["kept_ratio"] == 1.0


def test_single_context_method_after_reuse(model):
    p = prompt(1)
    _, ref, _ = first(model, p, "recompute")
    _, got, _ = first(model, p, "reuse+full")  # full over the composed cache: reuse itself
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    cache, _, _ = first(model, prompt(3, doc_len=30), "reuse+snapkv:capacity=16,window=4")
    assert cache.layers[0].cache.inner.nbytes() < cache.layers[0].cache.inner.seq_len() * 2 * 2 * 16 * 8


def test_bad_inputs_give_clear_errors():
    with pytest.raises(KVBenchError, match="document 1 is empty"):
        RagPrompt([1, 2], [[3], []], [4])
    with pytest.raises(KVBenchError, match="N = 0"):
        RagPrompt([1, 2], [], [4])
    with pytest.raises(ParamError, match="budget"):
        parse_rag("samkv:budget=1.5")
    with pytest.raises(ParamError, match="budget"):
        parse_rag("samkv:budget=0")
    with pytest.raises(ParamError, match="ratio"):
        parse_rag("cacheblend:ratio=2")
    with pytest.raises(KVBenchError, match="unknown method 'nope'"):
        parse_rag("nope")
    with pytest.raises(KVBenchError, match="not one of its parameters"):
        parse_rag("samkv:size=3")


def test_layers_of_one_forward_share_appended_positions(model):
    """Appending the question gives every layer the same positions tensors (one device copy, one block mask)."""
    prompt = RagPrompt(prefix=[1, 2], docs=[[5, 6, 7], [8, 9]], question=[10, 11])
    scene = Scene(model, prompt, store_documents(model, prompt))
    cache = scene.cache(None)
    scene.forward(cache, scene.empty())
    layers = [layer.cache for layer in cache.layers]
    assert all(lc.pos is layers[0].pos and lc._pos_dev is layers[0]._pos_dev for lc in layers)
    assert layers[0].pos.tolist() == list(range(prompt.context_len + 2))


def test_a_forwards_shared_placement_equals_one_made_per_layer(model, monkeypatch):
    """A pass that overwrites some held positions and appends the question: with the placement and masks made once
    for all layers (PositionedKV.shared) the logits and caches equal those made layer by layer."""
    p = prompt(3, seed=5)
    stored = store_documents(model, p)
    recompute = torch.tensor([6, 7, 12, 20, 21])  # document positions (held: overwritten), then the question

    def run():
        scene = Scene(model, p, stored)
        cache = scene.cache(None)
        logits = scene.forward(cache, recompute)
        return logits, [(lc.cache.k, lc.cache.v, lc.cache.pos) for lc in cache.layers], cache

    logits, kv, cache = run()
    assert all(layer.cache.pos is cache.layers[0].cache.pos for layer in cache.layers)  # one positions tensor
    monkeypatch.setattr(PositionedKV, "shared", lambda self, tag, *tensors, make: make())
    logits_each, kv_each, _ = run()
    torch.testing.assert_close(logits, logits_each, rtol=0, atol=0)
    for (k, v, pos), (k2, v2, pos2) in zip(kv, kv_each):
        assert torch.equal(k, k2) and torch.equal(v, v2) and torch.equal(pos, pos2)
    assert kv[0][2].tolist() == list(range(p.context_len + len(p.question)))  # overwritten in place, question added
