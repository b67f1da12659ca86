"""samkv's votes on hand-built attention: rows that single out a document weigh, words every document shares and
positional heads do not; the budget beyond the floor goes to the most relevant document."""

import pytest
import torch

from kvbench.errors import ParamError
from kvbench.methods.rag_samkv import fill_by_relevance, row_weights
from kvbench.rag import RagPrompt, parse_rag

P, N_DOCS, DOC, T = 2, 3, 20, 4  # prefix, documents, tokens per document, question queries
SHARED, KEY = 5, 10  # in every document a word of the shared template; in document 1 only, the key the question names


class ProbeOnly:
    """A Scene whose probe pass hands the observer fixed attention probabilities, one [1, H, T, S] per layer."""

    def __init__(self, probs: torch.Tensor):
        self.prompt = RagPrompt([1] * P, [[1] * DOC for _ in range(N_DOCS)], [1] * T)
        self.probs = probs

    def cache(self, keep):
        return None

    def empty(self):
        return torch.zeros(0, dtype=torch.long)

    def forward(self, cache, recompute, observer=None, with_question=True):
        for layer in self.probs:
            observer.on_probs(None, layer[None])


def hand_built() -> torch.Tensor:
    """[L=2, H=2, T, S]. Head 0: queries 0-2 put 0.2 on the shared word of every document (" the" of a fact
    template), query 3 puts 0.3 on document 1's key. Head 1 is positional: every query puts 0.3 on the last
    document's last token. The rest of every row goes to the first prefix token (a sink)."""
    S = P + N_DOCS * DOC + T
    probs = torch.zeros(2, 2, T, S)
    for d in range(N_DOCS):
        probs[:, 0, :3, P + d * DOC + SHARED] = 0.2
    probs[:, 0, 3, P + DOC + KEY] = 0.3
    probs[:, 1, :, P + N_DOCS * DOC - 1] = 0.3
    probs[..., 0] = 1 - probs.sum(-1)
    return probs


def kept_per_doc(sel) -> list[set[int]]:
    return [{int(p) - P - d * DOC for p in sel.keep if 0 <= int(p) - P - d * DOC < DOC} for d in range(N_DOCS)]


def test_row_weights_by_hand():
    """Shares above the head's mean share, summed, squared: uniform rows (1/6)^2, the key's row (1/2)^2."""
    mass = torch.tensor([[[1.0, 1, 1], [1, 1, 1], [1, 1, 1], [0, 3, 0]],  # head 0
                         [[1, 1, 8], [1, 1, 8], [1, 1, 8], [1, 1, 8]]])  # head 1: the same profile for every query
    w = row_weights(mass / mass.sum(-1, keepdim=True), power=2)
    torch.testing.assert_close(w[0], torch.tensor([1 / 36, 1 / 36, 1 / 36, 1 / 4]))
    torch.testing.assert_close(w[1], torch.zeros(4))


def test_contrast_keeps_the_key_and_its_value_and_gives_the_rest_to_its_document():
    spec = "samkv:budget=0.1,kernel=1,chunk=1,back=2"  # 2 tokens per document: 1 by the floor, 3 left over
    sel = parse_rag(spec).select(ProbeOnly(hand_built()))
    kept = kept_per_doc(sel)
    assert {KEY, KEY + 1, KEY + 2} <= kept[1]  # the key and the two tokens after it (its value)
    assert [len(k) for k in kept] == [1, 4, 1]  # the distractors keep their floor only
    assert sel.facts["top_document"] == 1
    votes, relevance = parse_rag(spec).votes(ProbeOnly(hand_built()))
    assert votes[SHARED] < votes[DOC + KEY] / 4  # the shared word drew twice the key's attention, it weighs less
    assert int(relevance.argmax()) == 1


def test_the_last_window_votes_for_the_shared_word_instead():
    """The same attention with the first version's votes: the shared word wins and the key is dropped."""
    sel = parse_rag("samkv:budget=0.1,kernel=1,chunk=1,back=2,voters=window,alloc=votes").select(
        ProbeOnly(hand_built()))
    kept = kept_per_doc(sel)
    assert KEY not in kept[1] and kept[1] and kept[1] <= {SHARED, SHARED + 1, SHARED + 2}


def test_fill_by_relevance_spills_over_in_order():
    votes = torch.arange(12, dtype=torch.float)
    taken = torch.zeros(12, dtype=torch.bool)
    taken[[0, 4, 8]] = True  # each document's floor
    fill_by_relevance(votes, taken, [(0, 4), (4, 8), (8, 12)], torch.tensor([0.5, 2.0, 0.1]), rest=5)
    assert taken[4:8].all()  # the most relevant document whole first
    assert taken[:4].tolist() == [True, False, True, True]  # then the next one's top votes
    assert taken[8:].tolist() == [True, False, False, False]


def test_relevance_needs_contrast_voters():
    with pytest.raises(ParamError, match="alloc"):
        parse_rag("samkv:voters=window")
    parse_rag("samkv:voters=window,alloc=votes")
