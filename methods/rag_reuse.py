"""reuse (RAG): the stored document caches concatenated behind the prefix, nothing recomputed."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.rag import RagMethod, Selection, register_rag


@register_rag
@dataclass(frozen=True)
class Reuse(RagMethod):
    """reuse: every document's stored keys and values, re-rotated to its offset, with no recomputation.

    The documents never attend to each other (each was prefilled alone behind the prefix); only the question
    attends across them. The TTFT lower bound of the scenario: one forward over the question tokens.
    """

    name = "reuse"

    def select(self, scene) -> Selection:
        return Selection(keep=None, recompute=scene.empty())
