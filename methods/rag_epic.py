"""epic (RAG): recompute the first k tokens of every document (EPIC's static LegoLink selection)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.api import param
from kvbench.rag import RagMethod, Selection, register_rag


@register_rag
@dataclass(frozen=True)
class Epic(RagMethod):
    """epic: reuse every document's cache and recompute the first `tokens` tokens of each, plus the question.

    Based on EPIC: Efficient Position-Independent Context Caching for Serving Large Language Models (Hu et al.,
    2024), https://arxiv.org/abs/2410.15332: a document prefilled alone turns its first tokens into attention sinks;
    recomputing those few tokens with attention over everything before them (LegoLink) removes the spurious sinks.
    Here every document was prefilled behind the shared prefix (which holds the real sink), so the first tokens
    matter less than in the paper's setting where chunks are prefilled with no prefix.

    Parameters
    ----------
    tokens : int, default 32
        Tokens recomputed at the start of every document (all of a shorter document).
    """

    name = "epic"
    tokens: int = param(32, "tokens recomputed at the start of each document", ge=1)

    def select(self, scene) -> Selection:
        first = [torch.arange(s, min(e, s + self.tokens)) for s, e in scene.prompt.spans()]
        return Selection(keep=None, recompute=torch.cat(first), facts={"epic_tokens": self.tokens})
