"""h2o and tova (the methods that evict while decoding) against a float64 simulation of their rules: the kept token
set per KV head after every call, every output, memory really freed, and the methods inside a transformers model."""

import pytest
import torch

from kvbench import LayerSpec, ParamError, parse_method
from oracles import naive_attention


def make(spec, hq, hkv, d=32):
    return parse_method(spec).make_layer(LayerSpec(0, 1, hq, hkv, d, torch.float32, torch.device("cpu")))


def naive_probs(q, k, pos, qpos):
    """float64: q [Hq, Tq, D] at logical positions qpos, k [Hkv, N, D] at positions pos [Hkv, N] ->
    GQA-mean softmax probabilities [Hkv, Tq, N], each query seeing the stored keys at or before it."""
    Hq, Tq, D = q.shape
    H, N = k.shape[0], k.shape[1]
    g = Hq // H
    p = torch.zeros(H, Tq, N, dtype=torch.float64)
    for h in range(H):
        for j in range(h * g, (h + 1) * g):
            for i in range(Tq):
                s = k[h].double() @ q[j, i].double() / D**0.5
                s[pos[h] > qpos[i]] = float("-inf")
                p[h, i] += torch.softmax(s, 0) / g
    return p


class Simulation:
    """The rules of h2o ("accumulate") or tova ("last"), one (b, h) list at a time, in float64."""

    def __init__(self, rule, budget, recent):
        self.rule, self.budget, self.recent = rule, budget, recent
        self.pos = self.score = None

    def call(self, q, k_all, first, n):
        """q [B, Hq, Tq, D] of positions n - Tq .. n - 1; k_all [B, Hkv, n, D] every key so far."""
        B, H = k_all.shape[0], k_all.shape[1]
        Tq = q.shape[2]
        new = torch.arange(n - (n if first else Tq), n)
        if first:
            self.pos = [[new.clone() for _ in range(H)] for _ in range(B)]
            self.score = [[torch.zeros(n, dtype=torch.float64) for _ in range(H)] for _ in range(B)]
        for b in range(B):
            for h in range(H):
                if not first:
                    self.pos[b][h] = torch.cat([self.pos[b][h], new])
                    self.score[b][h] = torch.cat([self.score[b][h], torch.zeros(Tq, dtype=torch.float64)])
                pos = self.pos[b][h]
                qpos = torch.arange(n - Tq, n)
                g = q.shape[1] // H
                p = naive_probs(q[b, h * g : (h + 1) * g], k_all[b, h : h + 1, pos], pos[None], qpos)[0]
                if self.rule == "accumulate":
                    self.score[b][h] = self.score[b][h] + p.sum(0)
                else:
                    self.score[b][h] = p[-1]
                while len(self.pos[b][h]) > self.budget:
                    cand = self.score[b][h][: len(self.pos[b][h]) - self.recent]
                    drop = int(cand.argmin())
                    keep = torch.ones(len(self.pos[b][h]), dtype=torch.bool)
                    keep[drop] = False
                    self.pos[b][h], self.score[b][h] = self.pos[b][h][keep], self.score[b][h][keep]


CASES = [  # spec, rule, Hq, Hkv, budget, recent for a 60-token prompt
    ("h2o:heavy=10,recent=6", "accumulate", 4, 4, 16, 6),
    ("h2o:heavy=0.2,recent=0.1", "accumulate", 8, 2, 18, 6),
    ("h2o:heavy=5,recent=3", "accumulate", 9, 3, 8, 3),
    ("tova:capacity=16", "last", 4, 4, 16, 1),
    ("tova:capacity=0.25", "last", 8, 2, 15, 1),
]


