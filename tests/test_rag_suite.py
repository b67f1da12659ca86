"""The rag suite (suites/rag.py) and its tasks (kvbench/rag_tasks.py): instances built offline from real prose, the
LongBench loader, records with every metric, the synthetic-model path the GPU run takes, and bad options."""

import json
from pathlib import Path

import pytest
import torch

from kvbench.errors import KVBenchError
from kvbench.rag_tasks import make_instance, scores
from kvbench.suite import get_suite
from test_tasks import tiny_tokenizer

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny(tok):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("task", ["1hop", "2hop"])
def test_hop_instances_hide_the_answer_in_the_right_documents(tok, task):
    inst = make_instance(tok, task, 5, 96, seed=3)
    p = inst.prompt
    assert len(p.docs) == 5 and all(0 < len(d) <= 96 for d in p.docs)
    texts = [tok.decode(d) for d in p.docs]
    holders = [i for i, t in enumerate(texts) if inst.info["key"] in t]
    assert holders == inst.info["answer_docs"] and len(holders) == (2 if task == "2hop" else 1)
    assert all("access code" in t for t in texts)  # every other document holds a distractor
    assert all(part in "".join(texts[i] for i in holders) for part in inst.parts)
    assert make_instance(tok, task, 5, 96, seed=3).prompt == p  # reproducible from the seed
    assert make_instance(tok, task, 5, 96, seed=4).prompt != p


def test_scores():
    inst = make_instance(tiny_tokenizer(), "2hop", 2, 64, seed=0)
    a, b = inst.parts
    right = scores(inst, f" {a} and ends with {b}.")
    assert right == {"score": 1.0, "f1": 1.0, "exact_match": 1.0, "substring": 1.0}
    half = scores(inst, f" {a} and ends with 000")
    assert half["score"] == half["substring"] == 0.5 and 0 < half["f1"] < 1 and half["exact_match"] == 0.0
    wrong = scores(inst, " 000 and ends with 000")
    assert wrong["score"] == 0.0 and wrong["f1"] > 0.5  # why F1 is not the score of the generated tasks


def test_longbench_file_gives_its_passages_as_documents(tok):
    inst = make_instance(tok, f"file:{DATA / 'longbench_hotpotqa.jsonl'}", 10, 64, seed=0)
    row = json.loads((DATA / "longbench_hotpotqa.jsonl").read_text().splitlines()[0])
    assert len(inst.prompt.docs) == row["context"].count("Passage") == inst.info["passages"]
    assert inst.answers == row["answers"] and all(len(d) <= 64 for d in inst.prompt.docs)
    assert tok.decode(inst.prompt.docs[0]).startswith("Passage 1:")


def test_bad_tasks_and_sizes_are_clear(tok):
    with pytest.raises(KVBenchError, match="N = 0"):
        make_instance(tok, "1hop", 0, 64, 0)
    with pytest.raises(KVBenchError, match="2hop needs at least 2"):
        make_instance(tok, "2hop", 1, 64, 0)
    with pytest.raises(KVBenchError, match="needs a tokenizer"):
        make_instance(None, "1hop", 2, 64, 0)
    suite = get_suite("rag")
    for bad, match in [(dict(documents="0"), "N = 0"), (dict(rag_methods="samkv:budget=2"), "budget"),
                       (dict(tasks="3hop"), "unknown rag task"), (dict(doc_tokens="4"), "too short")]:
        with pytest.raises(KVBenchError, match=match):
            suite.plan(None, **bad)


def test_suite_writes_every_metric(tiny, tok, tmp_path):
    res = get_suite("rag").run(["snapkv:capacity=0.25", "full"], tmp_path, loaded=(tiny, tok), tasks="2hop",
                               documents="3", doc_tokens="64", seeds="0", show_progress=False)
    recs = [json.loads(line) for line in (tmp_path / "rag.jsonl").read_text().splitlines()]
    assert (res.ok, res.failed) == (6, 0), [r.get("error") for r in recs]
    methods = [r["method"] for r in recs]
    assert methods == ["recompute", "reuse", "cacheblend", "epic", "samkv", "reuse+snapkv:capacity=0.25"]
    for r in recs:
        m = r["metrics"]
        for key in ("score", "f1", "exact_match", "substring", "ttft_s", "recompute_ratio", "bytes_held",
                    "first_logits_rel_err", "first_token_agrees", "prediction"):
            assert key in m, (r["method"], key)
    by = {r["method"]: r["metrics"] for r in recs}
    assert by["recompute"]["first_logits_rel_err"] == 0.0
    # the prefix (chat template) and the question are held whole: 3 x 64 document tokens are a small part here
    assert by["samkv"]["kept_ratio"] < 0.3 and by["samkv"]["bytes_held_vs_recompute"] < 0.75
    assert by["reuse"]["recompute_ratio"] == 0.0 and by["reuse"]["first_logits_rel_err"] > 0


def test_synthetic_model_path(tiny, tmp_path):
    """What the GPU run does (--model synthetic:... --tasks synthetic): random ids, no tokenizer, TTFT and bytes."""
    res = get_suite("rag").run([], tmp_path, loaded=(tiny, None), tasks="synthetic", documents="4",
                               doc_tokens="48", seeds="0", rag_methods="recompute samkv", show_progress=False)
    recs = [json.loads(line) for line in (tmp_path / "rag.jsonl").read_text().splitlines()]
    assert res.ok == 3 and res.failed == 0, [r.get("error") for r in recs]
    sam = next(r["metrics"] for r in recs if r["method"] == "samkv")
    assert "score" not in sam and sam["ttft_s"] > 0 and sam["bytes_held_vs_recompute"] < 0.5


def test_a_comparison_file_takes_a_rag_table(tmp_path):
    from kvbench.suites.compare import load_comparison

    f = tmp_path / "c.toml"
    f.write_text("methods = ['snapkv:capacity=0.15']\n[suites.rag]\nrag_methods = ['recompute', 'samkv:budget=0.2']\n"
                 "tasks = '2hop'\ndocuments = '6'\n")
    (plan,) = load_comparison(f).suites
    assert plan.name == "rag" and plan.options["rag_methods"] == ["recompute", "samkv:budget=0.2"]
    f.write_text("methods = ['full']\n[suites.rag]\nrag_methods = ['samkv:budget=3']\n")
    with pytest.raises(KVBenchError, match="budget"):
        load_comparison(f)
