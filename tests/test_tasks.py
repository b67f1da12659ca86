"""Accuracy tasks: lengths in tokens, needle depths, the question boundary, reproducibility, scorers, file loaders."""

import functools
import json
from pathlib import Path

import pytest

from kvbench.api import KVBenchError
from kvbench.suites import tasks as T

DATA = Path(__file__).parent / "data"
CHAT = ("{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@functools.cache
def tiny_tokenizer(chat: bool = True):
    """A byte-level BPE tokenizer trained in a second on the tasks' own texts: no download, any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|end|>", "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = T.NOISE * 50 + ["One of the special magic numbers for bold-tiger is: 1234567. The pass key is"] * 20
    tk.train_from_iterator(corpus + [T.docs_text()[:30000]], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>")
    if chat:
        tok.chat_template = CHAT
    return tok


def n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


GENERATED = ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt"]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("task", GENERATED)
@pytest.mark.parametrize("length", [400, 900])
def test_generators_hit_the_requested_length(task, length, chat):
    tok = tiny_tokenizer(chat)
    inst = T.make_instance(tok, task, length, 0.5, seed=3)
    # filled sentence by sentence: never over, and short by less than the longest haystack sentence (+ joins)
    slack = max(n_tokens(tok, " " + s) for s in T.NOISE) + 2
    assert length - slack <= len(inst.ids) <= length
    assert inst.info["prompt_tokens"] == len(inst.ids)
    assert 0 < inst.split < len(inst.ids)


@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.35, 0.5, 0.8, 1.0])
def test_needle_sits_at_the_requested_depth(task, depth):
    tok = tiny_tokenizer()
    inst = T.make_instance(tok, task, 1000, depth, seed=1)
    assert abs(inst.info["depth"] - depth) <= 0.03
    # the token the depth was measured at really starts the needle about the (first) asked key or the pass key
    after = tok.decode(inst.ids[inst.info["needle_token"]: inst.info["needle_token"] + 40])
    expected = f"The pass key is {inst.answers[0]}" if task == "passkey" else f"is: {inst.answers[0]}."
    assert expected in after
    # and the needle is in the context, before the question
    assert inst.info["needle_token"] < inst.split


def test_question_starts_at_split_and_context_holds_the_answers():
    tok = tiny_tokenizer()
    inst = T.make_instance(tok, "niah_multiquery", 800, 0.5, seed=0)
    context, question = tok.decode(inst.ids[: inst.split]), tok.decode(inst.ids[inst.split:])
    assert question.startswith("What are all the special magic numbers for ")
    assert question.rstrip().endswith("in the text above are")
    assert "<|assistant|>" in question and "<|user|>" in context
    for a in inst.answers:
        assert a in context and a not in question


def test_chat_template_is_used_when_the_tokenizer_has_one():
    with_chat = T.make_instance(tiny_tokenizer(True), "passkey", 300, 0.5, 0)
    plain = T.make_instance(tiny_tokenizer(False), "passkey", 300, 0.5, 0)
    assert tiny_tokenizer(True).decode(with_chat.ids).startswith("<|user|>\n")
    assert "<|user|>" not in tiny_tokenizer(False).decode(plain.ids)


def test_same_seed_same_instance_other_seed_other_needle():
    tok = tiny_tokenizer()
    for task in GENERATED + ["ppl"]:
        a, b = T.make_instance(tok, task, 500, 0.5, 7), T.make_instance(tok, task, 500, 0.5, 7)
        assert a.ids == b.ids and a.answers == b.answers and a.split == b.split
        c = T.make_instance(tok, task, 500, 0.5, 8)
        assert c.ids != a.ids
    # the needle content depends on the seed, not on the depth or length: depth sweeps compare like with like
    x, y = T.make_instance(tok, "niah_single", 500, 0.1, 2), T.make_instance(tok, "niah_single", 900, 0.9, 2)
    assert x.answers == y.answers


def test_niah_variants_hide_the_right_needles():
    tok = tiny_tokenizer()
    text = {t: tok.decode(T.make_instance(tok, t, 900, 0.4, 5).ids) for t in T.NIAH}
    count = {t: s.count("One of the special magic numbers for") for t, s in text.items()}
    assert count == {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4}
    mv = T.make_instance(tok, "niah_multivalue", 900, 0.4, 5)
    assert len(mv.answers) == 4 and len(set(mv.answers)) == 4
    key = text["niah_multivalue"].split("One of the special magic numbers for ")[1].split(" is:")[0]
    assert text["niah_multivalue"].count(f"numbers for {key} is:") == 4  # four values of one key
    mq = T.make_instance(tok, "niah_multiquery", 900, 0.4, 5)
    assert len(mq.answers) == 4 and tok.decode(mq.ids[mq.split:]).count("-") >= 4  # four keys asked
    mk = T.make_instance(tok, "niah_multikey", 900, 0.4, 5)
    assert len(mk.answers) == 1  # three distractors, one asked


def test_variable_tracking_chain_is_in_order_and_answers_are_its_variables():
    tok = tiny_tokenizer()
    inst = T.make_instance(tok, "vt", 900, None, 4)
    text = tok.decode(inst.ids[: inst.split])
    names = inst.answers
    assert len(names) == 5
    positions = [text.index(f"VAR {n} =") for n in names]
    assert positions == sorted(positions)  # each assignment comes after the one it copies
    value = text.split(f"VAR {names[0]} = ")[1].split(".")[0]
    assert value.isdigit() and value in tok.decode(inst.ids[inst.split:])
    for prev, cur in zip(names, names[1:]):
        assert f"VAR {cur} = VAR {prev}." in text


def test_ppl_window_is_exact_and_scores_the_tail():
    tok = tiny_tokenizer()
    inst = T.make_instance(tok, "ppl", 600, None, 0, score_tokens=50)
    assert len(inst.ids) == 600 and inst.split == 550 and inst.score_tokens == 50
    ids = tok(T.docs_text(), add_special_tokens=False)["input_ids"]
    off = inst.info["offset"]
    assert ids[off: off + 600] == inst.ids


def test_ppl_reads_a_user_text_file(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("It was a bright cold day in April, and the clocks were striking thirteen. " * 200)
    tok = tiny_tokenizer()
    inst = T.make_instance(tok, "ppl", 300, None, 1, text=f, score_tokens=20)
    assert "clocks were striking" in tok.decode(inst.ids) and inst.info["text"] == str(f)
    with pytest.raises(KVBenchError, match="fewer than the requested length"):
        T.make_instance(tok, "ppl", 10**6, None, 1, text=f)


def test_too_short_a_length_is_a_clear_error():
    with pytest.raises(KVBenchError, match="requested length 20"):
        T.make_instance(tiny_tokenizer(), "niah_multiquery", 20, 0.5, 0)
    with pytest.raises(KVBenchError, match="outside"):
        T.make_instance(tiny_tokenizer(), "passkey", 300, 1.5, 0)
    with pytest.raises(KVBenchError, match="unknown task 'nosuch'"):
        T.make_instance(tiny_tokenizer(), "nosuch", 300, 0.5, 0)


# --- scorers ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric, pred, refs, want", [
    ("string_match_all", "The pass key is 72306.", ["72306"], 1.0),
    ("string_match_all", "The pass key is 72307.", ["72306"], 0.0),
    ("string_match_all", "1111111, 2222222 and 9999999", ["1111111", "2222222", "3333333", "4444444"], 0.5),
    ("string_match_all", "vars: ABCDE, fghij", ["ABCDE", "FGHIJ"], 1.0),  # case-insensitive, as RULER
    ("string_match_part", "it is Paris, I think", ["London", "paris"], 1.0),
    ("string_match_part", "it is Rome", ["London", "paris"], 0.0),
    ("substring", "answer: 42", ["42"], 1.0),
    ("f1", "The cat sat", ["cat sat on the mat"], 2 * 1.0 * 0.5 / 1.5),  # p = 2/2, r = 2/4 (articles dropped)
    ("f1", "Barack Obama.", ["barack obama", "Obama"], 1.0),
    ("f1", "nothing alike", ["cat sat on the mat"], 0.0),
    ("rouge_l", "a cat sat on a mat", ["the cat was on the mat"], 2 * 0.75 * 0.75 / 1.5),  # LCS cat-on-mat: 3/4
    ("numbers", "Paragraph 12", ["Paragraph 12"], 1.0),
    ("numbers", "Paragraphs 3 and 12", ["Paragraph 12"], 0.5),
    ("numbers", "no idea", ["7"], 0.0),
    ("edit_sim", "x = foo(1)\nmore", ["x = foo(1)"], 1.0),
])
def test_scorers(metric, pred, refs, want):
    assert T.score(metric, pred, refs) == pytest.approx(want)


def test_classification_follows_longbench():
    classes = ["Location", "Description", "Definition of something"]
    assert T.score("classification", "Location", ["Location"], all_classes=classes) == 1.0
    assert T.score("classification", "Location or Description", ["Location"], all_classes=classes) == 0.5
    assert T.score("classification", "Description", ["Location"], all_classes=classes) == 0.0


def test_unknown_metric_and_empty_answers_are_errors():
    with pytest.raises(KVBenchError, match="unknown metric"):
        T.score("bleu", "x", ["x"])
    with pytest.raises(KVBenchError, match="no reference answers"):
        T.score("f1", "x", [])


def test_an_answer_is_settled_only_when_no_continuation_can_change_its_score():
    def inst(metric, answers, **info):
        return T.Instance("t", [0], 0, answers, metric, 10, info)

    both = inst("string_match_all", ["123", "456"])
    assert not both.settled("123 and") and both.settled("123 and 456") and both.settled("123 and 456 and more")
    assert inst("substring", ["a", "b"]).settled("xbx")
    # f1 falls as text is appended: never settled, even at 1
    curie = inst("f1", ["Marie Curie"])
    assert curie.score("Marie Curie") == 1.0 and not curie.settled("Marie Curie")
    # a first-line dataset scores its first line only
    first = inst("string_match_all", ["42"], format="longbench", dataset="trec")
    assert T.first_line_only(first) and first.score("\n7\n42") == 0.0 and first.score("\n42\n7") == 1.0


# --- LongBench / RULER files ------------------------------------------------------------------------------------


def test_longbench_lines_map_context_input_answers():
    tok = tiny_tokenizer()
    path = DATA / "longbench_hotpotqa.jsonl"
    task = f"file:{path}"
    inst = T.make_instance(tok, task, 4000, None, 0)
    row = json.loads(path.read_text().splitlines()[0])
    assert inst.metric == "f1" and inst.max_new_tokens == 32  # LongBench's hotpotqa metric and answer length
    assert inst.answers == row["answers"] and inst.info["format"] == "longbench" and inst.info["dataset"] == "hotpotqa"
    assert inst.info["truncated_tokens"] == 0
    context, question = tok.decode(inst.ids[: inst.split]), tok.decode(inst.ids[inst.split:])
    assert row["context"][:40] in context and row["input"] in question and row["input"] not in context
    assert inst.score("Marie Curie") == 1.0 and inst.score("Albert Einstein") == 0.0


def test_longbench_context_is_cut_in_the_middle_to_fit():
    tok = tiny_tokenizer()
    task = f"file:{DATA / 'longbench_hotpotqa.jsonl'}"
    full = T.make_instance(tok, task, 10**5, None, 1)
    cut = T.make_instance(tok, task, full.info["prompt_tokens"] - 60, None, 1)
    assert len(cut.ids) <= full.info["prompt_tokens"] - 60 and cut.info["truncated_tokens"] >= 60
    text, row = tok.decode(cut.ids), json.loads((DATA / "longbench_hotpotqa.jsonl").read_text().splitlines()[1])
    assert row["context"][:30] in text and row["context"][-30:] in text  # head and tail kept, middle dropped
    assert row["input"] in tok.decode(cut.ids[cut.split:])


def test_ruler_lines_map_input_outputs_and_answer_prefix():
    tok = tiny_tokenizer()
    path = DATA / "ruler_niah_single.jsonl"
    row = json.loads(path.read_text().splitlines()[0])
    inst = T.make_instance(tok, f"file:{path}", 4000, None, 0)
    assert inst.metric == "string_match_all" and inst.answers == row["outputs"] and inst.info["format"] == "ruler"
    question = tok.decode(inst.ids[inst.split:])
    assert question.startswith("What is the special magic number for")  # the line after the last newline
    assert question.rstrip().endswith(row["answer_prefix"].strip())
    assert row["outputs"][0] in tok.decode(inst.ids[: inst.split])
    over = T.make_instance(tok, f"file:{path}#f1", 4000, None, 0)
    assert over.metric == "f1"


def test_file_task_errors_name_the_problem(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(KVBenchError, match="no such file"):
        T.make_instance(tok, f"file:{tmp_path / 'missing.jsonl'}", 500, None, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "gold": "a"}) + "\n")
    with pytest.raises(KVBenchError, match="neither a LongBench line"):
        T.make_instance(tok, f"file:{bad}", 500, None, 0)
    with pytest.raises(KVBenchError, match="has 2 lines; seed 5"):
        T.make_instance(tok, f"file:{DATA / 'longbench_hotpotqa.jsonl'}", 500, None, 5)
    with pytest.raises(KVBenchError, match="unknown metric"):
        T.make_instance(tok, f"file:{DATA / 'longbench_hotpotqa.jsonl'}#bleu", 500, None, 0)


@pytest.mark.slow
@pytest.mark.parametrize("task", GENERATED)
def test_embedded_tokenizer_lengths_and_depths(task):
    from transformers import AutoTokenizer

    from kvbench.models import embedded_path

    tok = AutoTokenizer.from_pretrained(embedded_path())
    for length in (1024, 4096):
        inst = T.make_instance(tok, task, length, 0.3, 0)
        assert length - 12 <= len(inst.ids) <= length
        if task in T.DEPTH_TASKS:
            assert abs(inst.info["depth"] - 0.3) <= 0.02
