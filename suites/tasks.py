"""Accuracy tasks: generated locally, reproducible from a seed, sized in the model's own tokens; and their scorers.

Every generator returns an `Instance`: the prompt's token ids (the model's chat template applied when it has one),
the token index where the question starts (`split`: the query-agnostic protocol prefills `ids[:split]` first), the
reference answers, the metric that scores a prediction against them, and facts such as where the needle sits.

Tasks (`TASKS`):
- `passkey`: a 5-digit pass key in a repeated filler, the test of Mohtashami & Jaggi 2023 (Landmark Attention,
  https://arxiv.org/abs/2305.16300); its filler is the RULER "noise" haystack.
- `niah_single`, `niah_multikey`, `niah_multivalue`, `niah_multiquery`: RULER-style needles in a haystack (Hsieh et
  al. 2024, https://arxiv.org/abs/2404.06654): "one of the special magic numbers for <key> is: <7 digits>". multikey
  adds 3 distractor needles with other keys; multivalue hides 4 values for one key and asks for all; multiquery asks
  for the values of 4 keys at once. The haystack is RULER's noise sentences (default) or CPython's documentation text
  (`haystack="docs"`).
- `vt`: RULER's variable tracking: one chain `VAR A = 12345`, `VAR B = VAR A`, ... (4 hops) spread through the noise
  haystack; the model must list every variable holding the value.
- `ppl`: perplexity of natural text (default: the English documentation that ships with CPython as
  `pydoc_data.topics`; or any text file). The first `length - score_tokens` tokens are prefilled, then the last
  `score_tokens` are fed one at a time through the cache's decode path (extend with 1 token), so every scored token
  is predicted by a compressed cache, as in decoding.
- `file:PATH[#metric]`: LongBench (`context`, `input`, `answers`) or RULER (`input`, `outputs`, `answer_prefix`) JSONL
  lines a user already has; seed s is line s. The context is cut in its middle to fit the length, as LongBench does.

Depth is the fraction of the haystack (the context without its needles, in tokens) that comes before the needle
asked about: 0 puts it first, 1 last. Other needles of the multi-needle tasks sit at depths drawn from the seed. The
prompt length counts every prompt token (template, question and answer prefix included); generators fill the haystack
sentence by sentence up to it, so a prompt is at most `length` tokens and short of it by less than one sentence.

What the embedded SmolLM2-135M-Instruct does with the full cache (CPU, fp32, 1K-token prompts, depth 0.5, seeds 0-2,
query-aware, these generators): passkey 3/3, niah_single 3/3 (also with the docs haystack at 1K and 2K tokens),
niah_multikey 3/3 (5/6 over depths 0.2/0.5/0.8 x seeds 0-1), niah_multivalue 0.92 and niah_multiquery 0.75 mean
(it lists some values twice and misses others), vt 0.6 mean (it copies chain statements; with RULER's answer prefix
alone it scored 0/3, so "VAR" ends the prefix here). The quick profile (suites/accuracy.py) keeps the tasks it does
reliably: passkey, niah_single, niah_multikey and ppl.
"""

from __future__ import annotations

import functools
import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any, Callable

from kvbench.errors import KVBenchError

# RULER's "noise" haystack (and the passkey test's filler), one sentence per item so prompts fit tightly
NOISE = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]

# keys of the needle tasks are "adjective-noun" pairs, as RULER's words keys are
ADJECTIVES = ("amber bold brave bright calm clever crisp curious dark eager early fancy fierce gentle golden happy "
              "hidden humble icy jolly kind lively loud lucky misty modest noble odd plain proud quiet rapid rough "
              "royal rusty shiny silent silver smooth sunny tall tidy vivid warm wild young").split()
NOUNS = ("anchor apple badger basket beacon candle canyon castle cloud comet copper dragon falcon feather forest "
         "garden glacier hammer harbor island jacket kettle ladder lantern meadow mirror needle orchard otter pencil "
         "pepper planet puzzle rabbit river rocket saddle signal tiger tunnel valley violin wagon window").split()

