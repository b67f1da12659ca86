"""RAG tasks: N documents of real prose, a question that needs one of them or two, and distractors; or the
documents of a LongBench multi-document QA file (2WikiMQA, HotpotQA, MuSiQue) a user brings.

Built offline from a seed. Each document is consecutive sentences of CPython's documentation (`pydoc_data.topics`,
the text the accuracy suite's docs haystack and ppl task use), filled to `doc_tokens` tokens, with one fact
sentence at a seed-drawn place. Keys are RULER-style "adjective-noun" pairs (suites/tasks.py).

- `1hop`: one document says "The access code of the <key> archive is <5 digits>."; every other document holds the
  same sentence for another key (a distractor). The answer needs that one document.
- `2hop`: the fact is split across two documents: one says the code "begins with <3 digits>", another that it
  "ends with <3 digits>"; the others hold begin/end halves of two distractor keys' codes. The answer needs both
  documents (a split fact rather than a bridge entity: the embedded 135M model cannot chain a bridge).
- `synthetic`: random token ids of the same sizes, for a model without a tokenizer (speed and bytes only).
- `file:PATH`: line `seed` of a LongBench JSONL file; its context is split at "Passage N:" into documents, each cut
  to `doc_tokens`, its first `documents` kept.

Scores: `f1` (token F1, LongBench's qa_f1_score), `exact_match` after normalisation, `substring` (the share of the
answer's parts found in the prediction); `score` is f1 for LongBench files and substring for 1hop/2hop.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from kvbench.errors import KVBenchError
from kvbench.rag import RagPrompt

RAG_TASKS = ("1hop", "2hop", "synthetic")
INSTRUCTION = "Answer the question using the documents below. Give only the answer.\n\n"


@dataclass
class RagInstance:
    prompt: RagPrompt
    answers: list[str]  # references for F1 and exact match
    parts: list[str]  # pieces that must all appear (substring score)
    max_new_tokens: int
    info: dict[str, Any] = field(default_factory=dict)
    metric: str = "substring"  # which of scores() is the record's `score`


def _template(tok) -> tuple[str, str, bool]:
    """The chat template's text before and after the user message ('' and '' without a template)."""
    if not getattr(tok, "chat_template", None):
        return "", "", False
    mark = "\x00USER\x00"
    text = tok.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True, tokenize=False)
    head, _, tail = text.partition(mark)
    return head, tail, True


def _ids(tok, text: str, first: bool, chat: bool) -> list[int]:
    return tok(text, add_special_tokens=first and not chat)["input_ids"]


def _prompt(tok, docs: list, question: str, answer_prefix: str) -> RagPrompt:
    """docs: texts, or token ids already cut."""
    head, tail, chat = _template(tok)
    return RagPrompt(_ids(tok, head + INSTRUCTION, True, chat),
                     [_ids(tok, d, False, chat) if isinstance(d, str) else d for d in docs],
                     _ids(tok, "Question: " + question + tail + answer_prefix, False, chat))


def _document(tok, rng: random.Random, fact: str, doc_tokens: int) -> str:
    """Documentation sentences from a random start, the fact at a random place, up to doc_tokens tokens."""
    from kvbench.suites.tasks import docs_sentences

    sents, count = docs_sentences(), (lambda s: len(tok(" " + s, add_special_tokens=False)["input_ids"]))
    budget = doc_tokens - count(fact) - 4
    body, at = [], rng.randrange(len(sents))
    while budget > 0:
        s = sents[at % len(sents)]
        at += 1
        n = count(s)
        if n > doc_tokens // 2:
            continue  # a code listing or a table: skip it
        if n > budget:
            break
        body.append(s)
        budget -= n
    at = rng.randint(0, len(body))
    while True:  # sentence counts are estimates: drop sentences from the end until the document fits
        text = "Document: " + " ".join(body[:at] + [fact] + body[at:]) + "\n\n"
        if len(tok(text, add_special_tokens=False)["input_ids"]) <= doc_tokens or not body:
            return text
        body.pop()
        at = min(at, len(body))


def _keys(rng: random.Random, n: int) -> list[str]:
    from kvbench.suites.tasks import ADJECTIVES, NOUNS

    keys: list[str] = []
    while len(keys) < n:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in keys:
            keys.append(k)
    return keys


