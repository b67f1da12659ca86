"""doublesparse: a label cache of each token's heavy key channels (16 of 128) approximates q.k cheaply; the top
tokens by that estimate are attended exactly. Token sparsity on top of channel sparsity."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kvbench.api import (BUDGET_VALID, KVBenchError, LayerCache, LayerSpec, Method, ParamError, budget_share,
                         check_budget, param)
from kvbench.methods.selection import GROW, SelectingLayer, tokens_of_budget
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
    head. Labels are quantized as the authors' code does (label_bits=4 by default: per token, asymmetric over its
    `channels` values, min-max to 2^bits - 1 levels, the query's label quantized the same way per query head); the
    codes are packed two per byte at 4 bits, with each token's step and minimum in fp16 (the authors dequantize in
    place and keep fp16 labels: their 4 bits are a fidelity setting, here they are the bytes stored and read).
    label_bits=16 keeps the labels in the model dtype. Prefill and multi-token extends attend densely. On CUDA a step
    is three Triton kernels: the label scores, the query's label built in the kernel (kernels/score_triton.py,
    reading the codes), an exact radix top-k (kernels/topk_select.py: ties go to the lower position, where
    torch.topk on the PyTorch path breaks them its own way), and the attention over the chosen tokens read in place
    in the cache (kernels/select_attend.py).

    Parameters
    ----------
    budget : float, default 0.0625
        Tokens attended per decode step: a fraction of the context (the paper's 1/16) or a token count.
    channels : int, default 16
        Heavy channels per KV head kept in the label cache (16 of 128, the paper's 1/8; at most the head dim).
    label_bits : int, default 4
        Bits per label element: 4 or 8 (quantized per token) or 16 (the model dtype, unquantized).
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
    label_bits: int = param(4, "bits per label element (4, 8: quantized per token; 16: the model dtype)",
                            choices=(4, 8, 16))
    calibration: str = param("", "JSON channel file (the authors' format); empty: calibrate on the prompt")
    impl: str = param("auto", "label scores: triton kernel, torch reference, or auto (triton on CUDA)",
                      choices=("auto", "triton", "torch"))

    def validate(self) -> None:
        check_budget(self.name, "budget", self.budget)
        if self.label_bits == 4 and self.channels % 2:
            raise ParamError(self.name, "channels", self.channels, "an even number with label_bits=4 (two codes a "
                             "byte)")
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


def pseudo_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The authors' per-row min-max quantization of x [..., r]: (codes uint8 [..., r], step [...], minimum [...]),
    x ~ codes * step + minimum; a constant row gets step 1/(2^bits - 1)."""
    top = 2**bits - 1
    lo, hi = x.amin(-1), x.amax(-1)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    scale = span.reciprocal() * top  # what torch's top / span computes; kernels/score_triton.py matches it bit for bit
    codes = ((x - lo[..., None]) * scale[..., None]).round().clamp(0, top).to(torch.uint8)
    return codes, span / top, lo


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16 [..., r] (r even) -> [..., r / 2]: code 2i in the low half of byte i, 2i + 1 in the high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([b & 15, b >> 4], -1).flatten(-2)


