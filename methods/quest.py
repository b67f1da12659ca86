"""quest: query-aware page selection. Keys are grouped in pages of 16 tokens with each page's channel-wise min and max
key; every decode step bounds q.k per page from those, and attends exactly over the tokens of the top pages."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.api import BUDGET_VALID, LayerCache, LayerSpec, Method, budget_share, check_budget, param
from kvbench.methods.selection import GROW, SelectingLayer, tokens_of_budget, top_indices
from kvbench.registry import register

MIN_PAGES = 3  # pages a selecting step attends at the least, however small the budget (the authors' code)


@register
@dataclass(frozen=True)
class Quest(Method):
    """quest: per-page min/max keys bound each page's attention; the top pages are attended exactly.

    Based on Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (Tang et al., ICML 2024),
    https://arxiv.org/abs/2406.10774, and its code (github.com/mit-han-lab/Quest). For every page of `page` tokens the
    cache keeps the channel-wise max M and min m of its keys; a decode step's query q bounds the page's q.k by
    sum_i max(q_i M_i, q_i m_i), the top pages up to `budget` tokens are chosen, and the step attends exactly over
    their tokens. The page holding the newest token is always chosen here (a partly filled page's bound changes with
    every token). At least 3 pages are attended, however small the budget, as in the authors' code
    (evaluation/quest_attention.py). The first `dense_layers` layers attend densely, as in the paper and its code
    (layers 0 and 1); a page is 16 tokens there too. Nothing is freed: the full cache
    stays, only reads are cut; the metadata adds 2 / page of the key bytes.

    Measured (reports/data/cpu/accuracy-quest-pages.jsonl, SmolLM2-135M, 1K tokens, 10% budget): pages of 16 score
    0.125 on needle tasks where full scores 0.912, pages of 8 0.592, pages of 4 0.892. The bound of a large page is
    loose on this model: the needle's page is often missed, and its digits come out wrong. The default stays the
    paper's 16; pass `page=4` for small models or short prompts.

    Where it differs, and why: Quest's models are multi-head and select per head; with GQA one set of pages per KV
    head serves its query heads, ranked by the sum of their bounds (itself an upper bound of the sum of their q.k),
    so the pages are read once per KV head. Prefill and multi-token extends (a question chunk) attend densely;
    selection is how decode steps save time. On CUDA a step is three Triton kernels: the bounds, query side included
    (kernels/score_triton.py), an exact radix top-k of the pages (kernels/topk_select.py: ties go to the lower page,
    as the stable sort of the PyTorch path), and the attention over the chosen pages read in place in the cache
    (kernels/select_attend.py). `budget_fraction` reports the selecting layers' share.

    Parameters
    ----------
    budget : float, default 1024
        Tokens attended per decode step, the newest page included: a token count, or a fraction of the context.
    page : int, default 16
        Tokens per page.
    dense_layers : int, default 2
        The first layers attend densely.
    impl : str, default "auto"
        Page bounds: "triton" (the kernel), "torch" (the reference) or "auto" (triton on CUDA, torch elsewhere).
    """

    name = "quest"
    family = "selection"
    budget: float = param(1024.0, "tokens attended per decode step (fraction of the context if < 1)",
                          valid=BUDGET_VALID)
    page: int = param(16, "tokens per page", ge=1, le=1024)
    dense_layers: int = param(2, "first layers attended densely", ge=0)
    impl: str = param("auto", "page bounds: triton kernel, torch reference, or auto (triton on CUDA)",
                      choices=("auto", "triton", "torch"))

    def validate(self) -> None:
        check_budget(self.name, "budget", self.budget)

    def budget_fraction(self, context: int) -> float:
        return budget_share(self.budget, context)

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        return QuestLayer(spec, self)


def page_bounds_ref(q: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The reference: q [B, Hq, D], meta [B, Hkv, P, 2D] (max then min per channel) -> the bounds summed over each
    KV head's query heads, [B, Hkv, P] fp32. max(q M, q m) = relu(q) M + min(q, 0) m, so the group's sum is one dot
    with [sum relu(q), sum min(q, 0)]."""
    return (meta.float() * bound_weights(q, meta.shape[1])[:, :, None]).sum(-1)


