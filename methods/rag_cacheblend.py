"""cacheblend (RAG): recompute the tokens whose reused values deviate most from their recomputed values."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.api import param
from kvbench.errors import KVBenchError
from kvbench.rag import Observer, RagMethod, Selection, StopForward, check_fraction, register_rag


class _Deviation(Observer):
    """Check pass: keep the fresh k/v of layers 0..check_layer, take the values' deviation at check_layer, stop."""

    def __init__(self, check_layer: int):
        self.check_layer, self.deviation = check_layer, None

    def on_write(self, layer, slots, old_k, old_v, new_k, new_v) -> None:
        if layer.layer_idx > self.check_layer:
            raise StopForward
        if layer.layer_idx == self.check_layer:  # [B, Hkv, T, D] -> one number per token
            self.deviation = ((new_v.float() - old_v.float()) ** 2).sum(dim=(0, 1, 3))


@register_rag
@dataclass(frozen=True)
class CacheBlend(RagMethod):
    """cacheblend: reuse the document caches, recompute the ~15% of tokens with the largest KV deviation.

    Based on CacheBlend: Fast Large Language Model Serving for RAG with Cached Knowledge Fusion (Yao et al., EuroSys
    2025), https://arxiv.org/abs/2405.16444, and its code (YaoJiayi/CacheBlend, the LMCache port): layers
    0..check_layer are recomputed for every document token (their fresh k/v replace the reused ones); at check_layer
    the squared deviation of each token's recomputed values from its reused values (the code compares V only)
    picks the top `ratio` of the documents' tokens; those tokens, and the question, are then recomputed through
    every layer with attention over the whole composed cache.

    What differs: the paper shrinks the token set inside one forward (layer check_layer+1 onwards carries only the
    selected tokens); stock transformers cannot drop tokens mid-forward, so here the check pass is a forward of all
    document tokens stopped after check_layer, and a second forward carries the selected tokens through every layer
    (their first check_layer+1 layers recomputed again, to the same values). The paper's gradual filtering over
    several layers is the single-check variant its code uses. Nothing is dropped: the cache keeps every token.

    Parameters
    ----------
    ratio : float, default 0.15
        Share of the documents' tokens recomputed through every layer (1 recomputes all: equal to recompute).
    check_layer : int, default 1
        Layer whose value deviation selects the tokens (recomputed in full up to it).
    """

    name = "cacheblend"
    ratio: float = param(0.15, "share of the documents' tokens recomputed", gt=0, le=1)
    check_layer: int = param(1, "layer whose value deviation selects the tokens", ge=0)

    def validate(self) -> None:
        check_fraction(self.name, "ratio", self.ratio)

    def select(self, scene) -> Selection:
        if self.check_layer >= scene.n_layers:
            raise KVBenchError(f"cacheblend: check_layer {self.check_layer} but the model has {scene.n_layers} layers")
        docs = scene.doc_positions()
        cache = scene.cache(None)
        obs = _Deviation(self.check_layer)
        try:  # the check pass writes layers 0..check_layer of this cache: the final forward goes on from there
            scene.forward(cache, docs, obs, with_question=False)
        except StopForward:
            pass
        dev = obs.deviation.cpu()  # one value per document token, in position order
        k = min(len(docs), math.ceil(self.ratio * len(docs)))
        chosen = docs[dev.topk(k).indices]
        return Selection(keep=None, recompute=chosen.sort().values, cache=cache,
                         facts={"check_layer": self.check_layer,
                                "check_layers_fraction": (self.check_layer + 1) / scene.n_layers})