@pytest.mark.parametrize("spec, rule, hq, hkv, budget, recent", CASES)
def test_kept_sets_and_outputs_match_the_float64_simulation(spec, rule, hq, hkv, budget, recent):
    torch.manual_seed(0)
    B, T, D = 2, 60, 32
    layer = make(spec, hq, hkv, D)
    sim = Simulation(rule, budget, recent)
    ks, vs, n = [], [], 0
    for step, t in enumerate([T, 1, 1, 4, 1, 1, 1, 3, 1]):  # prefill, steps and two question chunks
        q, k, v = torch.randn(B, hq, t, D), torch.randn(B, hkv, t, D), torch.randn(B, hkv, t, D)
        k[:, :, : t // 3] *= 3  # some tokens that stand out
        before = None if step == 0 else [[p.clone() for p in row] for row in sim.pos]
        ks.append(k), vs.append(v)
        n += t
        allk, allv = torch.cat(ks, 2), torch.cat(vs, 2)
        out = layer.prefill(q, k, v) if step == 0 else layer.extend(q, k, v)
        if step == 0:
            want = naive_attention(q, k, v)
        else:  # over what was kept plus the new tokens, causal within the chunk
            want = torch.cat([torch.cat([naive_attention(
                q[b : b + 1, h * (hq // hkv) : (h + 1) * (hq // hkv)],
                allk[b : b + 1, h : h + 1, torch.cat([before[b][h], torch.arange(n - t, n)])],
                allv[b : b + 1, h : h + 1, torch.cat([before[b][h], torch.arange(n - t, n)])]) for h in range(hkv)], 1)
                for b in range(B)], 0)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
        sim.call(q, allk, step == 0, n)
        for b in range(B):
            for h in range(hkv):
                assert layer.pos[b, h].tolist() == sim.pos[b][h].tolist(), (step, b, h)
        assert layer.seq_len() == n
        assert layer.k.shape[2] == min(budget, n)
        assert torch.equal(layer.k, allk.gather(2, layer.pos[..., None].expand(-1, -1, -1, D)))  # stored, not faked


def test_nbytes_is_the_layout_and_memory_is_freed():
    torch.manual_seed(1)
    B, T, D = 2, 300, 64
    q, k, v = torch.randn(B, 8, T, D), torch.randn(B, 2, T, D), torch.randn(B, 2, T, D)
    full = make("full", 8, 2, D)
    full.prefill(q, k, v)
    h2o = make("h2o", 8, 2, D)  # 10% heavy + 10% recent of 300 = 60 tokens
    h2o.prefill(q, k, v)
    assert h2o.nbytes() == 2 * B * 2 * 60 * D * 4 + B * 2 * 60 * (8 + 4)  # K, V, positions (int64), scores (fp32)
    tova = make("tova:capacity=0.1", 8, 2, D)
    tova.prefill(q, k, v)
    assert tova.nbytes() == 2 * B * 2 * 30 * D * 4 + B * 2 * 30 * 8  # no scores carried between steps
    for _ in range(5):
        q1, k1, v1 = torch.randn(B, 8, 1, D), torch.randn(B, 2, 1, D), torch.randn(B, 2, 1, D)
        h2o.extend(q1, k1, v1), tova.extend(q1, k1, v1), full.extend(q1, k1, v1)
    assert h2o.k.shape[2] == 60 and tova.k.shape[2] == 30 and h2o.nbytes() < full.nbytes() / 4
    assert tova.attended().shape == (B, 2, 31)  # the last step attended the kept 30 plus its own token


def test_budget_beyond_the_context_is_full():
    torch.manual_seed(2)
    for spec in ("h2o:heavy=4096,recent=8", "tova:capacity=4096"):
        layer, full = make(spec, 8, 2), make("full", 8, 2)
        q, k, v = torch.randn(1, 8, 40, 32), torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
        torch.testing.assert_close(layer.prefill(q, k, v), full.prefill(q, k, v))
        for _ in range(5):
            q, k, v = torch.randn(1, 8, 1, 32), torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
            torch.testing.assert_close(layer.extend(q, k, v), full.extend(q, k, v))
        assert layer.attended().shape[-1] == 45


def test_bad_parameters_fail_on_construction():
    for spec, name in [("h2o:heavy=0", "heavy"), ("h2o:recent=1.5", "recent"), ("tova:capacity=-1", "capacity")]:
        with pytest.raises(ParamError) as e:
            parse_method(spec)
        assert e.value.name == name


@pytest.mark.parametrize("spec, small", [("h2o:heavy=4096,recent=4", "h2o:heavy=10,recent=10"),
                                         ("tova:capacity=4096", "tova:capacity=25")])
def test_through_the_bridge_on_a_tiny_model(spec, small):
    from kvbench.bridge import attach, with_cache
    from test_kivi import token_identical_to_full

    model, ids, full = token_identical_to_full(spec)  # keeps everything
    cache = attach(model, parse_method(small))
    out = model.generate(ids, **with_cache(model, cache), max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 108) and cache.get_seq_length() == 107
    with torch.no_grad():
        logits = model(torch.randint(0, 1000, (2, 5)), **with_cache(model, cache)).logits  # a question chunk
    assert torch.isfinite(logits).all() and cache.get_seq_length() == 112
    assert all(c.k.shape[2] == c.budget for c in cache.layer_caches())
    assert cache.nbytes() < full.nbytes() / 2


@pytest.mark.parametrize("spec, hq, hkv", [(c[0], c[2], c[3]) for c in CASES] + [("h2o:heavy=40,recent=10", 8, 2)])
def test_reserved_slot_steps_keep_the_plain_paths_tokens(spec, hq, hkv):
    """After reserve(), one-token steps run in fixed slots (capture-safe) and a chunk goes back through the plain
    path: every output, attended set and seq_len equals the plain layer's (the last case's 30-token prompt is under
    its 50-token budget, so the slots fill before they evict)."""
    torch.manual_seed(1)
    B, D = 2, 32
    plain, slots = make(spec, hq, hkv, D), make(spec, hq, hkv, D)
    prompt = 30 if "heavy=40" in spec else 60
    for i, t in enumerate([prompt] + [1] * 25 + [4] + [1] * 10):
        q, k, v = torch.randn(B, hq, t, D), torch.randn(B, hkv, t, D), torch.randn(B, hkv, t, D)
        if i == 0:
            plain.prefill(q, k, v), slots.prefill(q, k, v)
            slots.reserve(40)
            assert slots.info()["pinned"] and slots.capture_safe
            continue
        want, got = plain.extend(q, k, v), slots.extend(q, k, v)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(slots.attended(), plain.attended().sort(-1).values), i
        assert slots.seq_len() == plain.seq_len()
    assert slots.nbytes() > 0 and slots.info()["kept"] == plain.budget
