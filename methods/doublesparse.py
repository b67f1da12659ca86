"""doublesparse: a label cache of each token's heavy key channels (16 of 128) approximates q.k cheaply; the top
tokens by that estimate are attended exactly. Token sparsity on top of channel sparsity."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kvbench.api import (BUDGET_VALID, KVBenchError, LayerCache, LayerSpec, Method, budget_share, budget_tokens,
                         check_budget, param)
from kvbench.methods.selection import GROW, SelectingLayer
from kvbench.registry import register


@register
@dataclass(frozen=True)
class DoubleSparse(Method):
    """doublesparse: label scores over the heavy channels pick the tokens; exact attention over them.

    Based on Post-Training Sparse Attention with Double Sparsity (Yang et al., 2024), https://arxiv.org/abs/2408.07092,
    and its code (github.com/andy-yang-1/DoubleSparse). Per KV head the cache keeps, next to the full keys and
    values, a label cache: each token's key at `channels` heavy channels. A decode step estimates q.k from the labels,
    takes the top `budget` tokens and attends exactly over them.
    The heavy channels come from offline calibration in the paper (config/offline_calibration.py there: channels
    ranked by the mean |q * k| of each token with itself over calibration text). `calibration` reads such a file;
    without one, the same statistic is taken over the prompt's own queries and keys. `info()` says which ran.

    Where it differs, and why: the authors' code selects per query head over keys repeated per head; here one
    selection per KV head serves its query heads, scored by the sum of their label dots (a per-head ranking of the
    channels in a calibration file is merged per KV head by summed rank), so labels are stored and read once per KV
    head. Labels are kept in the model dtype (their 4-bit labels are not implemented). Prefill and multi-token extends
    attend densely. On CUDA the label scores are a Triton kernel (kernels/score_triton.py); top-k and the exact
    attention are PyTorch.

    Parameters
    ----------
    budget : float, default 0.0625
        Tokens attended per decode step: a fraction of the context (the paper's 1/16) or a token count.
    channels : int, default 16
        Heavy channels per KV head kept in the label cache (16 of 128, the paper's 1/8; at most the head dim).
    calibration : str, default ""
        A JSON channel file in the authors' format ({"model.layers.N.self_attn.qk_proj": [[channel, ...] per head]},
        channels sorted by importance); empty: calibrate on the prompt.
    impl : str, default "auto"
        Label scores: "triton" (the kernel), "torch" (the reference) or "auto" (triton on CUDA, torch elsewhere).
    """

    name = "doublesparse"
    family = "selection"
    budget: float = param(0.0625, "tokens attended per decode step (fraction of the context if < 1)",
                          valid=BUDGET_VALID)
    channels: int = param(16, "heavy channels per KV head in the label cache", ge=1)
    calibration: str = param("", "JSON channel file (the authors' format); empty: calibrate on the prompt")
    impl: str = param("auto", "label scores: triton kernel, torch reference, or auto (triton on CUDA)",
                      choices=("auto", "triton", "torch"))

    def validate(self) -> None:
        check_budget(self.name, "budget", self.budget)
        if self.calibration and not Path(self.calibration).is_file():
            raise KVBenchError(f"doublesparse: calibration file '{self.calibration}' not found; give the path of a "
                               "channel JSON file (the authors' config/offline_calibration.py writes one), or leave "
                               "calibration empty to calibrate on the prompt")

    def budget_fraction(self, context: int) -> float:
        return budget_share(self.budget, context)

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        return DoubleSparseLayer(spec, self)


@functools.cache
def _read_calibration(path: str) -> dict:
    return json.loads(Path(path).read_text())


def file_channels(path: str, spec: LayerSpec, r: int) -> torch.Tensor:
    """The top r channels per KV head from a calibration file: [Hkv, r] int64. Rows per query head are merged per
    KV head by summed rank."""
    key = f"model.layers.{spec.layer_idx}.self_attn.qk_proj"
    rows = _read_calibration(path).get(key)
    if rows is None:
        raise KVBenchError(f"doublesparse: '{path}' has no entry '{key}'; calibrate this model with the authors' "
                           "config/offline_calibration.py, or leave calibration empty")
    ranking = torch.tensor(rows)  # [heads, D]: channels, most important first
    heads, D = ranking.shape
    if D != spec.head_dim or heads not in (spec.n_heads, spec.n_kv_heads):
        raise KVBenchError(f"doublesparse: '{path}' entry '{key}' is {heads} x {D}, this model needs "
                           f"{spec.n_heads} (or {spec.n_kv_heads}) x {spec.head_dim}; calibrate this model")
    rank = torch.empty_like(ranking).scatter_(1, ranking, torch.arange(D).expand(heads, D))  # rank of each channel
    rank = rank.view(spec.n_kv_heads, -1, D).sum(1)
    return rank.argsort(dim=-1, stable=True)[:, :r]


def prompt_channels(q: torch.Tensor, k: torch.Tensor, r: int) -> torch.Tensor:
    """The authors' statistic on the prompt: mean over positions of |q_t * k_t| per channel, summed over the query
    heads of each KV head; q [B, Hq, Tq, D] (the last Tq positions), k [B, Hkv, T, D] -> top r channels [B, Hkv, r]."""
    B, Hq, Tq, D = q.shape
    H = k.shape[1]
    qk = (q.float().reshape(B, H, Hq // H, Tq, D) * k[:, :, None, -Tq:].float()).abs().mean(3).sum(2)  # [B, Hkv, D]
    return qk.topk(r, dim=-1).indices


def label_scores_ref(q: torch.Tensor, labels: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The reference: q [B, Hq, D], labels [B, Hkv, N, r], channels [B, Hkv, r] -> estimated group-summed q.k
    [B, Hkv, N] fp32."""
    return (labels.float() * label_weights(q, channels)[:, :, None]).sum(-1)


def label_weights(q: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The query's heavy channels, summed over each KV head's query heads: [B, Hkv, r] fp32."""
    B, Hq, D = q.shape
    H = channels.shape[1]
    return q.float().reshape(B, H, Hq // H, D).sum(2).gather(2, channels)


class DoubleSparseLayer(SelectingLayer):
    def __init__(self, spec: LayerSpec, m: DoubleSparse):
        super().__init__(spec, m)
        self.r = min(m.channels, spec.head_dim)
        self.labels: torch.Tensor | None = None  # [B, Hkv, capacity, r] model dtype
        self.channels: torch.Tensor | None = None  # [B, Hkv, r] int64

    def summary(self) -> list[torch.Tensor]:
        return [self.labels, self.channels]

    def summarize(self, lo: int) -> None:
        """Labels of the keys from position lo on."""
        k = self.kv.keys()[:, :, lo:]
        B, H, T, _ = k.shape
        n = self.kv.n
        if self.labels is None or n > self.labels.shape[2]:
            cap = n if self.labels is None else n + max(GROW, self.labels.shape[2] // 8)
            labels = k.new_empty(B, H, cap, self.r)
            if self.labels is not None:
                labels[:, :, : n - T] = self.labels[:, :, : n - T]
            self.labels = labels
        self.labels[:, :, n - T : n] = k.gather(3, self.channels[:, :, None].expand(-1, -1, T, -1))

    def prefill(self, q, k, v):
        if self.m.calibration:
            chosen = file_channels(self.m.calibration, self.spec, self.r).to(k.device)
            self.channels = chosen.expand(k.shape[0], -1, -1).contiguous()
        else:
            self.channels = prompt_channels(q, k, self.r)
        return super().prefill(q, k, v)

    def n_select(self) -> int:
        return min(self.kv.n, budget_tokens(self.m.budget, self.kv.n))

    def sparse(self) -> bool:
        return self.n_select() < self.kv.n

    def scores(self, q1: torch.Tensor) -> torch.Tensor:
        """Estimated q.k [B, Hkv, n] fp32 from the labels, for q1 [B, Hq, D]."""
        labels = self.labels[:, :, : self.kv.n]
        if self.triton:
            from kvbench.kernels.score_triton import rowdot

            return rowdot(labels, label_weights(q1, self.channels))
        return label_scores_ref(q1, labels, self.channels)

    def select(self, q1: torch.Tensor) -> torch.Tensor:
        return self.scores(q1).topk(self.n_select(), dim=-1).indices

    def info(self):
        return {"impl": "triton" if self.triton else "torch", "selected": self.n_select(), "channels": self.r,
                "calibration": self.m.calibration or "prompt"}

    def sparse_bytes(self) -> int:
        B, H, D = self.labels.shape[0], self.spec.n_kv_heads, self.spec.head_dim
        es = self.labels.element_size()
        return B * H * (self.kv.n * self.r * es + self.n_select() * 2 * D * es)
