"""qjl: keys as the sign bits of a random Johnson-Lindenstrauss projection plus their norms; attention scores by the
unbiased inner-product estimator; values quantized per token; the most recent tokens kept in full precision."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.api import KVBenchError, LayerCache, LayerSpec, Method, ParamError, param
from kvbench.attention import dense_attention
from kvbench.kernels import kivi_ref
from kvbench.registry import register

VALUE_GROUP = 32  # channels per value quantization group, as the authors' runs


@register
@dataclass(frozen=True)
class QJL(Method):
    """qjl: 1-bit quantized JL keys, outlier channels sketched apart; q.k estimated from the keys' sign bits.

    Based on QJL: 1-Bit Quantized JL Transform for KV Cache Quantization with Zero Overhead (Zandieh et al., 2024),
    https://arxiv.org/abs/2406.03482, and its code (github.com/amirzandieh/QJL; defaults of run_longbench.py). With S
    a D x m projection (Gaussian, orthogonalized in blocks of D columns and scaled by sqrt(D), as their sketch does),
    the keys are quantized in groups of `group` tokens per KV head. In each group the `outliers` channels of largest
    norm over the group's keys are set apart (their indices, uint8, are stored per group): a key k splits into its
    outlier part k_o (those channels) and the rest k_i. k_i is stored as sign(k_i S) (m bits) with its norm, k_o as
    sign(k_o S') with S' the first `outlier_bits` columns of S, and its norm (fp16 norms). A query's score is
    sqrt(pi / 2) / m * ||k_i|| * <q_i S, sign(k_i S)> + sqrt(pi / 2) / m' * ||k_o|| * <q_o S', sign(k_o S')>, with
    q_i, q_o the query at the group's inlier and outlier channels; each term is unbiased for its part of q.k (q_o is
    zero on k_i's channels, so <q_i, k_i> = <q, k_i>), and the outliers, which would dominate ||k||, no longer scale
    the noise of the rest. Values are quantized per token to `value_bits` in groups of 32 channels (KIVI's asymmetric
    scheme, kernels/kivi_ref.py). The newest tokens stay in full precision: the buffer grows to `buffer` tokens and
    is then quantized as one block. The first `initial_layers` layers use `initial_bits` sketch bits and
    `initial_outlier_bits` outlier bits. Prefill attends in full precision.

    Where it differs, and why: the authors store the whole key's norm and derive the inlier norm from it; here both
    norms are stored (the same two fp16 per key) so no square root of a rounded difference is taken. kvbench's
    selfindex keeps 1-bit signs too, of the centred keys themselves rather than of a projection, and uses them to
    select tokens; qjl attends every token with its estimated score. On CUDA a decode step is one split-KV Triton
    kernel and a merge (kernels/qjl_attend.py): scores from the sign bits, online softmax, P.V over the values
    dequantized in registers, the buffer attended exactly; elsewhere (and for multi-token extends) PyTorch.

    Not capture-safe (decodes eagerly under the graph runner, which records why): the step that fills the buffer
    quantizes it as a block, so the quantized part grows by `buffer` tokens at data-dependent steps (a shape change and
    an allocation), and whether a step quantizes is a host-side decision. A capture-safe version would preallocate the
    quantized buffers for the reserved room and quantize the block on the device every step, writing it only when full.

    Parameters
    ----------
    bits : int, default 256
        Sketch dimension m: sign bits per key (a multiple of 8, >= 16).
    initial_bits : int, default 512
        Sketch bits in the first `initial_layers` layers.
    initial_layers : int, default 15
        Layers that use `initial_bits`.
    outliers : int, default 8
        Outlier channels per group of tokens, sketched apart (0: one sketch of the whole key).
    outlier_bits : int, default 256
        Sign bits of the outlier part (a multiple of 8; more than the layer's sketch bits are cut to them).
    initial_outlier_bits : int, default 128
        Outlier sign bits in the first `initial_layers` layers (cut to `initial_bits` likewise).
    group : int, default 32
        Tokens per outlier group (`buffer` is a multiple of it).
    value_bits : int, default 2
        Bits per value element (2 or 4), per token over groups of 32 channels.
    buffer : int, default 128
        Newest tokens kept in full precision before they are quantized as a block.
    seed : int, default 42
        Seed of the projection.
    impl : str, default "auto"
        Scores: "triton" (the kernel), "torch" (the reference) or "auto" (triton on CUDA, torch elsewhere).
    """

    name = "qjl"
    family = "quantization"
    bits: int = param(256, "sketch bits per key", valid="a multiple of 8, >= 16")
    initial_bits: int = param(512, "sketch bits per key in the first layers", valid="a multiple of 8, >= 16")
    initial_layers: int = param(15, "layers that use initial_bits", ge=0)
    outliers: int = param(8, "outlier channels per group of tokens, sketched apart (0: none)", ge=0, le=255)
    outlier_bits: int = param(256, "sign bits of the outlier part", valid="a multiple of 8, >= 8")
    initial_outlier_bits: int = param(128, "outlier sign bits in the first layers",
                                      valid="a multiple of 8, >= 8")
    group: int = param(32, "tokens per outlier group", ge=1)
    value_bits: int = param(2, "bits per value element", choices=(2, 4))
    buffer: int = param(128, "newest tokens kept in full precision", ge=1)
    seed: int = param(42, "seed of the projection", ge=0)
    impl: str = param("auto", "scores: triton kernel, torch reference, or auto (triton on CUDA)",
                      choices=("auto", "triton", "torch"))

    def validate(self) -> None:
        for name in ("bits", "initial_bits"):
            value = getattr(self, name)
            if value < 16 or value % 8:
                raise ParamError(self.name, name, value, "a multiple of 8, >= 16")
        for name in ("outlier_bits", "initial_outlier_bits"):
            value = getattr(self, name)
            if value < 8 or value % 8:
                raise ParamError(self.name, name, value, "a multiple of 8, >= 8")
        if self.buffer % self.group:
            raise ParamError(self.name, "buffer", self.buffer, f"a multiple of group ({self.group})")

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        if self.outliers > spec.head_dim:
            raise KVBenchError(f"qjl: outliers={self.outliers} exceeds the head dim {spec.head_dim}; use at most that")
        if spec.head_dim % VALUE_GROUP:
            raise KVBenchError(f"qjl: head dim {spec.head_dim} needs to be a multiple of {VALUE_GROUP} (the value "
                               "quantization group)")
        return QJLLayer(spec, self)


def sketch(D: int, m: int, seed: int, device) -> torch.Tensor:
    """The projection [D, m] fp32: Gaussian, each block of D columns orthogonalized (QR), times sqrt(D)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(D, m, generator=g)
    blocks = [torch.linalg.qr(s[:, i : i + D])[0] for i in range(0, m, D)]
    return (torch.cat(blocks, -1) * math.sqrt(D)).to(device)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """x [..., m] -> uint8 [..., m / 8]: bit i of byte j is x[..., 8 j + i] > 0."""
    bits = (x > 0).unflatten(-1, (-1, 8)).to(torch.int32)
    return (bits << torch.arange(8, device=x.device, dtype=torch.int32)).sum(-1).to(torch.uint8)  # disjoint bits


def unpack_signs(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., m / 8] -> +1 / -1 float32 [..., m]."""
    bits = (b[..., None] >> torch.arange(8, device=b.device, dtype=torch.uint8)) & 1
    return bits.flatten(-2).float() * 2 - 1


def scores_ref(q: torch.Tensor, proj: torch.Tensor, signs: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """The reference estimator without outliers: q [B, Hq, Tq, D], proj [D, m], signs [B, Hkv, N, m / 8], norms
    [B, Hkv, N] -> estimated q.k [B, Hq, Tq, N] fp32."""
    B, Hq, Tq, D = q.shape
    H, m = signs.shape[1], proj.shape[1]
    qs = (q.float() @ proj).reshape(B, H, Hq // H * Tq, m)
    est = qs @ unpack_signs(signs).transpose(-1, -2) * (math.sqrt(math.pi / 2) / m) * norms.float()[:, :, None]
    return est.view(B, Hq, Tq, -1)


def outlier_masks(idx: torch.Tensor, D: int) -> torch.Tensor:
    """Outlier channel indices [B, Hkv, G, o] -> fp32 0/1 masks [B, Hkv, G, D]."""
    mask = torch.zeros(*idx.shape[:3], D, device=idx.device)
    return mask.scatter_(3, idx.long(), 1.0)


def outlier_scores_ref(q: torch.Tensor, proj: torch.Tensor, keys: "OutlierKeys") -> torch.Tensor:
    """The reference estimator with outliers: q [B, Hq, Tq, D] over keys quantized in groups -> [B, Hq, Tq, N] fp32:
    sqrt(pi / 2) / m ||k_i|| <q_i S, s_i> + sqrt(pi / 2) / m' ||k_o|| <q_o S', s_o> per token."""
    B, Hq, Tq, D = q.shape
    H, G, _ = keys.idx.shape[1:]
    m, mo = proj.shape[1], keys.out_signs.shape[-1] * 8
    n = keys.norms.shape[2] // max(G, 1)  # tokens per group
    qf = q.float().reshape(B, H, 1, Hq // H * Tq, D)
    q_out = qf * outlier_masks(keys.idx, D)[:, :, :, None]  # [B, Hkv, G, g Tq, D]: the query at each group's outliers
    qs, qs_out = qf @ proj, q_out @ proj  # [B, Hkv, 1 or G, g Tq, m]
    s_in = unpack_signs(keys.signs).view(B, H, G, n, m)
    s_out = unpack_signs(keys.out_signs).view(B, H, G, n, mo)
    c = math.sqrt(math.pi / 2)
    est = ((qs - qs_out) @ s_in.transpose(-1, -2)) * (c / m) * keys.norms.float().view(B, H, G, 1, n)
    est = est + (qs_out[..., :mo] @ s_out.transpose(-1, -2)) * (c / mo) * keys.out_norms.float().view(B, H, G, 1, n)
    return est.permute(0, 1, 3, 2, 4).reshape(B, Hq, Tq, G * n)


@dataclass
class OutlierKeys:
    """Keys quantized with their outliers apart, N = G groups of tokens: idx uint8 [B, Hkv, G, o] (outlier channels),
    signs [B, Hkv, N, m / 8] and norms fp16 [B, Hkv, N] of the inlier part, out_signs [B, Hkv, N, m' / 8] and
    out_norms of the outlier part."""

    idx: torch.Tensor
    signs: torch.Tensor
    norms: torch.Tensor
    out_signs: torch.Tensor
    out_norms: torch.Tensor


def quantize_keys(k: torch.Tensor, proj: torch.Tensor, n_outliers: int, group: int, out_bits: int) -> OutlierKeys:
    """k [B, Hkv, T, D] (T a multiple of group) -> its OutlierKeys."""
    B, H, T, D = k.shape
    kg = k.float().view(B, H, T // group, group, D)
    idx = kg.norm(dim=3).topk(n_outliers, dim=-1).indices.to(torch.uint8)  # [B, Hkv, G, o]: largest-norm channels
    k_out = kg * outlier_masks(idx, D)[:, :, :, None]
    k_in = (kg - k_out).view(B, H, T, D)
    k_out = k_out.view(B, H, T, D)
    return OutlierKeys(idx, pack_signs(k_in @ proj), k_in.norm(dim=-1).half(), pack_signs(k_out @ proj[:, :out_bits]),
                       k_out.norm(dim=-1).half())


class QJLLayer(LayerCache):
    """Quantized tokens [0, nq): the keys as OutlierKeys (or, with outliers=0, signs uint8 [B, Hkv, nq, m / 8] and
    norms fp16 [B, Hkv, nq]), value codes int32 [B, Hkv, nq, W] with scale and min fp16 [B, Hkv, nq, D / 32]; the
    buffer rk, rv [B, Hkv, n - nq, D]."""

    def __init__(self, spec: LayerSpec, m: QJL):
        from kvbench.kernels.score_triton import use_triton

        self.spec, self.m = spec, m
        initial = spec.layer_idx < m.initial_layers
        self.sketch_bits = m.initial_bits if initial else m.bits
        out_bits = m.initial_outlier_bits if initial else m.outlier_bits
        self.outlier_bits = min(out_bits, self.sketch_bits) if m.outliers else 0  # S' is the first columns of S
        self.proj = sketch(spec.head_dim, self.sketch_bits, m.seed, spec.device)
        self.triton = use_triton(m.name, m.impl, spec.device)
        if self.triton:
            from kvbench.kernels.qjl_attend import supported

            self.triton = supported(spec.head_dim, self.sketch_bits, self.outlier_bits or self.sketch_bits,
                                    m.outliers if self.outlier_bits else 0, m.group, m.value_bits)
        self.keys: OutlierKeys | None = None
        self.signs = self.norms = self.vq = self.vs = self.vm = self.rk = self.rv = None
        self.nq = 0

    def _quantize(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v [B, Hkv, T, D] (T a multiple of the group) to the quantized tokens."""
        new = dict(zip(("vq", "vs", "vm"), kivi_ref.quantize_values(v, self.m.value_bits, VALUE_GROUP)))
        if self.outlier_bits:
            keys = quantize_keys(k, self.proj, self.m.outliers, self.m.group, self.outlier_bits)
            old = self.keys
            self.keys = keys if old is None else OutlierKeys(
                *(torch.cat([getattr(old, f), getattr(keys, f)], 2) for f in OutlierKeys.__dataclass_fields__))
        else:
            new.update(signs=pack_signs(k.float() @ self.proj), norms=k.float().norm(dim=-1).half())
        for name, t in new.items():
            old = getattr(self, name)
            setattr(self, name, t if old is None else torch.cat([old, t], 2))
        self.nq += k.shape[2]

    def _buffer(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add k, v to the full-precision buffer; quantize it block by block once it holds `buffer` tokens."""
        self.rk, self.rv = torch.cat([self.rk, k], 2), torch.cat([self.rv, v], 2)
        R = self.m.buffer
        while self.rk.shape[2] >= R:
            self._quantize(self.rk[:, :, :R], self.rv[:, :, :R])
            self.rk, self.rv = self.rk[:, :, R:].clone(), self.rv[:, :, R:].clone()

    def prefill(self, q, k, v):
        out = dense_attention(q, k, v, causal=True)  # the prompt attends in full precision
        self.rk, self.rv = k[:, :, :0], v[:, :, :0]
        self.keys = self.signs = self.norms = self.vq = self.vs = self.vm = None
        self.nq = 0
        self._buffer(k, v)
        if self.vq is None:  # a prompt shorter than the buffer: empty quantized buffers
            self._quantize(k[:, :, :0], v[:, :, :0])
        return out

    def estimate(self, q: torch.Tensor) -> torch.Tensor:
        """Estimated q.k over the quantized tokens: q [B, Hq, Tq, D] -> [B, Hq, Tq, nq] fp32."""
        if self.triton and q.shape[2] == 1:
            from kvbench.kernels.qjl_attend import qjl_scores

            return qjl_scores(q[:, :, 0], self.proj, self.keys, self.signs, self.norms)[:, :, None]
        if self.keys is not None:
            return outlier_scores_ref(q, self.proj, self.keys)
        return scores_ref(q, self.proj, self.signs, self.norms)

    def attention(self, q: torch.Tensor, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None):
        """q [B, Hq, Tq, D] (the last Tq positions) over the quantized tokens, the buffer and k_new/v_new."""
        B, Hq, Tq, D = q.shape
        H = self.spec.n_kv_heads
        rk, rv = self.rk, self.rv
        if k_new is not None:
            rk, rv = torch.cat([rk, k_new], 2), torch.cat([rv, v_new], 2)
        if self.triton and Tq == 1:
            from kvbench.kernels.qjl_attend import qjl_attention

            return qjl_attention(q[:, :, 0], self.proj, self.keys, self.signs, self.norms, self.vq, self.vs, self.vm,
                                 self.m.value_bits, rk, rv).to(q.dtype)
        exact = q.float().reshape(B, H, -1, D) @ rk.float().transpose(-1, -2)  # [B, Hkv, g * Tq, M]
        M = rk.shape[2]
        causal = torch.arange(M, device=q.device) > torch.arange(M - Tq, M, device=q.device)[:, None]  # [Tq, M]
        exact = exact.view(B, Hq, Tq, M).masked_fill(causal, float("-inf"))
        logits = torch.cat([self.estimate(q), exact], -1) * D**-0.5
        p = logits.softmax(-1).view(B, H, -1, self.nq + M)
        values = kivi_ref.dequantize_values(self.vq, self.vs, self.vm, self.nq, self.m.value_bits, VALUE_GROUP)
        out = p[..., : self.nq] @ values + p[..., self.nq :] @ rv.float()
        return out.view(B, Hq, Tq, D).to(q.dtype)

    def extend(self, q, k, v):
        out = self.attention(q, k, v)
        self._buffer(k, v)
        return out

    def _tensors(self) -> list[torch.Tensor]:
        keys = [self.signs, self.norms] if self.keys is None else list(vars(self.keys).values())
        return keys + [self.vq, self.vs, self.vm, self.rk, self.rv, self.proj]

    def nbytes(self) -> int:
        return 0 if self.rk is None else sum(t.numel() * t.element_size() for t in self._tensors())

    def seq_len(self) -> int:
        return 0 if self.rk is None else self.nq + self.rk.shape[2]

    def info(self):
        return {"impl": "triton" if self.triton else "torch", "sketch_bits": self.sketch_bits,
                "outlier_bits": self.outlier_bits, "quantized": self.nq,
                "buffer": 0 if self.rk is None else self.rk.shape[2]}

    def decode_fns(self, q):
        return {"attention": lambda: self.attention(q), "score": lambda: self.estimate(q)}

    def decode_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())
