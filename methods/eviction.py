"""eviction: what the methods that drop tokens for good share (snapkv, pyramidkv, adakv, h2o, tova), as kvpress's
ScorerPress does for its presses: the top-k keep, the GQA-mean attention probabilities they score with, and the
storage of the kept tokens with their logical positions. A method file is then mostly its score.

Two storage layers:
- PromptEvictionLayer: at the end of prefill the method picks the prompt tokens each KV head keeps (snapkv, pyramidkv);
  what follows the prompt is appended and attended densely, nothing more is evicted. Every head keeps the same number,
  so the kept tokens are `full`'s storage, and capture-safe as `full` is: reserve() pins them in a PinnedKV with
  device-side lengths, and a one-token step is an in-place append and a live-length dense decode.
- StepEvictionLayer: a budget held while decoding too (h2o, tova): each call appends its tokens, attends over what is
  kept, scores the kept tokens from that attention and drops the lowest until the budget holds again; capture-safe
  through reserve(), which moves the kept tokens into budget + 1 fixed slots (EvictionSlots).
Both store only the kept tokens ([B, Hkv, N, D] per buffer; the slots one more), so what is evicted is freed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.api import LayerCache, LayerSpec, Method, ReservedRoomError, capturing
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

    Capture-safe: reserve() moves the kept tokens into budget + 1 fixed slots per KV head (EvictionSlots), where each
    one-token step writes the new token into the slot evicted the step before, attends and re-scores in one pass over
    the slots, and finds the next slot to evict on the device (the lowest score outside the recent positions). Without
    reserve() (and for chunks of more than one token) a call appends with torch.cat and evicts by gathering the kept
    tokens into new tensors; both paths keep the same tokens."""

    capture_safe = True

    def __init__(self, spec: LayerSpec, method: StepEviction):
        self.spec, self.method = spec, method
        self.k = self.v = self.pos = self.scores = None
        self.n = 0  # tokens seen
        self.budget = self.recent = 0
        self.last_pos: torch.Tensor | None = None  # positions the last call attended
        self.slots: EvictionSlots | None = None  # after reserve()

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
        if self.slots is not None:
            if k.shape[2] == 1:
                out = self.slots.step(q, k, v)
                self.last_pos = None  # the slots' own record from now on
                if not capturing(q):
                    self.n += 1
                return out
            self.k, self.v, self.pos, scores = self.slots.ordered()  # a chunk: the plain path, then back in slots
            self.scores = scores if self.method.keeps_scores() else None
            out = self._extend(q, k, v)
            self.slots = EvictionSlots(self)
            self.k = self.v = self.pos = self.scores = None
            return out
        return self._extend(q, k, v)

    def _extend(self, q, k, v):
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

    def reserve(self, n_new: int) -> None:
        """Any number of steps fits: the slots are as many as the budget ever holds, plus the new token."""
        if self.k is None and self.slots is None:
            raise ReservedRoomError(f"{self.method.name}: reserve() before prefill", 0, n_new, 0)
        if self.slots is None:
            self.slots = EvictionSlots(self)
            self.k = self.v = self.pos = self.scores = None  # last_pos: what prefill attended, until a step

    def advance(self, n: int) -> None:
        self.n += n

    def nbytes(self) -> int:
        if self.slots is not None:
            return self.slots.nbytes()
        if self.k is None:
            return 0
        tensors = [self.k, self.v, self.pos] + ([self.scores] if self.scores is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def seq_len(self) -> int:
        return self.n

    def attended(self) -> torch.Tensor | None:
        return self.last_pos if self.slots is None or self.last_pos is not None else self.slots.attended()

    def info(self):
        # no decode_fns: a step's attention is not the whole step (the scores are updated from it and a token is
        # evicted), so the kernel suite times extend() (after reserve(): the slot step), PyTorch code, and says so
        kept = self.slots.budget if self.slots is not None else (0 if self.k is None else self.k.shape[2])
        return {"budget": self.budget, "kept": kept, "impl": "torch", "pinned": self.slots is not None}

    def decode_bytes(self) -> int:
        k = self.slots.k if self.slots is not None else self.k
        return 2 * k.numel() * k.element_size()


class EvictionSlots:
    """A StepEvictionLayer's tokens in budget + 1 fixed slots per KV head, with device-side state only: `valid` slots,
    positions, fp32 scores, the slot the next token goes to (`free`) and the tokens seen (`n`). A one-token step does
    no allocation that outlives it, no host sync and no shape change, so a CUDA graph can replay it."""

    def __init__(self, layer: StepEvictionLayer):
        k, v, pos, scores = layer.k, layer.v, layer.pos, layer.scores
        B, H, N, D = k.shape
        S = layer.budget + 1
        self.budget, self.recent, self.accumulate = layer.budget, min(layer.recent, layer.budget), \
            layer.method.keeps_scores()
        self.k, self.v = k.new_zeros(B, H, S, D), v.new_zeros(B, H, S, D)
        self.k[:, :, :N], self.v[:, :, :N] = k, v
        self.pos = torch.full((B, H, S), -1, dtype=torch.long, device=k.device)
        self.pos[..., :N] = pos
        self.scores = torch.zeros(B, H, S, dtype=torch.float32, device=k.device)
        if scores is not None:
            self.scores[..., :N] = scores
        self.valid = torch.zeros(B, H, S, dtype=torch.bool, device=k.device)
        self.valid[..., :N] = True
        self.seen = self.valid.clone()  # the slots the last step attended
        self.free = torch.full((B, H, 1), N, dtype=torch.long, device=k.device)  # N <= budget < S
        self.n = torch.full((1, 1, 1), layer.n, dtype=torch.long, device=k.device)

    def step(self, q, k, v) -> torch.Tensor:
        B, H, S, D = self.k.shape
        Hq = q.shape[1]
        f = self.free
        self.k.scatter_(2, f[..., None].expand(-1, -1, 1, D), k)
        self.v.scatter_(2, f[..., None].expand(-1, -1, 1, D), v)
        self.pos.scatter_(2, f, self.n.expand(B, H, 1))
        self.scores.scatter_(2, f, 0.0)  # the new token starts from what it gets now
        self.valid.scatter_(2, f, True)
        self.n.add_(1)
        # one pass over the slots gives the output and the GQA-mean probabilities the scores need (fp32)
        s = q.float().reshape(B, H, Hq // H, D) @ self.k.float().transpose(-1, -2) * D**-0.5  # [B, H, g, S]
        p = s.masked_fill(~self.valid[:, :, None], float("-inf")).softmax(-1)
        out = (p @ self.v.float()).reshape(B, Hq, 1, D).to(q.dtype)
        if self.accumulate:
            self.scores.add_(p.mean(2))
        else:
            self.scores.copy_(p.mean(2))
        self.seen.copy_(self.valid)
        # over budget: evict the lowest score outside the `recent` newest positions; else the next empty slot
        over = self.valid.sum(-1, keepdim=True) > self.budget
        protected = self.pos >= self.n - self.recent
        victim = self.scores.masked_fill(~self.valid | protected, float("inf")).argmin(-1, keepdim=True)
        empty = (~self.valid).to(torch.uint8).argmax(-1, keepdim=True)
        self.valid.scatter_(2, victim, ~over & self.valid.gather(2, victim))
        self.free.copy_(torch.where(over, victim, empty))
        return out

    def ordered(self):
        """The valid slots in position order: k, v [B, H, N, D], positions and scores [B, H, N] (a host sync)."""
        N = int(self.valid[0, 0].sum())
        order = self.pos.masked_fill(~self.valid, torch.iinfo(torch.long).max).argsort(-1)[..., :N]
        take = order[..., None].expand(-1, -1, -1, self.k.shape[3])
        return self.k.gather(2, take), self.v.gather(2, take), self.pos.gather(2, order), self.scores.gather(2, order)

    def attended(self) -> torch.Tensor:
        N = int(self.seen[0, 0].sum())
        return self.pos.masked_fill(~self.seen, torch.iinfo(torch.long).max).sort(-1).values[..., :N]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos, self.scores, self.valid,
                                                         self.seen, self.free, self.n))