def bound_weights(q: torch.Tensor, H: int) -> torch.Tensor:
    """q [B, Hq, D] -> [B, H, 2D] fp32: the group's positive parts, then its negative parts."""
    B, Hq, D = q.shape
    qg = q.float().reshape(B, H, Hq // H, D)
    return torch.cat([qg.clamp(min=0).sum(2), qg.clamp(max=0).sum(2)], -1)


class QuestLayer(SelectingLayer):
    def __init__(self, spec: LayerSpec, m: Quest):
        super().__init__(spec, m)
        self.meta: torch.Tensor | None = None  # [B, Hkv, pages capacity, 2D]: per-page max, then min, model dtype
        self.dense = spec.layer_idx < m.dense_layers
        self.row_size = m.page

    def summary(self) -> list[torch.Tensor]:
        return [self.meta]

    def summarize(self, lo: int) -> None:
        """Recompute the pages from the one holding position lo to the last."""
        n, page = self.kv.n, self.m.page
        P, p0 = -(-n // page), lo // page
        keys = self.kv.keys()[:, :, p0 * page :]
        B, H, _, D = keys.shape
        pad = (0, 0, 0, P * page - n)
        kmax = F.pad(keys, pad, value=float("-inf")).view(B, H, P - p0, page, D).amax(3)
        kmin = F.pad(keys, pad, value=float("inf")).view(B, H, P - p0, page, D).amin(3)
        if self.meta is None or P > self.meta.shape[2]:
            cap = P if self.meta is None else P + max(GROW // page, self.meta.shape[2] // 8)
            meta = keys.new_zeros(B, H, cap, 2 * D)  # pages not yet live are masked; no NaN garbage to mask
            if self.meta is not None:
                meta[:, :, :p0] = self.meta[:, :, :p0]
            self.meta = meta
        self.meta[:, :, p0:P] = torch.cat([kmax, kmin], -1)

    def n_pages(self) -> tuple[int, int]:
        """(pages stored, pages a decode step attends)."""
        return -(-self.kv.n // self.m.page), self.rows_attended(self.kv.n)

    # --- the capture-safe step's hooks (methods/selection.py) ---

    def rows_attended(self, n):
        """Pages a step attends at n tokens: the budget's, at least MIN_PAGES, at most all (n an int or a tensor)."""
        P = -(-n // self.m.page)
        want = tokens_of_budget(self.m.budget, n) // self.m.page
        if isinstance(n, torch.Tensor):
            return torch.minimum(P.long(), want.clamp(min=MIN_PAGES))
        return min(P, max(MIN_PAGES, want))

    def dense_layer(self) -> bool:
        return self.dense

    def grow_summary(self, tokens: int) -> None:
        P = -(-tokens // self.m.page)
        if self.meta.shape[2] < P:
            meta = self.meta.new_zeros(*self.meta.shape[:2], P, self.meta.shape[3])
            meta[:, :, : self.meta.shape[2]] = self.meta
            self.meta = meta

    def summarize_last(self, seen: torch.Tensor) -> None:
        """Recompute the page of position seen - 1 from the pinned keys, on the device."""
        page, k = self.m.page, self.kv.k  # [B, cap, Hkv, D]
        p = (seen[:1].long() - 1) // page
        pos = p * page + torch.arange(page, device=k.device)
        keys = k.index_select(1, pos.clamp(max=k.shape[1] - 1)).transpose(1, 2)  # [B, Hkv, page, D]
        dead = (pos >= seen[:1].long())[None, None, :, None]
        kmax = keys.masked_fill(dead, float("-inf")).amax(2, keepdim=True)
        kmin = keys.masked_fill(dead, float("inf")).amin(2, keepdim=True)
        self.meta.index_copy_(2, p, torch.cat([kmax, kmin], -1))

    def device_scores(self, q1: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        if self.triton:
            from kvbench.kernels.score_triton import quest_bounds

            return quest_bounds(q1, self.meta, self.meta.shape[2], seen, self.m.page)
        s = page_bounds_ref(q1, self.meta)
        rows = torch.arange(s.shape[-1], device=s.device)
        newest = (seen[:1].long() - 1) // self.m.page
        s = s.masked_fill(rows > newest, float("-inf"))  # pages not yet live
        return s.masked_fill(rows == newest, float("inf"))  # the newest page is always attended

    def sparse(self) -> bool:
        P, K = self.n_pages()
        return not self.dense and K < P

    def scores(self, q1: torch.Tensor) -> torch.Tensor:
        """Page bounds [B, Hkv, P] fp32 for the query q1 [B, Hq, D]."""
        P = self.n_pages()[0]
        if self.triton:
            from kvbench.kernels.score_triton import quest_bounds

            return quest_bounds(q1, self.meta, P)
        return page_bounds_ref(q1, self.meta[:, :, :P])

    def select_rows(self, q1: torch.Tensor) -> torch.Tensor:
        """The top pages [B, Hkv, K] for q1 [B, Hq, D], the newest page (partly filled) among them and last."""
        P, K = self.n_pages()
        if self.triton:  # the newest page's bound is +inf: the kernel's top-k takes it, last (ascending order)
            from kvbench.kernels.score_triton import quest_bounds

            return self.top(quest_bounds(q1, self.meta, P, self.kv.n, self.m.page), K)
        top = top_indices(self.scores(q1)[..., : P - 1], K - 1)  # [B, Hkv, K - 1]
        return torch.cat([top, torch.full_like(top[..., :1], P - 1)], -1)

    def info(self):
        P, K = self.n_pages()
        return {"impl": "triton" if self.triton else "torch", "dense": not self.sparse(), "pages": P,
                "pages_attended": P if not self.sparse() else K, **self.topk_info()}

    def sparse_bytes(self) -> int:
        P, K = self.n_pages()
        B, H, D = self.meta.shape[0], self.spec.n_kv_heads, self.spec.head_dim
        es = self.meta.element_size()
        tokens = (K - 1) * self.m.page + self.kv.n - (P - 1) * self.m.page
        return B * H * (P * 2 * D * es + tokens * 2 * D * self.kv.k.element_size())
