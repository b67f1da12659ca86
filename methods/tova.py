"""tova: a fixed budget of tokens; after each step the token the newest query attends least is evicted."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.api import BUDGET_VALID, budget_share, budget_tokens, check_budget, param
from kvbench.methods.eviction import StepEviction, group_probs
from kvbench.registry import register


@register
@dataclass(frozen=True)
class TOVA(StepEviction):
    """tova: token omission via attention: keep the tokens the last query attends to most, a fixed number of them.

    Based on Transformers are Multi-State RNNs (Oren et al., 2024), https://arxiv.org/abs/2401.06104, and kvpress's
    TOVAPress (github.com/NVIDIA/kvpress). At the end of prefill the last prompt query's softmax attention (fp32) ranks
    the prompt and the top `capacity` tokens stay; at every later call the newest query's attention ranks what is kept
    plus the new tokens, and the lowest go until `capacity` remain (one per decode step). Scores are not carried
    between steps: only the current query's attention counts.

    Where it differs from the paper, and why: TOVA averages the attention over all heads of a layer and drops the same
    token from each; here the average is over the query heads that share a KV head and each KV head drops its own, so
    with GQA each KV head keeps what its queries use, at the same memory. The newest token is never evicted (as in
    kvpress; its own attention weight is nearly always high, so this rarely changes the choice).

    Capture-safe: after reserve() a decode step writes, attends, re-scores and evicts in budget + 1 fixed slots
    (methods/eviction.py, EvictionSlots), the same tokens kept as the plain path's.

    Parameters
    ----------
    capacity : float, default 1024
        Tokens kept per KV head: a token count, or a fraction of the prompt in (0, 1).
    """

    name = "tova"
    capacity: float = param(1024.0, "tokens kept per KV head (fraction of the prompt if < 1)", valid=BUDGET_VALID)

    def validate(self) -> None:
        check_budget(self.name, "capacity", self.capacity)

    def step_budget(self, prompt_len: int) -> tuple[int, int]:
        return budget_tokens(self.capacity, prompt_len), 1

    def budget_fraction(self, context: int) -> float:
        return budget_share(self.capacity, context)

    def keeps_scores(self) -> bool:
        return False

    def rescore(self, old: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # the last query's GQA-mean probabilities over everything stored: [B, Hkv, N]
        return torch.stack([group_probs(q[b, :, -1:], k[b])[:, 0] for b in range(k.shape[0])])
