"""samkv (RAG): sparsify every document with the question and the other documents in view, recompute what is kept."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.api import param
from kvbench.errors import ParamError
from kvbench.rag import Observer, RagMethod, Selection, check_fraction, register_rag

CONTRAST_POWER = 2  # 1hop, 8 seeds: power 1 kept the answer in 3 selections of 8, power 2 in 8 (see RELEVANCE_ROWS)
RELEVANCE_ROWS = 16  # of ~6,750 rows (SmolLM2-135M, 25-token question); benchmarks/records/rag-samkv-votes-cpu.txt


class _QuestionVotes(Observer):
    """Probe pass: the question attends over the composed (reused) context, nothing is stored; each layer's
    attention of the question's queries, summed over them and averaged over heads, is one vote per context slot."""

    store, want_probs = False, True

    def __init__(self, window: int):
        self.votes: torch.Tensor | None = None
        self.layers, self.window = 0, window

    def on_probs(self, layer, probs) -> None:  # [1, Hq, T, S]; the question's own keys come last
        self.add(probs[0, :, -self.window:].sum(1).mean(0))  # [S]

    def add(self, per_slot: torch.Tensor) -> None:
        self.votes = per_slot if self.votes is None else self.votes + per_slot
        self.layers += 1


class _ContrastVotes(_QuestionVotes):
    """Probe pass whose votes come from the question queries that single out documents: every (head, query) row's
    attention over the document tokens, weighted by `row_weights` (SamKV's voters="contrast"); it also keeps each
    row's weight x share per document, for the documents' relevance."""

    def __init__(self, spans: list[tuple[int, int]], power: float):
        super().__init__(window=0)
        self.P, self.C, self.power = spans[0][0], spans[-1][1], power
        doc = torch.cat([torch.full((e - s,), i) for i, (s, e) in enumerate(spans)])
        self.onehot = F.one_hot(doc, len(spans)).float()  # [N, D]
        self.rows: list[torch.Tensor] = []  # per layer [Hq x T, D]

    def on_probs(self, layer, probs) -> None:  # [1, Hq, T, S]
        a = probs[0, :, :, self.P:self.C].float()  # [Hq, T, N]
        if self.onehot.device != a.device:  # once: a host-to-device copy per layer was a sync per layer
            self.onehot = self.onehot.to(a.device)
        mass = a @ self.onehot  # [Hq, T, D]
        share = mass / mass.sum(-1, keepdim=True).clamp(min=1e-12)
        w = row_weights(share, self.power)  # [Hq, T]
        self.rows.append((w[..., None] * share).flatten(0, 1))
        self.add(torch.einsum("ht,htn->n", w, a))  # votes of the document slots only: [C - P]

    def relevance(self) -> torch.Tensor:
        """Per document [D]: its weight x share summed over the RELEVANCE_ROWS rows where that is highest. Summed
        over all rows the many mildly weighted rows of recency heads made the last document win on every 1hop
        instance; the top rows are the few queries (the key's tokens) in the heads that retrieve."""
        rows = torch.cat(self.rows)
        return rows.topk(min(RELEVANCE_ROWS, len(rows)), dim=0).values.sum(0).cpu()


def row_weights(share: torch.Tensor, power: float) -> torch.Tensor:
    """share [H, T, D]: each head's query rows' attention per document, as shares of their document attention ->
    weight per row [H, T] in [0, 1]: the share a row puts on documents above its head's mean share over all rows
    (total variation distance), to `power`.
    Words every document shares (" the", " code") draw the same share from each document whatever the query, and
    positional heads (attending the last document for every query) keep their usual profile: both weigh ~0; a query
    matching one document's words (the key that names it) moves its head's mass there and weighs near 1."""
    return (share - share.mean(1, keepdim=True)).clamp(min=0).sum(-1) ** power


