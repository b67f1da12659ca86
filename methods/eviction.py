"""eviction: what the methods that drop tokens for good share (snapkv, pyramidkv, adakv, h2o, tova), as kvpress's
ScorerPress does for its presses: the top-k keep, the GQA-mean attention probabilities they score with, and the
storage of the kept tokens with their logical positions. A method file is then mostly its score.

Two storage layers:
- PromptEvictionLayer: at the end of prefill the method picks the prompt tokens each KV head keeps (snapkv, pyramidkv);
  what follows the prompt is appended and attended densely, nothing more is evicted. Every head keeps the same number,
  so the kept tokens are `full`'s storage, and capture-safe as `full` is: reserve() pins them in a PinnedKV with
  device-side lengths, and a one-token step is an in-place append and a live-length dense decode.
- StepEvictionLayer: a budget held while decoding too (h2o, tova): each call appends its tokens, attends over what is
  kept, scores the kept tokens from that attention and drops the lowest until the budget holds again.
Both store exactly the kept tokens ([B, Hkv, N, D] per buffer), so what is evicted is freed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.api import LayerCache, LayerSpec, Method, ReservedRoomError
from kvbench.attention import dense_attention
from kvbench.methods.full import FullLayer

GROW = 256  # tokens of headroom for what is appended after prefill, as `full` grows
QUERY_CHUNK = 256  # prompt queries scored at a time, so the fp32 probabilities stay [Hkv, g, 256, T]


@dataclass(frozen=True)
class Eviction(Method):
    """Base of the eviction family: a method that keeps a subset of the tokens per KV head and frees the rest."""

    family = "eviction"

    def keep(self, q: torch.Tensor, k: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        """Prompt positions to keep, sorted: q [B, Hq, Tq, D] (the last Tq prompt queries), k [B, Hkv, T, D] ->
        [B, Hkv, C] int64. Used by PromptEvictionLayer."""
        raise NotImplementedError

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        return PromptEvictionLayer(spec, self)


def group_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities (fp32, causal: q holds the last Tq of the T positions), averaged over the query
    heads that share a KV head: q [Hq, Tq, D], k [Hkv, T, D] -> [Hkv, Tq, T]. One sequence at a time."""
    Hq, Tq, D = q.shape
    H, T = k.shape[0], k.shape[1]
    g = Hq // H
    s = q.float().reshape(H, g * Tq, D) @ k.float().transpose(1, 2) * D**-0.5  # [Hkv, g * Tq, T]
    qpos = torch.arange(T - Tq, T, device=k.device).repeat(g)
    s.masked_fill_(torch.arange(T, device=k.device) > qpos[:, None], float("-inf"))
    return s.softmax(-1).view(H, g, Tq, T).mean(1)


def summed_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """group_probs summed over the queries, in chunks of QUERY_CHUNK: q [B, Hq, Tq, D], k [B, Hkv, T, D] ->
    [B, Hkv, T] fp32."""
    Tq, T = q.shape[2], k.shape[2]
    out = torch.zeros(k.shape[0], k.shape[1], T, device=k.device)
    for b in range(q.shape[0]):
        for lo in range(0, Tq, QUERY_CHUNK):
            hi = min(Tq, lo + QUERY_CHUNK)
            kb = k[b, :, : T - Tq + hi]  # keys these queries may see
            out[b, :, : kb.shape[1]] += group_probs(q[b, :, lo:hi], kb).sum(1)
    return out


def keep_top(scores: torch.Tensor, n_keep: int, n_last: int) -> torch.Tensor:
    """Indices to keep, sorted: the last n_last of N entries always, plus the top (n_keep - n_last) of the others by
    score. scores [B, H, N - n_last] (the others' scores) -> [B, H, n_keep] int64."""
    B, H, n_others = scores.shape
    last = torch.arange(n_others, n_others + n_last, device=scores.device).expand(B, H, n_last)
    top = scores.topk(n_keep - n_last, dim=-1).indices.sort(-1).values
    return torch.cat([top, last], -1)


class PromptEvictionLayer(LayerCache):
    """The prompt tokens `method.keep` chose per KV head, then everything after the prompt, stored and attended as
    `full` stores and attends (slot i of the FullLayer holds the i-th kept token; attention does not care where a token
    came from, its RoPE is already in the key)."""

    capture_safe = True  # after prefill it is a FullLayer, whose reserve() pins the buffers

    def __init__(self, spec: LayerSpec, method: Eviction):
        self.spec, self.method = spec, method
        self.kept: FullLayer | None = None  # the kept tokens (and later ones)
        self.positions: torch.Tensor | None = None  # [B, Hkv, C] logical positions of the prompt tokens kept
        self.prompt_len = 0

    def prefill(self, q, k, v):
        out = dense_attention(q, k, v, causal=True)  # prefill is dense: the model's output does not change
        keep = self.method.keep(q, k, self.spec)  # [B, Hkv, C]
        idx = keep[..., None].expand(-1, -1, -1, k.shape[3])
        self.kept = FullLayer(self.spec, GROW)
        self.kept._append(k.gather(2, idx), v.gather(2, idx))
        self.positions, self.prompt_len = keep, k.shape[2]
        return out

    def extend(self, q, k, v):
        return self.kept.extend(q, k, v)  # appended after the kept tokens, attended densely (causal within chunks)

    def reserve(self, n_new: int) -> None:
        if self.kept is None:
            raise ReservedRoomError(f"{self.method.name}: reserve() before prefill", 0, n_new, 0)
        self.kept.reserve(n_new)

    def advance(self, n: int) -> None:
        self.kept.advance(n)

    def nbytes(self) -> int:
        if self.kept is None:
            return 0
        return self.kept.nbytes() + self.positions.numel() * self.positions.element_size()

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
        return {**self.kept.info(), "kept_prompt": self.positions.shape[-1]} if self.kept is not None else {}

    def decode_fns(self, q):
        return self.kept.decode_fns(q)

    def decode_bytes(self) -> int:
        return self.kept.decode_bytes()


