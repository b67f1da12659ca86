"""recompute (RAG): the concatenated prompt prefilled normally, the accuracy upper bound and the TTFT worst case."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.rag import RagMethod, _forward, register_rag


@register_rag
@dataclass(frozen=True)
class Recompute(RagMethod):
    """recompute: ignore the stored document caches; prefill prefix, documents and question as one causal prompt.

    Every token attends to every earlier one (across documents too), through the `full` cache and FlashAttention or
    SDPA, as a system without a KV store would run. The rag suite measures the other methods' first-token error
    against it.
    """

    name = "recompute"

    def first_token(self, scene):
        from kvbench.bridge import attach
        from kvbench.registry import parse_method

        cache = attach(scene.model, parse_method("full"))
        logits = _forward(scene.model, cache, scene.prompt.ids())
        return cache, logits, {"recompute_ratio": 1.0, "kept_ratio": 1.0}