QUERY_AWARE, QUERY_AGNOSTIC = "query-aware", "query-agnostic"
PROTOCOLS = (QUERY_AWARE, QUERY_AGNOSTIC)


@dataclass
class Instance:
    """One task instance, ready to feed a model.

    ids [T] are the whole prompt; `split` is where the question starts (the query-agnostic protocol prefills
    ids[:split], then feeds ids[split:] as one extend chunk). For `ppl`, the last `score_tokens` ids are scored
    instead of generating."""

    task: str
    ids: list[int]
    split: int
    answers: list[str]
    metric: str
    max_new_tokens: int
    info: dict[str, Any] = field(default_factory=dict)
    score_tokens: int = 0
    score_kwargs: dict[str, Any] = field(default_factory=dict)

    def score(self, prediction: str) -> float:
        """The score of a whole generated answer (a first_line_only dataset scores its first line)."""
        if first_line_only(self):
            prediction = prediction.lstrip("\n").split("\n")[0]
        return score(self.metric, prediction, self.answers, **self.score_kwargs)

    def settled(self, prediction: str) -> bool:
        """Whether no continuation of `prediction` can change its score: the metric never falls when text is
        appended and is already at its maximum, so decoding further would only lengthen the prediction."""
        return self.metric in NEVER_FALL and self.score(prediction) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Scorers: prediction text and reference answers -> 0..1


def _normalize(s: str) -> str:
    """Lower-case, drop punctuation and English articles, squeeze spaces (SQuAD's answer normalisation, as
    LongBench's qa_f1_score uses it)."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def string_match_all(pred: str, refs: list[str], **_) -> float:
    """RULER's string_match_all: the share of references found (case-insensitive) in the prediction."""
    return sum(r.lower() in pred.lower() for r in refs) / len(refs)


def string_match_part(pred: str, refs: list[str], **_) -> float:
    """RULER's string_match_part, i.e. substring match: 1 when any reference occurs (case-insensitive) in the
    prediction."""
    return float(any(r.lower() in pred.lower() for r in refs))


def f1(pred: str, refs: list[str], **_) -> float:
    """Token F1 after normalisation, best over the references (LongBench's qa_f1_score)."""
    best = 0.0
    p = _normalize(pred).split()
    for ref in refs:
        r = _normalize(ref).split()
        same = sum((Counter(p) & Counter(r)).values())
        if same:
            prec, rec = same / len(p), same / len(r)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def rouge_l(pred: str, refs: list[str], **_) -> float:
    """ROUGE-L F1 (longest common subsequence of normalised words), best over the references; LongBench's
    summarisation metric."""
    p = _normalize(pred).split()
    best = 0.0
    for ref in refs:
        r = _normalize(ref).split()
        if not p or not r:
            continue
        row = [0] * (len(r) + 1)  # one row of the LCS table at a time
        for a in p:
            prev = 0
            for j, b in enumerate(r, 1):
                cur = row[j]
                row[j] = prev + 1 if a == b else max(row[j], row[j - 1])
                prev = cur
        lcs = row[-1]
        if lcs:
            prec, rec = lcs / len(p), lcs / len(r)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def numbers(pred: str, refs: list[str], **_) -> float:
    """The share of numbers in the prediction equal to the reference's (last) number: LongBench's count and
    retrieval scores (a retrieval reference reads "Paragraph 12")."""
    found = re.findall(r"\d+", pred)
    best = 0.0
    for ref in refs:
        want = re.findall(r"\d+", ref)
        if found and want:
            best = max(best, sum(n == want[-1] for n in found) / len(found))
    return best


def classification(pred: str, refs: list[str], all_classes: list[str] | None = None, **_) -> float:
    """LongBench's classification score: among the class names the prediction mentions (names that are part of the
    reference but not it dropped), 1/count if the reference is one of them."""
    if not all_classes:
        return string_match_part(pred, refs)
    best = 0.0
    for ref in refs:
        hits = [c for c in all_classes if c in pred and not (c in ref and c != ref)]
        if ref in hits:
            best = max(best, 1.0 / len(hits))
    return best


