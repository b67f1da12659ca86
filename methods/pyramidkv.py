"""pyramidkv: snapkv's votes, with per-layer budgets that shrink with depth (a pyramid) at snapkv's total."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.api import LayerSpec, budget_tokens, param
from kvbench.methods.snapkv import SnapKV
from kvbench.registry import register


@register
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """pyramidkv: lower layers keep more prompt tokens, higher layers fewer; the votes are snapkv's.

    Based on PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (Cai et al., 2024),
    https://arxiv.org/abs/2406.02069, with the budget arithmetic of its code (github.com/Zefan-Cai/KVCache-Factory,
    pyramidkv/pyramidkv_utils.py, PyramidKVCluster). With C = capacity and w = window, beyond the window the top
    layer keeps (C - w) // beta tokens and the bottom layer 2 (C - w) minus that (capped at the T - w the prompt has,
    the top then taking the rest), with an equal step per layer in between: the layers' mean is C - w, snapkv's
    budget, so the total matches snapkv at the same capacity (the step is rounded down, as there, so the mean can exceed
    it by up to (n_layers - 1) / 2 tokens). Prompts shorter than
    2 (C - w) get snapkv's uniform budget, and prompts of at most C tokens are kept whole, as in that code.

    Where it differs, and why: the votes are snapkv's here (GQA mean, its window, pool and kernel parameters and
    defaults), where KVCache-Factory's PyramidKVCluster defaults to a 64-token window, avg-pool of width 5: one scorer
    for the family keeps pyramidkv and snapkv comparable, differing only in the per-layer budget.
    `budget_fraction` reports snapkv's (the layers' mean).

    Parameters
    ----------
    capacity : float, default 1024
        Mean prompt tokens kept per KV head over the layers, window included: tokens, or a fraction in (0, 1).
    window : int, default 32
        Observation window (as snapkv).
    kernel : int, default 7
        Pooling width over the votes (as snapkv).
    pool : str, default "max"
        "max" or "avg" (as snapkv).
    beta : int, default 20
        The top layer keeps 1/beta of the mean budget beyond the window.
    """

    name = "pyramidkv"
    beta: int = param(20, "the top layer keeps 1/beta of the mean budget beyond the window", ge=1)

    def prompt_capacity(self, T: int, spec: LayerSpec) -> int:
        C = min(budget_tokens(self.capacity, T), T)
        w = min(self.window, T)
        if C == T or C <= w or T < 2 * (C - w) or spec.n_layers < 2:
            return C  # snapkv's uniform budget
        lo = (C - w) // self.beta
        hi = 2 * (C - w) - lo
        if hi >= T - w:
            hi = T - w
            lo = 2 * (C - w) - hi
        step = (hi - lo) // (spec.n_layers - 1)
        return min(T, w + hi - spec.layer_idx * step)
