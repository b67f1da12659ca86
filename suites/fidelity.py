"""Attention fidelity: how close a method's decode attention is to full attention, on the model's real queries and keys.

`Fidelity(inner)` is an internal wrapper Method (not registered). Each of its layers holds the inner method's
LayerCache and a `full` FullLayer fed the same q/k/v. The model runs on the inner method's outputs, so the task score is
the method's own; at every decode step (an extend of one token) the wrapper also computes full attention over every
token seen and compares.

Definitions, per layer, decode step, batch row b and KV head g (T = tokens seen, the new one included):
- P[t] = mean over the query heads h of group g of softmax_t(q_h . k_t / sqrt(D)): full attention's probabilities,
  averaged over the GQA group (a method selects one token set per KV head, shared by its query heads).
- S = the positions the method attended on this step, from `LayerCache.attended()` ([B, Hkv, N]; None = all T;
  negative entries are padding; repeats count once); k = |S|.
- topk_recall = |{t in S : P[t] >= P_(k)}| / k, with P_(k) the k-th largest P: the share of the exact top-k tokens
  the method attended (ties at the k-th value count as hits). 1 when the method attends every token.
- attn_mass = sum over t in S of P[t]: the share of full attention's probability mass on the attended tokens.
- out_rel_err = ||o_method - o_full|| / ||o_full|| over D, per query head: relative error of the attention output
  against full attention over the uncompressed cache (for quantizing methods this is the error that selection alone
  would not show).
- attended_frac = k / T.
- sel_out_err = ||o_sel - o_full|| / ||o_full||, with o_sel exact attention (full-precision keys and values, softmax
  renormalised) over S alone: what the selection stage loses. 0 when the method attends every token.
- storage_err = ||o_method - o_sel|| / ||o_full||: what the method's storage (e.g. 2-bit keys and values) adds on top
  of its own selection; for a method that attends every token (kivi) it is out_rel_err.
Each is averaged over decode steps, batch rows and heads per layer (`<metric>_layers`, one value per layer), and over
layers (`<metric>`). Prefill and multi-token extends (a question chunk) are fed to both caches but not measured.

The reference of a decode step: with `drive="method"` in fp32 (the CPU), full attention computed from the logits
the metrics need anyway (`exact_attention`, equal to FullLayer's SDPA output to fp32 rounding and about 10x cheaper
on the CPU at 4K tokens); otherwise the shadow FullLayer's own output.

`drive` says whose outputs the model runs on: "method" (the default: the task score is the method's own, and each
layer is measured on the queries and keys the method's earlier errors produced) or "full" (teacher forcing: the model
runs on full attention's outputs, so every method and layer is measured on the same queries and keys, and a layer's
numbers are its own loss, not its upstream layers' drift; suites/fidelity_at_length.py uses it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvbench.api import LayerCache, LayerSpec, Method
from kvbench.attention import gather_rows
from kvbench.methods.full import FullLayer

METRICS = ("topk_recall", "attn_mass", "out_rel_err", "attended_frac", "sel_out_err", "storage_err")
DRIVES = ("method", "full")


class FidelityStats:
    """Per-layer sums of the metrics over decode steps, batch rows and heads."""

    def __init__(self):
        self.sums: dict[int, dict[str, torch.Tensor | float]] = {}
        self.counts: dict[int, dict[str, int]] = {}

    def add(self, layer: int, name: str, values: torch.Tensor) -> None:
        s = self.sums.setdefault(layer, dict.fromkeys(METRICS, 0.0))
        c = self.counts.setdefault(layer, dict.fromkeys(METRICS, 0))
        s[name] = s[name] + values.double().sum()  # stays on the device: no sync per decode step
        c[name] += values.numel()

    def steps(self) -> int:
        return max((c["topk_recall"] for c in self.counts.values()), default=0)

    def summary(self) -> dict[str, float | list[float]]:
        """{metric: mean over layers, metric_layers: per-layer means}; empty when no decode step was measured."""
        if not self.counts:
            return {}
        layers = sorted(self.counts)
        out: dict[str, float | list[float]] = {}
        for m in METRICS:
            per = [float(self.sums[i][m]) / self.counts[i][m] for i in layers if self.counts[i][m]]
            out[f"{m}_layers"] = [round(x, 6) for x in per]
            out[m] = round(sum(per) / len(per), 6) if per else None
        return out


def exact_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full attention of one decode step in fp32, from the logits step_metrics scores with: q [B, Hq, 1, D], keys,
    values [B, Hkv, T, D] -> (output [B, Hq, 1, D] fp32, logits [B, Hkv, g, T]). On the CPU about 10x cheaper than
    dense_attention's SDPA at 4K tokens (no GQA copy of the keys and values); equal to it to fp32 rounding."""
    B, Hq, _, D = q.shape
    Hkv = keys.shape[1]
    logits = (q.float().view(B, Hkv, Hq // Hkv, D) @ keys.float().transpose(-1, -2)) * D**-0.5  # [B, Hkv, g, T]
    return (torch.softmax(logits, dim=-1) @ values.float()).view(B, Hq, 1, D), logits


def step_metrics(q: torch.Tensor, keys: torch.Tensor, out: torch.Tensor, ref: torch.Tensor,
                 attended: torch.Tensor | None, values: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Fidelity of one decode step. q [B, Hq, 1, D]; keys, values [B, Hkv, T, D] (every token, logical order); out,
    ref [B, Hq, 1, D] (the method's and full attention's outputs); attended [B, Hkv, N] positions or None (all);
    logits [B, Hkv, g, T] as exact_attention returns them, when already computed. Returns topk_recall, attn_mass,
    attended_frac [B, Hkv] and out_rel_err [B, Hq]; with values also sel_out_err and storage_err [B, Hq]."""
    B, Hq, _, D = q.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    ref32 = ref.float()
    ref_norm = ref32.norm(dim=-1).squeeze(-1).clamp(min=1e-12)  # [B, Hq]
    err = (out.float() - ref32).norm(dim=-1).squeeze(-1) / ref_norm
    if attended is None:  # every token attended: nothing missed, all the mass kept
        ones = torch.ones(B, Hkv, device=q.device)
        stages = {} if values is None else dict(sel_out_err=torch.zeros_like(err), storage_err=err)
        return dict(topk_recall=ones, attn_mass=ones, out_rel_err=err, attended_frac=ones, **stages)
    g = Hq // Hkv
    if logits is None:  # the expression exact_attention uses, so given or computed here they are the same bits
        logits = (q.float().view(B, Hkv, g, D) @ keys.float().transpose(-1, -2)) * D**-0.5  # [B, Hkv, g, T]
    p = torch.softmax(logits, dim=-1).mean(dim=2)  # [B, Hkv, T]: GQA-mean probabilities
    pos = attended.to(p.device).long()
    valid = (pos >= 0) & (pos < T)
    chosen = torch.zeros(B, Hkv, T + 1, dtype=torch.bool, device=p.device)
    chosen.scatter_(-1, torch.where(valid, pos, T), True)  # invalid entries land in a spare slot
    chosen = chosen[..., :T]
    k = chosen.sum(-1)  # [B, Hkv]
    top = p.topk(max(1, min(pos.shape[-1], T)), dim=-1).values  # k <= N: no device sync to size it
    kth = top.gather(-1, (k - 1).clamp(min=0)[..., None])  # the k-th largest probability
    hits = (chosen & (p >= kth)).sum(-1).minimum(k)
    recall = torch.where(k > 0, hits / k.clamp(min=1), torch.zeros_like(p[..., 0]))
    mass = (p * chosen).sum(-1)
    m = dict(topk_recall=recall, attn_mass=mass, out_rel_err=err, attended_frac=k / T)
    if values is not None:
        sel = selection_output(logits, pos, valid & ~_repeats(pos), values).view(B, Hq, D)  # exact attention over S
        m["sel_out_err"] = (sel - ref32.view(B, Hq, D)).norm(dim=-1) / ref_norm
        m["storage_err"] = (out.float().view(B, Hq, D) - sel).norm(dim=-1) / ref_norm
    return m


def _repeats(pos: torch.Tensor) -> torch.Tensor:
    """Which entries of pos [..., N] repeat an earlier-sorted entry of their row (bool [..., N]): each position once."""
    s, order = pos.sort(dim=-1)
    rep = torch.zeros_like(pos, dtype=torch.bool)
    return rep.scatter_(-1, order[..., 1:], s[..., 1:] == s[..., :-1])


def selection_output(logits: torch.Tensor, pos: torch.Tensor, take: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Full-precision attention over the attended tokens only: logits [B, Hkv, g, T] (exact q.k / sqrt(D)), pos
    [B, Hkv, N] positions, take [B, Hkv, N] bool (the valid first occurrences), values [B, Hkv, T, D] ->
    [B, Hkv, g, D]; zeros where nothing was taken. Gathers the N rows rather than masking all T: at a 10% budget the
    product reads a tenth of the values."""
    B, H, g, _ = logits.shape
    idx = torch.where(take, pos, 0).long()
    picked = logits.gather(-1, idx[:, :, None, :].expand(-1, -1, g, -1))
    w = torch.softmax(picked.masked_fill(~take[:, :, None, :], float("-inf")), dim=-1).nan_to_num(0.0)  # all -inf: 0
    rows = gather_rows(values, idx)  # [B, Hkv, N, D]: whole rows
    return w @ rows.float()


class FidelityLayer(LayerCache):
    """The inner method's cache, shadowed by a full cache; the model sees the inner cache's outputs, or full's when
    `drive_full`."""

    def __init__(self, inner: LayerCache, spec: LayerSpec, stats: FidelityStats, drive_full: bool = False):
        self.inner, self.spec, self.stats, self.drive_full = inner, spec, stats, drive_full
        self.full = FullLayer(spec, grow=256)

    def prefill(self, q, k, v):
        out = self.inner.prefill(q, k, v)
        if self.drive_full:
            return self.full.prefill(q, k, v)
        self.full.prefill(q[:, :, -1:], k, v)  # only stores k/v: one query keeps its attention cheap
        return out

    def extend(self, q, k, v):
        out = self.inner.extend(q, k, v)
        if q.shape[2] != 1:
            ref = self.full.extend(q if self.drive_full else q[:, :, -1:], k, v)
            return ref if self.drive_full else out
        logits = None
        if self.drive_full or q.dtype != torch.float32:  # full's own kernel: what drives the model, or a half dtype
            ref = self.full.extend(q, k, v)
        else:  # fp32: the reference from the logits the metrics need anyway, equal to full's output to fp32 rounding
            self.full._append(k, v)
            ref, logits = exact_attention(q, self.full.keys(), self.full.values())
        m = step_metrics(q, self.full.keys(), out, ref, self.inner.attended(), self.full.values(), logits)
        for name, values in m.items():
            self.stats.add(self.spec.layer_idx, name, values)
        return ref if self.drive_full else out

    # what the method holds and reports, not the shadow cache
    def nbytes(self) -> int:
        return self.inner.nbytes()

    def seq_len(self) -> int:
        return self.inner.seq_len()

    def attended(self):
        return self.inner.attended()

    def info(self):
        return self.inner.info()


@dataclass(frozen=True)
class Fidelity(Method):
    """fidelity: run `inner` and measure its decode attention against full attention (internal, not registered).

    Parameters
    ----------
    inner : Method
        The method under test; its outputs drive the model.
    drive : str, default "method"
        Whose outputs the model runs on: "method" (the inner method's) or "full" (teacher forcing).
    stats : FidelityStats
        Where the per-layer metrics accumulate; read them with `stats.summary()`.
    """

    name = "fidelity"
    inner: Method = None
    drive: str = "method"
    stats: FidelityStats = field(default_factory=FidelityStats, compare=False)

    def validate(self) -> None:
        if self.drive not in DRIVES:
            raise ValueError(f"Fidelity drive '{self.drive}': use one of {', '.join(DRIVES)}")

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        return FidelityLayer(self.inner.make_layer(spec), spec, self.stats, drive_full=self.drive == "full")
