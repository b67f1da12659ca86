"""snapkv: at the end of prefill, keep per KV head the earlier tokens the last prompt queries attend to most, plus
those queries' own window; free the rest. Later tokens are appended and attended densely."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.api import KVBenchError, LayerSpec, ParamError, budget_share, budget_tokens, check_budget, param
from kvbench.methods.eviction import Eviction, group_probs, keep_top
from kvbench.registry import register


@register
@dataclass(frozen=True)
class SnapKV(Eviction):
    """snapkv: the observation window's attention votes which earlier tokens each KV head keeps.

    Based on SnapKV: LLM Knows What You are Looking for Before Generation (Li et al., NeurIPS 2024),
    https://arxiv.org/abs/2404.14469. At the end of prefill the last `window` queries' softmax attention (fp32) over
    the earlier keys is summed over the window, averaged over the query heads that share a KV head (GQA: memory
    shrinks by the full factor), smoothed by a 1-D pool, and the top (capacity - window) earlier tokens plus the
    window are kept. Prefill attention itself is dense; nothing more is evicted afterwards.

    Parameters
    ----------
    capacity : float, default 1024
        Tokens kept per KV head, the window included: a token count, or a fraction of the context in (0, 1).
    window : int, default 32
        Observation window: the last prompt queries that vote (fewer if prefill is given fewer queries).
    kernel : int, default 7
        Width of the pooling over the votes (odd, stride 1, same padding).
    pool : str, default "max"
        Pooling kind: "max" or "avg".
    """

    name = "snapkv"
    capacity: float = param(1024.0, "tokens kept per KV head, window included (fraction of the context if < 1)",
                            valid="a fraction of the context in (0, 1), or a whole number of tokens >= 1")
    window: int = param(32, "observation window: the last prompt queries that vote", ge=1)
    kernel: int = param(7, "width of the pooling over the votes", valid="an odd number >= 1")
    pool: str = param("max", "pooling kind", choices=("max", "avg"))

    def validate(self) -> None:
        check_budget(self.name, "capacity", self.capacity)
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ParamError(self.name, "kernel", self.kernel, "an odd number >= 1")

    def budget_fraction(self, context: int) -> float:
        return budget_share(self.capacity, context)

    def prompt_capacity(self, T: int, spec: LayerSpec) -> int:
        """Prompt tokens this layer keeps per KV head, the window included, for a T-token prompt."""
        return min(budget_tokens(self.capacity, T), T)

    def check_context(self, context: int) -> None:
        kept = min(budget_tokens(self.capacity, context), context)
        if kept < context and kept <= self.window:  # keep() would fall back to the most recent tokens: no vote
            raise KVBenchError(f"snapkv: capacity={self.capacity:g} keeps {kept} of this prompt's {context} tokens, "
                               f"no more than its {self.window}-token observation window, so nothing is chosen by "
                               f"votes; give a capacity above {self.window} tokens (e.g. capacity="
                               f"{max(2 * self.window, 64)}) or a smaller window")

    def keep(self, q: torch.Tensor, k: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        """Positions to keep, sorted: q [B, Hq, Tq, D] are the last Tq prompt queries, k [B, Hkv, T, D] the prompt's
        keys -> [B, Hkv, C] int64 with C = prompt_capacity(T)."""
        B, Tq = q.shape[0], q.shape[2]
        H, T = k.shape[1], k.shape[2]
        C = self.prompt_capacity(T, spec)
        w = min(self.window, Tq)
        if C == T or C <= w:  # everything fits, or no room beyond the window: keep the most recent C tokens
            return torch.arange(T - C, T, device=k.device).expand(B, H, C).contiguous()
        return keep_top(self.batch_votes(q, k), C, w)

    def batch_votes(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """votes() for every sequence: q [B, Hq, Tq, D], k [B, Hkv, T, D] -> [B, Hkv, T - w]."""
        w = min(self.window, q.shape[2])
        return torch.stack([self.votes(q[b, :, q.shape[2] - w:], k[b]) for b in range(q.shape[0])])

    def votes(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q [Hq, w, D] the window's queries (the last w positions), k [Hkv, T, D] -> pooled votes [Hkv, T - w] for
        the earlier tokens. One sequence at a time keeps the fp32 scores [Hq, w, T] small."""
        w, T = q.shape[1], k.shape[1]
        votes = group_probs(q, k)[..., : T - w].sum(1)  # [Hkv, T - w]
        pad = self.kernel // 2
        if self.pool == "max":
            return F.max_pool1d(votes[:, None], self.kernel, stride=1, padding=pad)[:, 0]
        return F.avg_pool1d(votes[:, None], self.kernel, stride=1, padding=pad)[:, 0]