def edit_sim(pred: str, refs: list[str], **_) -> float:
    """Edit similarity of the first code line of the prediction (LongBench's code_sim_score, which uses fuzzywuzzy's
    ratio: difflib's SequenceMatcher ratio)."""
    lines = [ln for ln in pred.lstrip("\n").split("\n") if not any(c in ln for c in ("`", "#", "//"))]
    first = lines[0] if lines else ""
    return max(SequenceMatcher(None, first, r).ratio() for r in refs)


# metrics that appending text to a prediction never lowers (containment of references): Instance.settled
NEVER_FALL = ("string_match_all", "string_match_part", "substring")
METRICS: dict[str, Callable[..., float]] = {
    "string_match_all": string_match_all, "string_match_part": string_match_part, "substring": string_match_part,
    "f1": f1, "rouge_l": rouge_l, "numbers": numbers, "classification": classification, "edit_sim": edit_sim,
}


def score(metric: str, prediction: str, answers: list[str], **kwargs) -> float:
    """Score a prediction with a metric from METRICS; 0..1."""
    if metric not in METRICS:
        raise KVBenchError(f"unknown metric '{metric}'; valid: {', '.join(METRICS)}")
    if not answers:
        raise KVBenchError("a task instance has no reference answers to score against")
    return float(METRICS[metric](prediction, list(answers), **kwargs))


# ---------------------------------------------------------------------------------------------------------------
# Prompts: chat template, token counts, the question boundary


def _encode(tok, text: str, chat: bool) -> list[int]:
    # a rendered chat template already holds its special tokens as text; without one, the tokenizer adds its own
    return tok(text, add_special_tokens=not chat)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Rendered:
    text: str
    ids: list[int]
    chat: bool
    user_at: int  # char offset of the user message in text

    def token_at(self, tok, char: int) -> int:
        """Index of the token that holds char `char` of the user message (the question start, a needle)."""
        return _common_prefix(_encode(tok, self.text[: self.user_at + char], self.chat), self.ids)


def render(tok, user: str, answer_prefix: str = "") -> Rendered:
    """The prompt the model sees: the user message in the chat template when the tokenizer has one, then the answer
    prefix as the start of the assistant's turn (RULER puts its answer prefixes there too)."""
    chat = bool(getattr(tok, "chat_template", None))
    if chat:
        head = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
        at = head.find(user)
        if at < 0:
            raise KVBenchError("the tokenizer's chat template alters the user message; kvbench cannot locate the "
                               "question in it (pass a model without a chat template, or a plain tokenizer)")
        text = head + answer_prefix
    else:
        text, at = user + "\n\n" + answer_prefix, 0
    return Rendered(text, _encode(tok, text, chat), chat, at)


def fit(build: Callable[[int], tuple[Rendered, Any]], length: int, what: str = "task"):
    """The largest haystack size n with len(build(n)[0].ids) <= length, by doubling then bisection; returns
    (n, build(n))."""
    lo, lo_val = 0, build(0)
    if len(lo_val[0].ids) > length:
        raise KVBenchError(f"{what}: its template and question alone take {len(lo_val[0].ids)} tokens, more than the "
                           f"requested length {length}; ask for a longer context")
    per = max(1.0, (len(build(16)[0].ids) - len(lo_val[0].ids)) / 16)  # tokens per haystack unit, to start near
    hi = max(1, int((length - len(lo_val[0].ids)) / per))
    while True:
        got = build(hi)
        if len(got[0].ids) > length:
            break
        lo, lo_val, hi = hi, got, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        got = build(mid)
        if len(got[0].ids) <= length:
            lo, lo_val = mid, got
        else:
            hi = mid
    return lo, lo_val


# ---------------------------------------------------------------------------------------------------------------
# Haystacks


