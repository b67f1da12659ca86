"""Attention fidelity: top-k recall, attention mass and output error on hand-made cases and through test doubles."""

from dataclasses import dataclass

import pytest
import torch

from kvbench.api import LayerCache, LayerSpec, Method
from kvbench.attention import dense_attention
from kvbench.methods.full import FullLayer
from kvbench.suites.fidelity import Fidelity, FidelityStats, step_metrics


def test_attending_everything_gives_recall_1_mass_1_and_no_error():
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 1, 8), torch.randn(2, 3, 20, 8)
    out = torch.randn(2, 6, 1, 8)
    for attended in (None, torch.arange(20).expand(2, 3, 20)):
        m = step_metrics(q, k, out, out.clone(), attended)
        assert torch.equal(m["topk_recall"], torch.ones(2, 3))
        torch.testing.assert_close(m["attn_mass"], torch.ones(2, 3))
        assert m["out_rel_err"].abs().max() == 0
        torch.testing.assert_close(m["attended_frac"], torch.ones(2, 3))


def test_hand_computed_recall_and_mass_with_gqa_mean():
    # one KV head, two query heads; D = 1 so the logits are q * k / 1
    q = torch.tensor([[[[2.0]], [[0.0]]]])  # [1, 2, 1, 1]
    keys = torch.tensor([[[[3.0], [1.0], [0.0], [-1.0]]]])  # [1, 1, 4, 1]
    p = (torch.softmax(torch.tensor([6.0, 2.0, 0.0, -2.0]), 0) + torch.full((4,), 0.25)) / 2  # GQA mean
    assert p.argsort(descending=True).tolist() == [0, 1, 2, 3]
    ref = torch.ones(1, 2, 1, 1)
    # attends tokens 1 and 2: k = 2, the exact top-2 is {0, 1}, so recall 1/2, mass p1 + p2
    m = step_metrics(q, keys, ref * 1.1, ref, torch.tensor([[[1, 2]]]))
    assert m["topk_recall"].item() == pytest.approx(0.5)
    assert m["attn_mass"].item() == pytest.approx((p[1] + p[2]).item(), rel=1e-6)
    assert m["attended_frac"].item() == pytest.approx(0.5)
    torch.testing.assert_close(m["out_rel_err"], torch.full((1, 2), 0.1))
    # the exact top-2 (in any order): recall 1
    m = step_metrics(q, keys, ref, ref, torch.tensor([[[1, 0]]]))
    assert m["topk_recall"].item() == 1.0 and m["attn_mass"].item() == pytest.approx((p[0] + p[1]).item(), rel=1e-6)


def test_padding_and_repeats_in_attended_are_ignored():
    q, keys = torch.tensor([[[[1.0]]]]), torch.tensor([[[[3.0], [1.0], [0.0]]]])
    ref = torch.ones(1, 1, 1, 1)
    a = step_metrics(q, keys, ref, ref, torch.tensor([[[0, 0, -1, 7]]]))  # only token 0 is real
    assert a["attended_frac"].item() == pytest.approx(1 / 3) and a["topk_recall"].item() == 1.0


def test_ties_at_the_kth_value_count_as_hits():
    q = torch.zeros(1, 1, 1, 4)  # uniform attention: every k-subset is an exact top-k
    keys = torch.randn(1, 1, 10, 4)
    ref = torch.ones(1, 1, 1, 4)
    m = step_metrics(q, keys, ref, ref, torch.tensor([[[7, 2, 5]]]))
    assert m["topk_recall"].item() == 1.0 and m["attn_mass"].item() == pytest.approx(0.3)


# --- through the wrapper: test-double methods ---------------------------------------------------------------------


class DropTopLayer(LayerCache):
    """Keeps everything, but each decode step skips the token full attention likes most (GQA-mean probability),
    the newest token excepted, and attends exactly over the rest."""

    def __init__(self, spec):
        self.full, self.spec, self.idx = FullLayer(spec, 16), spec, None

    def prefill(self, q, k, v):
        return self.full.prefill(q, k, v)

    def extend(self, q, k, v):
        if q.shape[2] != 1:
            self.idx = None
            return self.full.extend(q, k, v)
        self.full.extend(q, k, v)  # stores k/v (its dense output is not used)
        K, V = self.full.keys(), self.full.values()
        B, Hkv, T, D = K.shape
        g = q.shape[1] // Hkv
        p = torch.softmax(q.view(B, Hkv, g, D) @ K.transpose(-1, -2) / D**0.5, -1).mean(2)  # [B, Hkv, T]
        top = p[..., :-1].argmax(-1, keepdim=True)
        keep = torch.arange(T).expand(B, Hkv, T)
        keep = keep[keep != top.expand(B, Hkv, T)].view(B, Hkv, T - 1)
        self.idx = keep
        Kk = K.gather(2, keep[..., None].expand(B, Hkv, T - 1, D))
        Vk = V.gather(2, keep[..., None].expand(B, Hkv, T - 1, D))
        return dense_attention(q, Kk, Vk, causal=False)

    def attended(self):
        return self.idx

    def nbytes(self):
        return self.full.nbytes()

    def seq_len(self):
        return self.full.seq_len()