def hop_instance(tok, task: str, n_docs: int, doc_tokens: int, seed: int) -> RagInstance:
    """A 1hop or 2hop instance (see the module docstring)."""
    if n_docs < (2 if task == "2hop" else 1):
        raise KVBenchError(f"{task} needs at least {2 if task == '2hop' else 1} documents, got {n_docs}")
    rng = random.Random(f"kvbench/rag/{task}/{n_docs}/{seed}")
    keys = _keys(rng, 3 if task == "2hop" else n_docs)
    order = rng.sample(range(n_docs), n_docs)  # order[0] (and order[1]) hold the answer
    facts = [""] * n_docs
    if task == "1hop":
        codes = [str(rng.randint(10000, 99999)) for _ in keys]
        for i, d in enumerate(order):
            facts[d] = f"The access code of the {keys[i]} archive is {codes[i]}."
        question, prefix = f"What is the access code of the {keys[0]} archive?", f"The access code is"
        answers, parts, new = [codes[0]], [codes[0]], 8
    else:
        halves = [(str(rng.randint(100, 999)), str(rng.randint(100, 999))) for _ in keys]
        for i, d in enumerate(order):
            key = 0 if i < 2 else 1 + (i % 2)
            half = i % 2
            word = "ends" if half else "begins"
            facts[d] = f"The access code of the {keys[key]} archive {word} with {halves[key][half]}."
        question = f"What does the access code of the {keys[0]} archive begin with, and what does it end with?"
        prefix = "It begins with"
        a, b = halves[0]
        answers, parts, new = [f"{a} and ends with {b}"], [a, b], 12
    docs = [_document(tok, rng, f, doc_tokens) for f in facts]
    info = {"answer_docs": sorted(order[: 2 if task == "2hop" else 1]), "key": keys[0]}
    return RagInstance(_prompt(tok, docs, question, " " + prefix), answers, parts, new, info)


def synthetic_instance(vocab: int, n_docs: int, doc_tokens: int, seed: int) -> RagInstance:
    """Random ids: 32 prefix tokens, n_docs x doc_tokens, a 32-token question (no answer: speed and bytes)."""
    rng = random.Random(f"kvbench/rag/synthetic/{seed}")
    ids = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    return RagInstance(RagPrompt(ids(32), [ids(doc_tokens) for _ in range(n_docs)], ids(32)), [], [], 8)


def file_instance(tok, path: str, n_docs: int, doc_tokens: int, seed: int) -> RagInstance:
    """Line `seed` of a LongBench file: its passages as documents (see the module docstring)."""
    from kvbench.suites.tasks import LONGBENCH, parse_file_task, read_jsonl

    p, _ = parse_file_task(path)
    rows = read_jsonl(str(p))
    if not 0 <= seed < len(rows):
        raise KVBenchError(f"{p} has {len(rows)} lines; seed {seed} has no line (seeds index the lines)")
    row = rows[seed]
    if "context" not in row or "answers" not in row:
        raise KVBenchError(f"{p}:{seed + 1}: not a LongBench line (context, input, answers); fields: {', '.join(row)}")
    passages = [s.strip() for s in re.split(r"(?=Passage \d+:)", str(row["context"])) if s.strip()]
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    docs = [tok(text, add_special_tokens=False)["input_ids"][: doc_tokens - len(sep)] + sep
            for text in passages[:n_docs]]
    answers = [str(a) for a in (row["answers"] if isinstance(row["answers"], list) else [row["answers"]])]
    name = row.get("dataset") or p.stem
    inst = RagInstance(_prompt(tok, docs, str(row.get("input", "")), " Answer:"), answers, answers[:1],
                       LONGBENCH.get(name, ("f1", 32))[1], {"dataset": name, "line": seed + 1,
                                                           "passages": len(passages)}, metric="f1")
    return inst


def make_instance(tok, task: str, n_docs: int, doc_tokens: int, seed: int, vocab: int = 0) -> RagInstance:
    if n_docs < 1:
        raise KVBenchError(f"a RAG prompt needs at least one document, got N = {n_docs}")
    if task == "synthetic":
        return synthetic_instance(vocab, n_docs, doc_tokens, seed)
    if tok is None:
        raise KVBenchError(f"task '{task}' needs a tokenizer; a synthetic model has none: use --tasks synthetic")
    if task.startswith("file:"):
        return file_instance(tok, task, n_docs, doc_tokens, seed)
    if task not in RAG_TASKS:
        raise KVBenchError(f"unknown rag task '{task}'; valid: {', '.join(RAG_TASKS)}, file:PATH")
    return hop_instance(tok, task, n_docs, doc_tokens, seed)


def scores(inst: RagInstance, prediction: str) -> dict[str, float]:
    """`f1` (token F1, LongBench's qa_f1_score), `exact_match` (after normalisation), `substring` (the share of the
    answer's parts found) and `score`: f1 for LongBench files, substring for 1hop/2hop (their references carry
    template words, "and ends with", that F1 would reward in a wrong answer)."""
    from kvbench.suites.tasks import _normalize, f1, string_match_all

    pred = prediction.strip().split("\n")[0]
    out = {"f1": f1(pred, inst.answers),
           "exact_match": float(any(_normalize(pred) == _normalize(a) for a in inst.answers)),
           "substring": string_match_all(pred, inst.parts)}
    return {"score": out[inst.metric], **out}