@register_rag
@dataclass(frozen=True)
class SamKV(RagMethod):
    """samkv: keep `budget` of the documents' tokens, chosen across documents by the question, and recompute them.

    Based on Sparse Attention across Multiple-context KV Cache (Cao, Si, Zhang, Liu; AAAI 2026),
    https://arxiv.org/abs/2508.11661. Only the abstract could be read here; it says SamKV sparsifies each
    document's cache taking the other documents' complementary information into account, then locally recomputes
    the sparsified information, compressing the sequence to 15% with no loss against full recomputation. What this
    implementation does (every step below is kvbench's choice where the abstract is silent):

    1. Probe: the question goes once through the model over the reused composed cache (every document re-rotated to
       its offset), storing nothing. Every layer's attention of the question's queries over all documents at once
       (softmax-normalised across documents) gives the votes, by `voters`:
       - "contrast" (default): every (head, query) row votes, weighted by how much it singles out documents: its
         share of document attention per document against the same head's mean share over all the question's
         queries; the weight is the share above that mean (total variation distance, in [0, 1]), squared
         (`row_weights`). A word every document shares (" the", " code" of a template) draws the same share from
         each document whatever the query, and a positional head (the last document for every query) keeps its
         usual profile: both weigh about 0. A query that matches one document's words (the key naming it) moves its
         head's mass there and weighs near 1. Votes are the weighted rows summed over heads, queries and layers.
       - "window": the last `window` queries' attention, summed over them, averaged over heads and layers (SnapKV's
         observation window; the first version here). On 1hop its votes went to template words alike in every
         document (benchmarks/records/rag-samkv-budget-cpu.txt).
       Votes are then max-pooled over `kernel` neighbours (SnapKV's smoothing), every token takes the best vote of
       the `back` tokens before it (the value a question asks for follows the key it matches), and every `chunk`
       consecutive tokens of a document share their best vote, so phrases are kept whole.
    2. Budget: ceil(budget x n_d) tokens per document d in total. A share `floor` of each document's budget goes to
       its own top tokens (every document keeps something: in a 2-hop question the second document's relevance
       shows only through the first). The rest goes by `alloc`:
       - "relevance" (default, voters="contrast" only): documents in order of relevance, each taking its top-voted
         remaining tokens until it is whole, then the next. A document's relevance is its share of attention in
         the RELEVANCE_ROWS rows of highest weight x share, summed: the queries that single out a document most.
       - "votes": the top-voted remaining tokens of any document.
    3. Local recompute: the kept tokens go through the model at their real positions, their fresh keys and values
       replacing the reused ones, so they gain the cross-document attention the stored caches lacked. With
       over="all" (default) they attend to the prefix and every document's reused tokens, and the rest is dropped
       afterwards; with over="kept" the rest is dropped first and they attend to the kept tokens only. Then the
       question attends to the prefix and the kept tokens. The cache holds the prefix, the kept tokens and the
       question: kept_ratio = recompute_ratio = budget.

    With budget 1 nothing is dropped and everything is recomputed: equal to recompute. The first version is
    `samkv:voters=window,alloc=votes,back=0`.

    Parameters
    ----------
    budget : float, default 0.15
        Share of the documents' tokens kept (and recomputed), in (0, 1].
    floor : float, default 0.5
        Share of each document's budget it keeps by its own votes; the rest is allocated across documents.
    kernel : int, default 7
        Max-pool width of the vote smoothing (1: none).
    window : int, default 8
        With voters="window": the last question tokens whose attention votes (all of a shorter question).
    chunk : int, default 16
        Consecutive tokens of a document kept or dropped together, by their best vote (ChunkKV-style).
    over : str, default "all"
        "all": the kept tokens are recomputed attending to every document's reused tokens, then the rest is dropped
        (the question attends to the kept tokens only); "kept": recomputed over the kept tokens alone (the rest
        dropped first).
    voters : str, default "contrast"
        "contrast": every question query, weighted by how much it singles out documents; "window": the last
        `window` queries alike.
    back : int, default 8
        A token takes the best vote of this many tokens before it (0: none).
    alloc : str, default "relevance"
        Where the budget beyond `floor` goes: "relevance", the most relevant documents first (needs
        voters="contrast"); "votes", the top votes of any document.
    """

    name = "samkv"
    budget: float = param(0.15, "share of the documents' tokens kept and recomputed", gt=0, le=1)
    floor: float = param(0.5, "share of each document's budget kept by its own votes", ge=0, le=1)
    kernel: int = param(7, "max-pool width of the vote smoothing", ge=1)
    window: int = param(8, "with voters=window: last question tokens whose attention votes", ge=1)
    chunk: int = param(16, "tokens kept or dropped together (1: single tokens)", ge=1)
    over: str = param("all", "the kept tokens are recomputed attending to all documents, or to the kept ones only",
                      choices=("all", "kept"))
    voters: str = param("contrast", "question queries that vote: all, weighted by how much they single out "
                        "documents, or the last `window` alike", choices=("contrast", "window"))
    back: int = param(8, "a token takes the best vote of this many tokens before it", ge=0)
    alloc: str = param("relevance", "the budget beyond `floor`: the most relevant documents first, or the top votes "
                       "of any document", choices=("relevance", "votes"))

    def validate(self) -> None:
        check_fraction(self.name, "budget", self.budget)
        if self.alloc == "relevance" and self.voters != "contrast":
            raise ParamError(self.name, "alloc", self.alloc, "'votes' with voters='window' (document relevance "
                             "comes from the contrast rows)")

    def budget_fraction(self, context: int) -> float:
        return self.budget

    def votes(self, scene) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One smoothed vote per document token [C - P] and, with voters="contrast", each document's relevance [D]."""
        spans = scene.prompt.spans()
        obs = _ContrastVotes(spans, CONTRAST_POWER) if self.voters == "contrast" else _QuestionVotes(self.window)
        scene.forward(scene.cache(None), scene.empty(), obs)
        P, C = len(scene.prompt.prefix), scene.prompt.context_len
        v = obs.votes / obs.layers
        v = (v if self.voters == "contrast" else v[P:C]).float().cpu()  # contrast votes only the document slots
        if self.kernel > 1:
            v = F.max_pool1d(v.view(1, 1, -1), self.kernel, stride=1, padding=self.kernel // 2).view(-1)[: C - P]
        if self.back:  # the key the question matches comes first, the value it asks for a few tokens after it
            v = F.max_pool1d(F.pad(v.view(1, 1, -1), (self.back, 0), value=float("-inf")), self.back + 1,
                             stride=1).view(-1)
        if self.chunk > 1:  # every token of a chunk gets the chunk's best vote (its own breaks ties), per document
            for start, end in spans:
                seg = v[start - P: end - P]
                n = -(-len(seg) // self.chunk) * self.chunk
                best = F.pad(seg, (0, n - len(seg)), value=float("-inf")).view(-1, self.chunk).amax(1)
                v[start - P: end - P] = best.repeat_interleave(self.chunk)[: len(seg)] + 1e-6 * seg
        return v, obs.relevance() if self.voters == "contrast" else None

    def select(self, scene) -> Selection:
        votes, relevance = self.votes(scene)
        spans, P = scene.prompt.spans(), len(scene.prompt.prefix)
        taken, total = torch.zeros(len(votes), dtype=torch.bool), 0
        for start, end in spans:
            want = min(end - start, math.ceil(self.budget * (end - start)))
            total += want
            own = math.ceil(self.floor * want)
            if own:
                taken[start - P + votes[start - P: end - P].topk(own).indices] = True
        rest = total - int(taken.sum())
        if self.alloc == "votes":
            if rest > 0:
                taken[votes.masked_fill(taken, float("-inf")).topk(rest).indices] = True
        else:
            fill_by_relevance(votes, taken, [(s - P, e - P) for s, e in spans], relevance, rest)
        kept = P + taken.nonzero().view(-1)
        facts = {"floor": self.floor, "recompute_over": self.over}
        if relevance is not None:
            facts["top_document"] = int(relevance.argmax())
        return Selection(keep=kept, recompute=kept, facts=facts)

    def first_token(self, scene):
        if self.over == "kept":
            return super().first_token(scene)
        sel = self.select(scene)  # recompute the kept tokens over every document, then drop the rest
        full = scene.cache(None)
        scene.forward(full, sel.recompute, with_question=False)
        cache = scene.restrict(full, sel.keep)
        del full
        logits = scene.forward(cache, scene.empty())
        return cache, logits, {**sel.facts, **scene.ratios(sel)}


def fill_by_relevance(votes: torch.Tensor, taken: torch.Tensor, spans: list[tuple[int, int]],
                      relevance: torch.Tensor, rest: int) -> None:
    """Mark `rest` more tokens in `taken` [N]: documents (spans, indices into votes) in order of relevance [D], each
    giving its top-voted untaken tokens until it is whole, then the next (at 15% the first one takes all of them:
    the distractors keep only their floor)."""
    for d in relevance.argsort(descending=True).tolist():
        if rest <= 0:
            break
        s, e = spans[d]
        free = votes[s:e].masked_fill(taken[s:e], float("-inf"))
        n = min(rest, int((~taken[s:e]).sum()))
        if n:
            taken[s + free.topk(n).indices] = True
            rest -= n