@dataclass(frozen=True)
class DropTop(Method):
    """droptop: a test double that skips the top token of every decode step."""

    name = "droptop"

    def make_layer(self, spec):
        return DropTopLayer(spec)


class AllLayer(DropTopLayer):
    """Attends every token and says so with explicit positions."""

    def extend(self, q, k, v):
        out = self.full.extend(q, k, v)
        self.idx = torch.arange(self.full.seq_len()).expand(q.shape[0], self.spec.n_kv_heads, -1)
        return out


@dataclass(frozen=True)
class AllPositions(Method):
    name = "allpositions"

    def make_layer(self, spec):
        return AllLayer(spec)


def drive(method: Method, steps=5, T=40, n_layers=2):
    """Prefill T random tokens then `steps` decode steps through Fidelity(method) layers; returns the summary."""
    torch.manual_seed(1)
    w = Fidelity(inner=method)
    layers = [w.make_layer(LayerSpec(i, n_layers, 6, 2, 16, torch.float32, torch.device("cpu")))
              for i in range(n_layers)]
    for layer in layers:
        layer.prefill(torch.randn(1, 6, T, 16), torch.randn(1, 2, T, 16), torch.randn(1, 2, T, 16))
        layer.extend(torch.randn(1, 6, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))  # not measured
        for _ in range(steps):
            layer.extend(torch.randn(1, 6, 1, 16), 3 * torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    assert w.stats.steps() == steps * 2  # per layer: steps x Hkv (batch 1)
    return w.stats.summary(), layers


@pytest.mark.parametrize("name", ["full", "all-positions"])
def test_wrapper_on_a_method_that_attends_everything(name):
    from kvbench import parse_method

    summary, layers = drive(parse_method("full") if name == "full" else AllPositions())
    assert summary["topk_recall"] == 1.0 and summary["attn_mass"] == pytest.approx(1.0)
    assert summary["out_rel_err"] < 1e-5
    assert len(summary["topk_recall_layers"]) == 2 and len(summary["out_rel_err_layers"]) == 2
    assert layers[0].nbytes() == layers[0].inner.nbytes()  # what the method holds, not the shadow cache
    assert layers[0].seq_len() == 40 + 3 + 5


def test_wrapper_on_a_method_that_drops_the_top_token():
    summary, _ = drive(DropTop())
    assert summary["topk_recall"] < 1.0
    assert summary["attn_mass"] < 1.0
    assert summary["out_rel_err"] > 1e-3
    assert summary["attended_frac"] == pytest.approx(sum((44 + i - 1) / (44 + i) for i in range(5)) / 5, rel=1e-5)
    # k = T - 1 and only the top token is missing: every other attended token is in the exact top-(T-1)
    assert all(r == pytest.approx(1 - 1 / (44 + 2), abs=0.02) for r in summary["topk_recall_layers"])


def test_empty_stats_summarize_to_nothing():
    assert FidelityStats().summary() == {} and FidelityStats().steps() == 0


def test_the_fp32_reference_equals_full_attention_and_its_logits_change_no_metric():
    """The shadow's fp32 reference (exact_attention, from the logits the metrics use) is full's SDPA output to fp32
    rounding, and handing those logits to step_metrics gives the bits it computes itself."""
    from kvbench.suites.fidelity import exact_attention

    torch.manual_seed(0)
    for B, Hq, Hkv, T in ((1, 9, 3, 700), (2, 4, 4, 33)):
        q, k, v = torch.randn(B, Hq, 1, 64), torch.randn(B, Hkv, T, 64), torch.randn(B, Hkv, T, 64)
        ref, logits = exact_attention(q, k, v)
        torch.testing.assert_close(ref, dense_attention(q, k, v, causal=True), rtol=1e-5, atol=1e-6)
        out, attended = ref + 0.01 * torch.randn_like(ref), torch.randint(0, T, (B, Hkv, 20))
        a = step_metrics(q, k, out, ref, attended, v)
        b = step_metrics(q, k, out, ref, attended, v, logits)
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_fidelity_stats_with_the_fp32_reference_match_the_sdpa_shadow():
    """A fp32 Fidelity run (the fp32 reference) against the same run with full's SDPA output as the reference (what the
    shadow gave before, and still gives in a half dtype or with drive=full): the metrics agree to float tolerance."""
    import kvbench.suites.fidelity as F

    torch.manual_seed(0)
    spec = LayerSpec(0, 1, 4, 2, 32, torch.float32, torch.device("cpu"))
    steps = [(torch.randn(1, 4, T, 32), torch.randn(1, 2, T, 32), torch.randn(1, 2, T, 32)) for T in (50, 1, 1, 1)]

    def stats() -> dict:
        f = Fidelity(inner=DropTop())
        layer = f.make_layer(spec)
        for i, (q, k, v) in enumerate(steps):
            (layer.prefill if i == 0 else layer.extend)(q, k, v)
        return f.stats.summary()

    orig = F.exact_attention
    try:
        a = stats()
        F.exact_attention = lambda q, k, v: (dense_attention(q, k, v, causal=True), None)  # the SDPA reference
        b = stats()
    finally:
        F.exact_attention = orig
    assert a.keys() == b.keys() and a["topk_recall"] == b["topk_recall"]
    for name in a:
        if not name.endswith("_layers"):
            assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-6), name