@dataclass(frozen=True)
class StepEviction(Eviction):
    """Base of the methods that evict while decoding (h2o, tova): a budget, the protected recent tokens, and how the
    kept tokens' scores change with the attention of new queries."""

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        return StepEvictionLayer(spec, self)

    def step_budget(self, prompt_len: int) -> tuple[int, int]:
        """(tokens kept per KV head, the most recent of them never evicted), fixed once the prompt is known."""
        raise NotImplementedError

    def rescore(self, old: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Scores [B, Hkv, N] of the N stored tokens k [B, Hkv, N, D] after queries q [B, Hq, Tq, D] (the last Tq
        stored tokens' queries) attended them; old [B, Hkv, N - Tq] are the scores before (None at prefill)."""
        raise NotImplementedError

    def keeps_scores(self) -> bool:
        """Whether the scores are state carried between steps (h2o's accumulated attention) or recomputed (tova)."""
        return True


class StepEvictionLayer(LayerCache):
    """A budget of tokens per KV head held at every call: the kept tokens in logical order, [B, Hkv, N, D], their
    positions [B, Hkv, N] and, for methods that carry them, their scores [B, Hkv, N] fp32.

    Not capture-safe (h2o and tova decode eagerly under the graph runner, which records why): a step appends with
    torch.cat and evicts by gathering the kept tokens into new tensors, so every step allocates and the token count is
    a host-side value. The methods allow a capture-safe step, with budget + 1 fixed slots where the new token overwrites
    the slot evicted the step before and the lowest score outside the recent positions is found on the device; that
    layer is not written yet."""

    capture_unsafe_reason = ("it evicts while decoding: each step re-scores the kept tokens and gathers the survivors "
                             "into new tensors")

    def __init__(self, spec: LayerSpec, method: StepEviction):
        self.spec, self.method = spec, method
        self.k = self.v = self.pos = self.scores = None
        self.n = 0  # tokens seen
        self.budget = self.recent = 0
        self.last_pos: torch.Tensor | None = None  # positions the last call attended

    def prefill(self, q, k, v):
        out = dense_attention(q, k, v, causal=True)  # the prompt attends in full
        T = k.shape[2]
        self.budget, self.recent = self.method.step_budget(T)
        self.k, self.v, self.n = k, v, T
        self.pos = torch.arange(T, device=k.device).expand(k.shape[0], k.shape[1], T).contiguous()
        self.last_pos = self.pos
        self._evict(self.method.rescore(None, q, k))
        return out

    def extend(self, q, k, v):
        B, H, T, _ = k.shape
        self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        new = torch.arange(self.n, self.n + T, device=k.device).expand(B, H, T)
        self.pos, self.n = torch.cat([self.pos, new], 2), self.n + T
        self.last_pos = self.pos
        out = dense_attention(q, self.k, self.v, causal=True)  # over what is kept and the new tokens
        self._evict(self.method.rescore(self.scores, q, self.k))
        return out

    def _evict(self, scores: torch.Tensor) -> None:
        """Drop the lowest-scored tokens outside the protected recent ones until the budget holds."""
        N = self.k.shape[2]
        if N > self.budget:
            last = min(self.recent, self.budget)
            idx = keep_top(scores[..., : N - last], self.budget, last)
            gather = idx[..., None].expand(-1, -1, -1, self.k.shape[3])
            self.k, self.v = self.k.gather(2, gather), self.v.gather(2, gather)
            self.pos, scores = self.pos.gather(2, idx), scores.gather(2, idx)
        self.scores = scores if self.method.keeps_scores() else None

    def nbytes(self) -> int:
        if self.k is None:
            return 0
        tensors = [self.k, self.v, self.pos] + ([self.scores] if self.scores is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def seq_len(self) -> int:
        return self.n

    def attended(self) -> torch.Tensor | None:
        return self.last_pos

    def info(self):
        # no decode_fns: a step's attention is not the whole step (the scores are updated from it and a token is
        # evicted), so the kernel suite times extend(), PyTorch code, and its record says so
        return {"budget": self.budget, "kept": 0 if self.k is None else self.k.shape[2], "impl": "torch"}

    def decode_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