@functools.lru_cache(maxsize=1)
def docs_sentences() -> tuple[str, ...]:
    """CPython's documentation text (pydoc_data.topics), whitespace squeezed, cut into sentences."""
    text = docs_text()
    return tuple(s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", re.sub(r"\s+", " ", text)) if s)


@functools.lru_cache(maxsize=1)
def docs_text() -> str:
    """The English documentation topics that ship with CPython (about 465K characters), in a stable order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def haystack_sentences(kind: str, n: int, rng_start: int) -> list[str]:
    """n haystack sentences: RULER's noise sentences cycled, or consecutive documentation sentences from a
    seed-chosen start."""
    if kind == "noise":
        return [NOISE[i % len(NOISE)] for i in range(n)]
    if kind == "docs":
        sents = docs_sentences()
        return [sents[(rng_start + i) % len(sents)] for i in range(n)]
    raise KVBenchError(f"unknown haystack '{kind}'; valid: noise, docs")


HAYSTACKS = ("noise", "docs")


def _place(sentences: list[str], needles: list[tuple[float, str]], count: Callable[[str], int]):
    """Join sentences with needles inserted so that d x the haystack's tokens (counted piece by piece with `count`)
    come before a needle of depth d; returns the text and each needle's char offset, in the order given."""
    total = sum(map(count, sentences))
    order = sorted(range(len(needles)), key=lambda i: needles[i][0])
    parts, offsets, pos, acc, k = [], [0] * len(needles), 0, 0, 0
    for j in range(len(sentences) + 1):
        # insert before sentence j when that lands nearer the target than inserting after it would
        while k < len(order) and (j == len(sentences)
                                  or acc + count(sentences[j]) / 2 > needles[order[k]][0] * total):
            i = order[k]
            offsets[i], pos, k = pos, pos + len(needles[i][1]) + 1, k + 1
            parts.append(needles[i][1])
        if j < len(sentences):
            parts.append(sentences[j])
            pos, acc = pos + len(sentences[j]) + 1, acc + count(sentences[j])
    return " ".join(parts), offsets


def _rng(task: str, seed: int) -> random.Random:
    # str seeds are hashed with SHA-512 by random.seed, so instances are the same in every process
    return random.Random(f"kvbench/{task}/{seed}")


def _check_depth(depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise KVBenchError(f"depth {depth} is outside [0, 1]; it is the fraction of the context before the needle")


def _needle_instance(tok, task: str, length: int, depth: float, seed: int, *, preamble: str, question: str,
                     answer_prefix: str, needles: list[tuple[float, str]], answers: list[str], metric: str,
                     max_new_tokens: int, kind: str, start: int) -> Instance:
    """Fit a haystack with needles to `length` tokens; the first needle is the one whose depth is measured."""

    @functools.lru_cache(maxsize=None)
    def count(piece: str) -> int:  # tokens of one haystack sentence or needle, as it sits after a space
        return len(tok(" " + piece, add_special_tokens=False)["input_ids"])

    def build(n: int):
        ctx, offs = _place(haystack_sentences(kind, n, start), needles, count)
        user = preamble + ctx + "\n" + question
        return render(tok, user, answer_prefix), (len(preamble), len(preamble) + len(ctx), offs)

    n, (r, (c0, c1, offs)) = fit(build, length, what=task)
    q_tok, t0, t1 = r.token_at(tok, c1 + 1), r.token_at(tok, c0), r.token_at(tok, c1)
    needle_tok = r.token_at(tok, c0 + offs[0])
    # measured depth: haystack tokens before the first needle over all haystack tokens (needles not counted)
    before = sum(count(t) for (_, t), off in zip(needles, offs) if off < offs[0])
    hay = t1 - t0 - sum(count(t) for _, t in needles)
    info = dict(prompt_tokens=len(r.ids), context_tokens=t1 - t0, needle_token=needle_tok, haystack=kind,
                depth_requested=depth, depth=round((needle_tok - t0 - before) / max(1, hay), 4), haystack_units=n)
    return Instance(task, r.ids, q_tok, answers, metric, max_new_tokens, info)


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in taken:
            taken.add(k)
            return k


def passkey(tok, length: int, depth: float = 0.5, seed: int = 0, **_) -> Instance:
    """A 5-digit pass key in the noise filler; the answer prefix ends in a space so digits come next."""
    _check_depth(depth)
    rng = _rng("passkey", seed)
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return _needle_instance(tok, "passkey", length, depth, seed, preamble="", question="\nWhat is the pass key?",
                            answer_prefix="The pass key is ", needles=[(depth, needle)], answers=[key],
                            metric="string_match_all", max_new_tokens=10, kind="noise", start=0)


NIAH = {  # name -> (keys in the text, values per key, keys asked about)
    "niah_single": (1, 1, 1),
    "niah_multikey": (4, 1, 1),
    "niah_multivalue": (1, 4, 1),
    "niah_multiquery": (4, 1, 4),
}


def niah(tok, length: int, depth: float = 0.5, seed: int = 0, *, task: str = "niah_single", haystack: str = "noise",
         **_) -> Instance:
    """RULER-style needle in a haystack; see NIAH for the variants."""
    _check_depth(depth)
    n_keys, n_values, n_query = NIAH[task]
    rng = _rng(task, seed)
    taken: set[str] = set()
    keys = [_key(rng, taken) for _ in range(n_keys)]
    values = [[str(rng.randint(10**6, 10**7 - 1)) for _ in range(n_values)] for _ in keys]
    needles = []
    for i, k in enumerate(keys):
        for j, v in enumerate(values[i]):
            # the first needle sits at the requested depth, every other one at a depth drawn from the seed, not
            # right next to it (a needle just before the first one would push it deeper)
            d = depth
            while (i, j) != (0, 0) and abs(d - depth) < 0.05:
                d = rng.random()
            needles.append((d, f"One of the special magic numbers for {k} is: {v}."))
    asked = keys[:n_query]
    answers = [v for i in range(n_query) for v in values[i]]
    many = len(answers) > 1
    what = "numbers" if many else "number"
    query = ", ".join(asked[:-1]) + ", and " + asked[-1] if len(asked) > 1 else asked[0]
    preamble = (f"{'Some' if many else 'A'} special magic {what} {'are' if many else 'is'} hidden in the following "
                f"text. Memorize {'them' if many else 'it'}: I will ask about {'them' if many else 'it'} afterwards.\n")
    question = f"What {'are all the' if many else 'is the'} special magic {what} for {query} in the text above?"
    answer_prefix = f"The special magic {what} for {query} in the text above {'are' if many else 'is'} "
    start = rng.randrange(len(docs_sentences())) if haystack == "docs" else 0
    return _needle_instance(tok, task, length, depth, seed, preamble=preamble, question=question,
                            answer_prefix=answer_prefix, needles=needles, answers=answers, metric="string_match_all",
                            max_new_tokens=12 * len(answers), kind=haystack, start=start)


def variable_tracking(tok, length: int, depth: float | None = None, seed: int = 0, *, hops: int = 4,
                      **_) -> Instance:
    """RULER's variable tracking: one chain of `hops` assignments from a 5-digit value, statements spread in order at
    seed-drawn depths of the noise haystack; every variable of the chain is an answer."""
    rng = _rng("vt", seed)
    names_l: list[str] = []
    while len(names_l) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names_l:
            names_l.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names_l[0]} = {value}."] + [f"VAR {names_l[i + 1]} = VAR {names_l[i]}." for i in range(hops)]
    depths = sorted(rng.random() for _ in chain)
    preamble = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    # RULER's answer prefix plus "VAR": without it the 135M model answers with a newline and haystack sentences
    prefix = (f"Answer: According to the chain of variable assignments in the text above, {hops + 1} variables are "
              f"assigned the value {value}, they are: VAR")
    inst = _needle_instance(tok, "vt", length, depths[0], seed, preamble=preamble, question=question,
                            answer_prefix=prefix, needles=list(zip(depths, chain)), answers=names_l,
                            metric="string_match_all", max_new_tokens=6 * (hops + 1), kind="noise", start=0)
    inst.info["depth_requested"] = None
    return inst


@functools.lru_cache(maxsize=4)
def _text_ids(tok, path: str | None) -> tuple[int, ...]:
    text = docs_text() if path is None else Path(path).read_text(encoding="utf-8", errors="replace")
    return tuple(tok(text, add_special_tokens=False)["input_ids"])


def perplexity(tok, length: int, depth: float | None = None, seed: int = 0, *, text: str | Path | None = None,
               score_tokens: int = 64, **_) -> Instance:
    """A window of `length` tokens of natural text at a seed-chosen offset; its last `score_tokens` are scored."""
    ids = _text_ids(tok, None if text is None else str(text))
    if score_tokens < 1 or score_tokens >= length:
        raise KVBenchError(f"ppl: score_tokens={score_tokens} must be in [1, length={length})")
    if len(ids) < length:
        raise KVBenchError(f"ppl: the text has {len(ids)} tokens, fewer than the requested length {length}; give a "
                           "longer text file or a shorter length")
    start = _rng("ppl", seed).randrange(len(ids) - length + 1)
    window = list(ids[start:start + length])
    info = dict(prompt_tokens=length, context_tokens=length - score_tokens, text=str(text or "pydoc_data.topics"),
                offset=start)
    return Instance("ppl", window, length - score_tokens, [], "ppl", 0, info, score_tokens=score_tokens)


# ---------------------------------------------------------------------------------------------------------------
# LongBench / RULER JSONL files

# LongBench (v1) datasets: metric and answer length in tokens (dataset2metric / dataset2maxlen of THUDM/LongBench)
LONGBENCH: dict[str, tuple[str, int]] = {
    "narrativeqa": ("f1", 128), "qasper": ("f1", 128), "multifieldqa_en": ("f1", 64), "multifieldqa_zh": ("f1", 64),
    "hotpotqa": ("f1", 32), "2wikimqa": ("f1", 32), "musique": ("f1", 32), "dureader": ("rouge_l", 128),
    "gov_report": ("rouge_l", 512), "qmsum": ("rouge_l", 512), "multi_news": ("rouge_l", 512),
    "vcsum": ("rouge_l", 512), "trec": ("classification", 64), "triviaqa": ("f1", 32), "samsum": ("rouge_l", 128),
    "lsht": ("classification", 64), "passage_count": ("numbers", 32), "passage_retrieval_en": ("numbers", 32),
    "passage_retrieval_zh": ("numbers", 32), "lcc": ("edit_sim", 64), "repobench-p": ("edit_sim", 64),
}
# LongBench answers these with their first line only (its pred post-processing)
FIRST_LINE = {"trec", "triviaqa", "samsum", "lsht"}


def parse_file_task(task: str) -> tuple[Path, str | None]:
    """'file:PATH' or 'file:PATH#metric' -> (path, metric or None)."""
    spec = task.removeprefix("file:")
    path, _, metric = spec.partition("#")
    if metric and metric not in METRICS:
        raise KVBenchError(f"task '{task}': unknown metric '{metric}'; valid: {', '.join(METRICS)}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise KVBenchError(f"task '{task}': no such file {p}; give a LongBench or RULER .jsonl file")
    return p, metric or None


@functools.lru_cache(maxsize=16)
def read_jsonl(path: str) -> tuple[dict, ...]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise KVBenchError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return tuple(rows)


def _middle_cut(tok, text: str, drop: int) -> str:
    """Drop `drop` tokens from the middle of text (LongBench truncates long inputs in the middle)."""
    if drop <= 0:
        return text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    keep = max(0, len(ids) - drop)
    return tok.decode(ids[: keep // 2]) + tok.decode(ids[len(ids) - (keep - keep // 2):]) if keep else ""


def from_file(tok, length: int, depth: float | None = None, seed: int = 0, *, task: str, **_) -> Instance:
    """Line `seed` of a LongBench or RULER JSONL file as an Instance, its context cut in the middle to `length`."""
    path, metric = parse_file_task(task)
    rows = read_jsonl(str(path))
    if not 0 <= seed < len(rows):
        raise KVBenchError(f"{path} has {len(rows)} lines; seed {seed} has no line (seeds index the lines)")
    row = rows[seed]
    if "context" in row and "answers" in row:  # LongBench
        name = row.get("dataset") or re.sub(r"_e$", "", path.stem)
        default_metric, max_new = LONGBENCH.get(name, ("f1", 64))
        context, question = str(row["context"]), str(row.get("input") or "")
        # kvbench's own wording, one template for every dataset (LongBench's per-dataset prompts are not copied)
        ask = (f"Answer the question using the text above. Give only the answer.\n\nQuestion: {question}"
               if question else "Do what the text above asks, or summarize it if it asks nothing.")
        pre, mid, post = "Read the following text.\n\n", "\n\n", ask
        answers = [str(a) for a in (row["answers"] if isinstance(row["answers"], list) else [row["answers"]])]
        answer_prefix = "Answer: " if question else ""
        kwargs = {"all_classes": row["all_classes"]} if row.get("all_classes") else {}
        fmt = "longbench"
    elif "input" in row and "outputs" in row:  # RULER
        text = str(row["input"])
        cut = text.rstrip("\n").rfind("\n") + 1  # RULER templates put the question after the last newline
        pre, context, mid, post = "", text[:cut], "", text[cut:]
        answers = [str(a) for a in row["outputs"]]
        name = path.parent.name if path.stem in ("validation", "test") else path.stem
        qa = re.search(r"(^|_)qa(_|$)", name) is not None  # RULER scores its qa tasks by string_match_part
        default_metric = "string_match_part" if qa else "string_match_all"
        max_new = 32 if qa or "vt" in name else 128  # RULER's tokens_to_generate: niah 128, qa 32, vt 30
        answer_prefix = str(row.get("answer_prefix", "")).strip()
        kwargs, fmt = {}, "ruler"
    else:
        raise KVBenchError(f"{path}:{seed + 1}: neither a LongBench line (context, input, answers) nor a RULER line "
                           f"(input, outputs); its fields: {', '.join(row)}")

    def build(drop: int):
        ctx = _middle_cut(tok, context, drop)
        user = pre + ctx + mid + post
        return render(tok, user, answer_prefix), len(pre) + len(ctx) + len(mid)

    r, q_char = build(0)
    drop, n_context = 0, len(tok(context, add_special_tokens=False)["input_ids"])
    while len(r.ids) > length:  # decode/encode round trips are not exact: cut until it fits
        if drop >= n_context:
            raise KVBenchError(f"{path}:{seed + 1}: the prompt without its context takes {len(r.ids)} tokens, more "
                               f"than the requested length {length}; ask for a longer context")
        drop += len(r.ids) - length
        r, q_char = build(drop)
    info = dict(prompt_tokens=len(r.ids), format=fmt, dataset=name, line=seed + 1, truncated_tokens=drop)
    return Instance(task, r.ids, r.token_at(tok, q_char), answers, metric or default_metric, max_new, info,
                    score_kwargs=kwargs)


def first_line_only(inst: Instance) -> bool:
    return inst.info.get("format") == "longbench" and inst.info.get("dataset") in FIRST_LINE


# name -> generator(tok, length, depth, seed, **options) -> Instance; `depth` is used by the needle tasks only
TASKS: dict[str, Callable[..., Instance]] = {
    "passkey": passkey,
    **{name: (lambda tok, length, depth=0.5, seed=0, _t=name, **kw: niah(tok, length, depth, seed, task=_t, **kw))
       for name in NIAH},
    "vt": variable_tracking,
    "ppl": perplexity,
}
DEPTH_TASKS = ("passkey", *NIAH)


def task_names() -> list[str]:
    return [*TASKS, "file:PATH[#metric]"]


def make_instance(tok, task: str, length: int, depth: float | None, seed: int, **options) -> Instance:
    """Build one instance of `task` (a name from TASKS, or file:PATH[#metric])."""
    if task.startswith("file:"):
        return from_file(tok, length, depth, seed, task=task)
    if task not in TASKS:
        raise KVBenchError(f"unknown task '{task}'; valid: {', '.join(task_names())}")
    if task in DEPTH_TASKS:
        return TASKS[task](tok, length, 0.5 if depth is None else depth, seed, **options)
    return TASKS[task](tok, length, None, seed, **options)
