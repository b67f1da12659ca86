"""h2o: keep the heavy hitters, the tokens that have gathered the most attention so far, plus a recent window;
evict the rest while decoding, one token per step once the budget is full."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.api import BUDGET_VALID, budget_tokens, check_budget, param
from kvbench.methods.eviction import StepEviction, summed_probs
from kvbench.registry import register


@register
@dataclass(frozen=True)
class H2O(StepEviction):
    """h2o: heavy hitters by accumulated attention plus a recent window, evicting during decoding.

    Based on H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models (Zhang et al.,
    NeurIPS 2023), https://arxiv.org/abs/2306.14048, and its code (github.com/FMInference/H2O). A token's score is the
    attention probability it has received, summed over every query since it entered, the prompt's included (fp32).
    The budget is heavy + recent tokens, resolved against the prompt's length when given as fractions (as the ratios
    of the authors' real-drop code are) and held from then on: the last `recent` tokens are always kept and after each
    call the lowest-scored of the others are evicted until the budget holds (one per decode step).

    Where it differs from the authors' code, and why: their models are multi-head, one score per head; with GQA the
    score of a KV head is the mean over the query heads that share it, so memory shrinks by the full factor. The prompt
    attends densely (as theirs does) and its queries' probabilities are summed in chunks rather than kept as one
    T x T matrix. When prefill is given only the last Tq queries (the kernel and memory suites), only those vote.

    Capture-safe: after reserve() a decode step writes, attends, re-scores and evicts in budget + 1 fixed slots
    (methods/eviction.py, EvictionSlots), the same tokens kept as the plain path's.

    Parameters
    ----------
    heavy : float, default 0.1
        Heavy-hitter tokens kept per KV head: a fraction of the prompt (< 1) or a token count.
    recent : float, default 0.1
        Most recent tokens always kept: a fraction of the prompt (< 1) or a token count.
    """

    name = "h2o"
    heavy: float = param(0.1, "heavy-hitter tokens kept (fraction of the prompt if < 1)", valid=BUDGET_VALID)
    recent: float = param(0.1, "recent tokens always kept (fraction of the prompt if < 1)", valid=BUDGET_VALID)

    def validate(self) -> None:
        check_budget(self.name, "heavy", self.heavy)
        check_budget(self.name, "recent", self.recent)

    def step_budget(self, prompt_len: int) -> tuple[int, int]:
        recent = budget_tokens(self.recent, prompt_len)
        return budget_tokens(self.heavy, prompt_len) + recent, recent

    def budget_fraction(self, context: int) -> float:
        return min(1.0, self.step_budget(context)[0] / context)

    def rescore(self, old: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        got = summed_probs(q, k)  # [B, Hkv, N]: what every stored token received from these queries
        if old is None:
            return got
        return got + F.pad(old, (0, k.shape[2] - old.shape[2]))  # the new tokens start from what they got now