def dequantize_labels(labels: torch.Tensor, meta: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The labels as floats [..., r] fp32: labels themselves at 16 bits, else codes (packed at 4 bits) * step + min
    with meta [..., 2] = (step, min)."""
    if meta is None:
        return labels.float()
    codes = unpack_nibbles(labels) if bits == 4 else labels
    return codes.float() * meta[..., :1].float() + meta[..., 1:].float()


def label_scores_ref(q: torch.Tensor, labels: torch.Tensor, channels: torch.Tensor, meta: torch.Tensor | None = None,
                     bits: int = 16) -> torch.Tensor:
    """The reference: q [B, Hq, D], labels [B, Hkv, N, r] (or codes, with meta [B, Hkv, N, 2]), channels
    [B, Hkv, r] -> estimated group-summed q.k [B, Hkv, N] fp32."""
    return (dequantize_labels(labels, meta, bits) * label_weights(q, channels, bits)[:, :, None]).sum(-1)


def label_weights(q: torch.Tensor, channels: torch.Tensor, bits: int = 16) -> torch.Tensor:
    """The query's heavy channels (each query head's label quantized as the keys' are, below 16 bits), summed over
    each KV head's query heads: [B, Hkv, r] fp32."""
    B, Hq, D = q.shape
    H, r = channels.shape[1], channels.shape[2]
    qg = q.float().reshape(B, H, Hq // H, D).gather(3, channels[:, :, None].expand(-1, -1, Hq // H, -1))
    if bits < 16:
        codes, step, lo = pseudo_quantize(qg, bits)
        qg = codes.float() * step[..., None] + lo[..., None]
    return qg.sum(2)


class DoubleSparseLayer(SelectingLayer):
    def __init__(self, spec: LayerSpec, m: DoubleSparse):
        super().__init__(spec, m)
        self.r = min(m.channels, spec.head_dim)
        self.bits = m.label_bits
        # [B, Hkv, capacity, r] model dtype at 16 bits; else uint8 codes [B, Hkv, capacity, r * bits / 8] and
        # meta [B, Hkv, capacity, 2] fp16 (each token's step and minimum)
        self.labels: torch.Tensor | None = None
        self.meta: torch.Tensor | None = None
        self.channels: torch.Tensor | None = None  # [B, Hkv, r] int64

    def summary(self) -> list[torch.Tensor]:
        return [t for t in (self.labels, self.meta, self.channels) if t is not None]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Labels x [B, Hkv, T, r] as stored: (x, None) at 16 bits, else (codes, meta)."""
        if self.bits == 16:
            return x, None
        codes, step, lo = pseudo_quantize(x.float(), self.bits)
        return pack_nibbles(codes) if self.bits == 4 else codes, torch.stack([step, lo], -1).half()

    def summarize(self, lo: int) -> None:
        """Labels of the keys from position lo on."""
        k = self.kv.keys()[:, :, lo:]
        T, n = k.shape[2], self.kv.n
        new = self.encode(k.gather(3, self.channels[:, :, None].expand(-1, -1, T, -1)))
        self.labels, self.meta = (None if x is None else self._written(old, x, n) for old, x in
                                  zip((self.labels, self.meta), new))

    @staticmethod
    def _written(buf: torch.Tensor | None, x: torch.Tensor, n: int) -> torch.Tensor:
        """buf [B, Hkv, capacity, c] with x [B, Hkv, T, c] written at rows [n - T, n); grown (as `full` grows) when
        it is short."""
        T = x.shape[2]
        if buf is None or n > buf.shape[2]:
            cap = n if buf is None else n + max(GROW, buf.shape[2] // 8)
            grown = x.new_empty(*x.shape[:2], cap, x.shape[3])
            if buf is not None:
                grown[:, :, : n - T] = buf[:, :, : n - T]
            buf = grown
        buf[:, :, n - T : n] = x
        return buf

    def prefill(self, q, k, v):
        if self.m.calibration:
            chosen = file_channels(self.m.calibration, self.spec, self.r).to(k.device)
            self.channels = chosen.expand(k.shape[0], -1, -1).contiguous()
        else:
            self.channels = prompt_channels(q, k, self.r)
        return super().prefill(q, k, v)

    def n_select(self) -> int:
        return self.rows_attended(self.kv.n)

    # --- the capture-safe step's hooks (methods/selection.py) ---

    def rows_attended(self, n):
        """Tokens a step attends at n tokens (n an int or a device tensor)."""
        want = tokens_of_budget(self.m.budget, n)
        return torch.minimum(n.long(), want) if isinstance(n, torch.Tensor) else min(n, want)

    def grow_summary(self, tokens: int) -> None:
        for name in ("labels", "meta"):
            buf = getattr(self, name)
            if buf is not None and buf.shape[2] < tokens:
                grown = buf.new_empty(*buf.shape[:2], tokens, buf.shape[3])
                grown[:, :, : buf.shape[2]] = buf
                setattr(self, name, grown)

    def summarize_last(self, seen: torch.Tensor) -> None:
        """The label of the token at position seen - 1, written there on the device."""
        pos = seen[:1].long() - 1
        k = self.kv.k.index_select(1, pos).transpose(1, 2)  # [B, Hkv, 1, D]
        codes, meta = self.encode(k.gather(3, self.channels[:, :, None]))
        self.labels.index_copy_(2, pos, codes)
        if meta is not None:
            self.meta.index_copy_(2, pos, meta)

    def device_scores(self, q1: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        s = self.label_scores(q1, self.labels.shape[2], seen)
        if self.triton:  # the kernel masked the rows past seen
            return s
        return s.masked_fill(torch.arange(s.shape[-1], device=s.device) >= seen[:1].long(), float("-inf"))

    def sparse(self) -> bool:
        return self.n_select() < self.kv.n

    def scores(self, q1: torch.Tensor) -> torch.Tensor:
        """Estimated q.k [B, Hkv, n] fp32 from the labels, for q1 [B, Hq, D]."""
        return self.label_scores(q1, self.kv.n)

    def label_scores(self, q1: torch.Tensor, n: int, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B, Hkv, n] of the first n label rows (with seen, on the Triton path, rows >= seen -inf)."""
        if self.triton:
            from kvbench.kernels.score_triton import label_scores

            return label_scores(q1, self.channels, self.labels, self.meta, self.bits, n, seen)
        meta = None if self.meta is None else self.meta[:, :, :n]
        return label_scores_ref(q1, self.labels[:, :, :n], self.channels, meta, self.bits)

    def select_rows(self, q1: torch.Tensor) -> torch.Tensor:
        if self.triton:
            return self.top(self.scores(q1), self.n_select())
        return self.scores(q1).topk(self.n_select(), dim=-1, sorted=False).indices  # the set matters, not its order

    def info(self):
        return {"impl": "triton" if self.triton else "torch", "selected": self.n_select(), "channels": self.r,
                "label_bits": self.bits, "calibration": self.m.calibration or "prompt", **self.topk_info()}

    def sparse_bytes(self) -> int:
        B, H, D = self.labels.shape[0], self.spec.n_kv_heads, self.spec.head_dim
        per_token = self.labels.shape[3] * self.labels.element_size() + (0 if self.meta is None else 4)
        return B * H * (self.kv.n * per_token + self.n_select() * 2 * D * self.kv.k.element_size())
