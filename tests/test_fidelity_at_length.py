"""The fidelity suite (suites/fidelity_at_length.py) and the stage errors it records: selection alone against what
storage adds, on hand-made cases, through a test double, and as a tiny sweep on a tiny random model."""

import pytest
import torch
from test_bridge import tiny_config
from test_fidelity import DropTop, drive
from test_tasks import tiny_tokenizer

from kvbench import parse_method
from kvbench.api import LayerSpec
from kvbench.records import read_records
from kvbench.suites import fidelity_at_length as F
from kvbench.suites.fidelity import Fidelity, step_metrics

GRID = dict(lengths="300", steps=2, seeds="0", show_progress=False)


def test_stage_errors_split_selection_from_storage():
    torch.manual_seed(0)
    q, keys, values = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(q, keys.repeat_interleave(2, 1),
                                                         values.repeat_interleave(2, 1))
    picked = torch.tensor([[[0, 3, 5], [1, 2, 11]]])
    rows = picked[..., None].expand(-1, -1, -1, 8)
    sel = torch.nn.functional.scaled_dot_product_attention(  # exact attention over the picked tokens alone
        q, keys.gather(2, rows).repeat_interleave(2, 1), values.gather(2, rows).repeat_interleave(2, 1))
    m = step_metrics(q, keys, sel, ref, picked, values)  # a method that stores exactly: nothing lost to storage
    torch.testing.assert_close(m["storage_err"], torch.zeros(1, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(m["sel_out_err"], m["out_rel_err"])
    assert m["sel_out_err"].min() > 0.01
    noisy = sel + 0.1 * ref.norm(dim=-1, keepdim=True) * torch.nn.functional.normalize(torch.randn_like(sel), dim=-1)
    m = step_metrics(q, keys, noisy, ref, picked, values)  # storage noise of 10% of |o_full| on top of that selection
    torch.testing.assert_close(m["storage_err"], torch.full((1, 4), 0.1), atol=1e-5, rtol=0)
    m = step_metrics(q, keys, noisy, ref, None, values)  # attends everything: every error is storage's
    assert m["sel_out_err"].abs().max() == 0 and torch.equal(m["storage_err"], m["out_rel_err"])


def test_drive_full_hands_the_model_full_attention_and_still_measures_the_method():
    torch.manual_seed(3)
    spec = LayerSpec(0, 1, 6, 2, 16, torch.float32, torch.device("cpu"))
    by_method, by_full = (Fidelity(inner=DropTop(), drive=d).make_layer(spec) for d in ("method", "full"))
    q, k, v = torch.randn(1, 6, 30, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    for layer in (by_method, by_full):
        layer.prefill(q, k, v)
    q1, k1, v1 = torch.randn(1, 6, 1, 16), 3 * torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    a, b = by_method.extend(q1, k1, v1), by_full.extend(q1, k1, v1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q1, torch.cat([k, k1], 2).repeat_interleave(3, 1), torch.cat([v, v1], 2).repeat_interleave(3, 1))
    torch.testing.assert_close(b, ref, atol=1e-5, rtol=1e-5)  # the model sees full attention
    assert not torch.allclose(a, ref, atol=1e-4)  # ... where the method's own output differs
    assert by_full.stats.summary()["out_rel_err"] == pytest.approx(by_method.stats.summary()["out_rel_err"])
    with pytest.raises(ValueError, match="drive"):
        Fidelity(inner=DropTop(), drive="nobody")


def test_attribution_names_the_worst_layer_and_the_stage():
    s = dict(out_rel_err_layers=[0.1, 0.4, 0.2], sel_out_err_layers=[0.05, 0.1, 0.15],
             storage_err_layers=[0.08, 0.35, 0.05], sel_out_err=0.1, storage_err=0.16)
    assert F.attribution(s) == dict(worst_layer=1, worst_stage="storage", loss_stage="storage")
    assert F.attribution({}) == {}


def test_drop_top_loses_in_selection_only():
    summary, _ = drive(DropTop())
    assert summary["sel_out_err"] > 1e-3 and summary["storage_err"] < 1e-5
    assert F.attribution(summary)["loss_stage"] == "selection"


@pytest.fixture(scope="module")
def tiny():
    """SmolLM2's attention shape (head_dim 64: selfindex needs a multiple of 32), 3 layers, random weights."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_config(num_hidden_layers=3, vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=None)
    return AutoModelForCausalLM.from_config(cfg).eval(), tok


def test_tiny_sweep_records_per_layer_stages_and_the_table(tiny, tmp_path):
    methods = ["selfindex:budget=0.5,sinks=4,window=4", "selfindex:budget=0.5,sinks=4,window=4,setting=16+1", "kivi"]
    res = F.run(methods, tmp_path, model="tiny", loaded=tiny, **GRID)
    recs = {r["method"]: r for r in read_records([tmp_path / "fidelity.jsonl"])[0]}
    assert all(r["status"] == "ok" for r in recs.values()), [r["error"] for r in recs.values()]
    two, sixteen, kivi = (recs[parse_method(m).label()]["metrics"] for m in methods)
    for m in (two, sixteen, kivi):
        assert len(m["out_rel_err_layers"]) == 3 and m["fidelity_steps"] == 2 * 3  # steps x KV heads
        assert m["prompt_tokens"] == 300 - 3 and "ppl" not in m  # teacher-forced: the logits are full's
    # the same index picks the same tokens in both settings: the selection stage is shared, storage is 2+1's alone
    assert two["sel_out_err_layers"] == pytest.approx(sixteen["sel_out_err_layers"], rel=1e-4)
    assert sixteen["storage_err"] < 1e-5 < two["storage_err"]
    assert kivi["sel_out_err"] == 0 and kivi["loss_stage"] == "storage" and kivi["storage_err"] > 0
    rows = F.summary_rows(list(recs.values()))
    assert {r["method"] for r in rows} == set(recs) and all(r["where"].startswith("layer ") for r in rows)
    assert len(res.records) == 3
    again = F.run(methods, tmp_path, model="tiny", loaded=tiny, **GRID)
    assert again.already_done == 3


def test_method_drive_records_the_methods_own_perplexity(tiny, tmp_path):
    F.run(["kivi"], tmp_path, model="tiny", loaded=tiny, drive="method", **GRID)
    (r,) = read_records([tmp_path / "fidelity.jsonl"])[0]
    assert r["status"] == "ok" and r["metrics"]["ppl"] > 1 and r["cell"]["drive"] == "method"


def fidelity_records() -> list[dict]:
    """Two methods at 4K and 8K with per-layer arrays, as the suite writes them (for the report's tests)."""
    out = []
    for method, storage in (("selfindex:budget=0.1", 0.1), ("selfindex:budget=0.1,setting=16+1", 0.0)):
        for context in (4096, 8192):
            layers = {f"{n}_layers": [v + 0.01 * i for i in range(4)] for n, v in (
                ("topk_recall", 0.5), ("attn_mass", 0.85), ("sel_out_err", 0.12), ("storage_err", storage),
                ("out_rel_err", 0.12 + storage))}
            out.append({"schema": 1, "suite": "fidelity", "method": method, "params": {}, "status": "ok",
                        "error": None, "cell": {"model": "embedded", "context": context, "seed": 0, "drive": "full"},
                        "metrics": {**layers, **{k.removesuffix("_layers"): v[0] for k, v in layers.items()}},
                        "env": {"host": "ci-runner", "gpu": None, "commit": "fedcba9876543210"},
                        "started_at": "2026-01-01T00:00:00+00:00", "duration_s": 1.0})
    return out


def test_the_report_draws_one_line_per_method_and_context(tmp_path):
    import json

    from kvbench.reports.build import build_report
    from kvbench.reports.fidelity_plot import PANELS, fidelity_at_length

    (tmp_path / "fidelity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fidelity_records()))
    out, inp = build_report([tmp_path], tmp_path / "report.html")
    assert not inp.problems and 'id="chart-fidelity-length"' in out.read_text()
    fig = fidelity_at_length(fidelity_records(), {})
    assert {t.name for t in fig.data} == {f"{m} @ {c}" for m in ("selfindex:budget=0.1",
                                          "selfindex:budget=0.1,setting=16+1") for c in ("4K", "8K")}
    assert len(fig.data) == 4 * len(PANELS)
    panel = [name for name, _ in PANELS].index("storage_err")
    storage = [t for t in fig.data if t.name == "selfindex:budget=0.1 @ 8K"][panel]  # one trace per panel, in order
    assert list(storage.y) == pytest.approx([0.1, 0.11, 0.12, 0.13])
