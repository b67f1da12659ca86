"""samkv (RAG): sparsify every document with the question and the other documents in view, recompute what is kept."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.api import param
from kvbench.rag import Observer, RagMethod, Selection, check_fraction, register_rag


class _QuestionVotes(Observer):
    """Probe pass: the question attends over the composed (reused) context, nothing is stored; each layer's
    attention of the question's queries, summed over them and averaged over heads, is one vote per context slot."""

    store, want_probs = False, True

    def __init__(self, window: int):
        self.votes: torch.Tensor | None = None
        self.layers, self.window = 0, window

    def on_probs(self, layer, probs) -> None:  # [1, Hq, T, S]; the question's own keys come last
        per_slot = probs[0, :, -self.window:].sum(1).mean(0)  # [S]
        self.votes = per_slot if self.votes is None else self.votes + per_slot
        self.layers += 1


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
       its offset), storing nothing. At every layer the attention of its last `window` queries over all documents
       at once is a vote per token: softmax-normalised across documents, so a token's vote says how much it
       matters next to the other documents' tokens, not only within its own. Votes are summed over those queries,
       averaged over heads and layers, max-pooled over `kernel` neighbours (SnapKV's smoothing), and every `chunk`
       consecutive tokens of a document share their best vote, so phrases are kept whole.
    2. Budget: ceil(budget x n_d) tokens per document d in total. A share `floor` of each document's budget goes to
       its own top tokens (every document keeps something: in a 2-hop question the second document's relevance
       shows only through the first); the rest of the total goes to the top-voted remaining tokens of any document,
       so documents the question needs get more than their share.
    3. Local recompute: the kept tokens go through the model at their real positions, their fresh keys and values
       replacing the reused ones, so they gain the cross-document attention the stored caches lacked. With
       over="all" (default) they attend to the prefix and every document's reused tokens, and the rest is dropped
       afterwards; with over="kept" the rest is dropped first and they attend to the kept tokens only. Then the
       question attends to the prefix and the kept tokens. The cache holds the prefix, the kept tokens and the
       question: kept_ratio = recompute_ratio = budget.

    With budget 1 nothing is dropped and everything is recomputed: equal to recompute.

    Parameters
    ----------
    budget : float, default 0.15
        Share of the documents' tokens kept (and recomputed), in (0, 1].
    floor : float, default 0.5
        Share of each document's budget it keeps by its own votes; the rest is allocated across documents.
    kernel : int, default 7
        Max-pool width of the vote smoothing (1: none).
    window : int, default 8
        The last question tokens whose attention votes (the end of the prompt, where the answer starts: SnapKV's
        observation window; all of a shorter question).
    chunk : int, default 16
        Consecutive tokens of a document kept or dropped together, by their best vote (ChunkKV-style: a fact's
        value sits a few tokens after the words the question matches).
    over : str, default "all"
        "all": the kept tokens are recomputed attending to every document's reused tokens, then the rest is dropped
        (the question attends to the kept tokens only); "kept": recomputed over the kept tokens alone (the rest
        dropped first).
    """

    name = "samkv"
    budget: float = param(0.15, "share of the documents' tokens kept and recomputed", gt=0, le=1)
    floor: float = param(0.5, "share of each document's budget kept by its own votes", ge=0, le=1)
    kernel: int = param(7, "max-pool width of the vote smoothing", ge=1)
    window: int = param(8, "last question tokens whose attention votes", ge=1)
    chunk: int = param(16, "tokens kept or dropped together (1: single tokens)", ge=1)
    over: str = param("all", "the kept tokens are recomputed attending to all documents, or to the kept ones only",
                      choices=("all", "kept"))

    def validate(self) -> None:
        check_fraction(self.name, "budget", self.budget)

    def budget_fraction(self, context: int) -> float:
        return self.budget

    def votes(self, scene) -> torch.Tensor:
        """One smoothed vote per document token [C - P], from the probe pass."""
        obs = _QuestionVotes(self.window)
        scene.forward(scene.cache(None), scene.empty(), obs)
        P, C = len(scene.prompt.prefix), scene.prompt.context_len
        v = (obs.votes / obs.layers)[P:C].float().cpu()
        if self.kernel > 1:
            v = F.max_pool1d(v.view(1, 1, -1), self.kernel, stride=1, padding=self.kernel // 2).view(-1)[: C - P]
        if self.chunk > 1:  # every token of a chunk gets the chunk's best vote (its own breaks ties), per document
            for start, end in scene.prompt.spans():
                seg = v[start - P: end - P]
                n = -(-len(seg) // self.chunk) * self.chunk
                best = F.pad(seg, (0, n - len(seg)), value=float("-inf")).view(-1, self.chunk).amax(1)
                v[start - P: end - P] = best.repeat_interleave(self.chunk)[: len(seg)] + 1e-6 * seg
        return v

    def select(self, scene) -> Selection:
        votes = self.votes(scene)
        P, taken = len(scene.prompt.prefix), torch.zeros(len(votes), dtype=torch.bool)
        total = 0
        for start, end in scene.prompt.spans():
            n_d = end - start
            want = min(n_d, math.ceil(self.budget * n_d))
            total += want
            own = math.ceil(self.floor * want)
            if own:
                taken[start - P + votes[start - P: end - P].topk(own).indices] = True
        rest = total - int(taken.sum())
        if rest > 0:
            free = votes.masked_fill(taken, float("-inf"))
            taken[free.topk(rest).indices] = True
        kept = P + taken.nonzero().view(-1)
        return Selection(keep=kept, recompute=kept, facts={"floor": self.floor, "recompute_over": self.over})

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
