"""snapkv: at the end of prefill, keep per KV head the earlier tokens the last prompt queries attend to most, plus
those queries' own window; free the rest. Later tokens are appended and attended densely."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.api import KVBenchError, LayerCache, LayerSpec, Method, ParamError, budget_tokens, check_budget, param
from kvbench.attention import dense_attention
from kvbench.methods.full import FullLayer
from kvbench.registry import register

GROW = 256  # tokens of headroom for what is appended after prefill, as `full` grows


@register
@dataclass(frozen=True)
class SnapKV(Method):
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
    family = "eviction"
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
        return min(1.0, budget_tokens(self.capacity, context) / context)

    def check_context(self, context: int) -> None:
        kept = min(budget_tokens(self.capacity, context), context)
        if kept < context and kept <= self.window:  # keep() would fall back to the most recent tokens: no vote
            raise KVBenchError(f"snapkv: capacity={self.capacity:g} keeps {kept} of this prompt's {context} tokens, "
                               f"no more than its {self.window}-token observation window, so nothing is chosen by "
                               f"votes; give a capacity above {self.window} tokens (e.g. capacity="
                               f"{max(2 * self.window, 64)}) or a smaller window")

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        return SnapKVLayer(spec, self)

    def keep(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Positions to keep, sorted: q [B, Hq, Tq, D] are the last Tq prompt queries, k [B, Hkv, T, D] the prompt's
        keys -> [B, Hkv, C] int64 with C = min(capacity, T)."""
        B, Hq, Tq, D = q.shape
        H, T = k.shape[1], k.shape[2]
        C = min(budget_tokens(self.capacity, T), T)
        w = min(self.window, Tq)
        if C == T or C <= w:  # everything fits, or no room beyond the window: keep the most recent C tokens
            return torch.arange(T - C, T, device=k.device).expand(B, H, C).contiguous()
        votes = torch.stack([self.votes(q[b, :, Tq - w:], k[b]) for b in range(B)])  # [B, Hkv, T - w]
        top = votes.topk(C - w, dim=-1).indices.sort(-1).values
        window = torch.arange(T - w, T, device=k.device).expand(B, H, w)
        return torch.cat([top, window], -1)

    def votes(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q [Hq, w, D] the window's queries (the last w positions), k [Hkv, T, D] -> pooled votes [Hkv, T - w] for
        the earlier tokens. One sequence at a time keeps the fp32 scores [Hq, w, T] small."""
        Hq, w, D = q.shape
        H, T = k.shape[0], k.shape[1]
        g = Hq // H
        scores = q.float().reshape(H, g * w, D) @ k.float().transpose(1, 2) * D**-0.5  # [Hkv, g * w, T]
        pos = torch.arange(T - w, T, device=k.device).repeat(g)  # the query of each row
        scores.masked_fill_(torch.arange(T, device=k.device) > pos[:, None], float("-inf"))
        votes = scores.softmax(-1)[..., : T - w].view(H, g, w, T - w).sum(2).mean(1)  # [Hkv, T - w]
        pad = self.kernel // 2
        if self.pool == "max":
            return F.max_pool1d(votes[:, None], self.kernel, stride=1, padding=pad)[:, 0]
        return F.avg_pool1d(votes[:, None], self.kernel, stride=1, padding=pad)[:, 0]


class SnapKVLayer(LayerCache):
    def __init__(self, spec: LayerSpec, method: SnapKV):
        self.spec, self.method = spec, method
        self.kept: FullLayer | None = None  # the kept tokens (and later ones), stored and attended as `full` does
        self.positions: torch.Tensor | None = None  # [B, Hkv, C] logical positions of the prompt tokens kept
        self.prompt_len = 0

    def prefill(self, q, k, v):
        out = dense_attention(q, k, v, causal=True)  # prefill is dense: the model's output does not change
        keep = self.method.keep(q, k)  # [B, Hkv, C]
        idx = keep[..., None].expand(-1, -1, -1, k.shape[3])
        self.kept = FullLayer(self.spec, GROW)
        self.kept._append(k.gather(2, idx), v.gather(2, idx))
        self.positions, self.prompt_len = keep, k.shape[2]
        return out

    def extend(self, q, k, v):
        return self.kept.extend(q, k, v)  # appended after the kept tokens, attended densely (causal within chunks)

    def nbytes(self) -> int:
        if self.kept is None:
            return 0
        return self.kept.nbytes() + self.positions.numel() * self.positions.element_size()

    def live_nbytes(self) -> int:  # without the headroom the kept tokens' buffer grows by
        return 0 if self.kept is None else self.nbytes() - self.kept.nbytes() + self.kept.live_nbytes()

    def seq_len(self) -> int:
        if self.kept is None:
            return 0
        return self.prompt_len + self.kept.seq_len() - self.positions.shape[-1]  # the prompt, then all that followed

    def attended(self) -> torch.Tensor | None:
        """The kept prompt positions, then every position after the prompt: [B, Hkv, N]."""
        B, H, _ = self.positions.shape
        later = torch.arange(self.prompt_len, self.seq_len(), device=self.positions.device).expand(B, H, -1)
        return torch.cat([self.positions, later], -1)

    def info(self):
        return self.kept.info() if self.kept is not None else {}

    def decode_fns(self, q):
        return self.kept.decode_fns(q)

    def decode_bytes(self) -> int:
        return self.kept.decode_bytes()
