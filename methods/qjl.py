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
    """qjl: 1-bit quantized JL keys; q.k estimated from the query's projection and the keys' sign bits.

    Based on QJL: 1-Bit Quantized JL Transform for KV Cache Quantization with Zero Overhead (Zandieh et al., 2024),
    https://arxiv.org/abs/2406.03482, and its code (github.com/amirzandieh/QJL; defaults of run_longbench.py). With S
    a D x m projection (Gaussian, orthogonalized in blocks of D columns and scaled by sqrt(D), as their sketch does),
    a key is stored as sign(k S) (m bits) and its norm (fp16); a query's score is
    sqrt(pi / 2) / m * ||k|| * <q S, sign(k S)>, unbiased for q.k with a Gaussian S. Values are quantized per token to
    `value_bits` in groups of 32 channels (KIVI's asymmetric scheme, kernels/kivi_ref.py). The newest tokens stay in
    full precision: the buffer grows to `buffer` tokens and is then quantized as one block. The first
    `initial_layers` layers use `initial_bits` sketch bits. Prefill attends in full precision.

    Where it differs, and why: the authors also sketch, per group of 32 tokens, the 8 channels of largest norm apart
    (outliers) with their own norms; not implemented here (one sketch per key), which makes the estimate noisier on
    keys with outlier channels. kvbench's selfindex keeps 1-bit signs too, of the centred keys themselves rather than
    of a projection, and uses them to select tokens; qjl attends every token with its estimated score. On CUDA the
    estimator runs as a Triton kernel (kernels/score_triton.py, sign_rowdot); the softmax and P.V over dequantized
    values are PyTorch.

    Parameters
    ----------
    bits : int, default 256
        Sketch dimension m: sign bits per key (a multiple of 8, >= 16).
    initial_bits : int, default 512
        Sketch bits in the first `initial_layers` layers.
    initial_layers : int, default 15
        Layers that use `initial_bits`.
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

    def make_layer(self, spec: LayerSpec) -> LayerCache:
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
    """The reference estimator: q [B, Hq, Tq, D], proj [D, m], signs [B, Hkv, N, m / 8], norms [B, Hkv, N] ->
    estimated q.k [B, Hq, Tq, N] fp32."""
    B, Hq, Tq, D = q.shape
    H, m = signs.shape[1], proj.shape[1]
    qs = (q.float() @ proj).reshape(B, H, Hq // H * Tq, m)
    est = qs @ unpack_signs(signs).transpose(-1, -2) * (math.sqrt(math.pi / 2) / m) * norms.float()[:, :, None]
    return est.view(B, Hq, Tq, -1)


class QJLLayer(LayerCache):
    """Quantized tokens [0, nq): signs uint8 [B, Hkv, nq, m / 8], norms fp16 [B, Hkv, nq], value codes int32
    [B, Hkv, nq, W] with scale and min fp16 [B, Hkv, nq, D / 32]; the buffer rk, rv [B, Hkv, n - nq, D]."""

    def __init__(self, spec: LayerSpec, m: QJL):
        from kvbench.kernels.score_triton import use_triton

        self.spec, self.m = spec, m
        self.sketch_bits = m.initial_bits if spec.layer_idx < m.initial_layers else m.bits
        self.proj = sketch(spec.head_dim, self.sketch_bits, m.seed, spec.device)
        self.triton = use_triton(m.name, m.impl, spec.device)
        self.signs = self.norms = self.vq = self.vs = self.vm = self.rk = self.rv = None
        self.nq = 0

    def _quantize(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v [B, Hkv, T, D] to the quantized tokens."""
        signs = pack_signs(k.float() @ self.proj)
        norms = k.float().norm(dim=-1).half()
        vq, vs, vm = kivi_ref.quantize_values(v, self.m.value_bits, VALUE_GROUP)
        new = dict(signs=signs, norms=norms, vq=vq, vs=vs, vm=vm)
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
        self.signs = self.norms = self.vq = self.vs = self.vm = None
        self.nq = 0
        self._buffer(k, v)
        if self.signs is None:  # a prompt shorter than the buffer: empty quantized buffers
            self._quantize(k[:, :, :0], v[:, :, :0])
        return out

    def estimate(self, q: torch.Tensor) -> torch.Tensor:
        """Estimated q.k over the quantized tokens: q [B, Hq, Tq, D] -> [B, Hq, Tq, nq] fp32."""
        if self.triton and q.shape[2] == 1:
            from kvbench.kernels.score_triton import sign_rowdot

            w = q[:, :, 0].float() @ self.proj
            est = sign_rowdot(self.signs, w, self.norms) * (math.sqrt(math.pi / 2) / self.sketch_bits)
            return est[:, :, None]
        return scores_ref(q, self.proj, self.signs, self.norms)

    def attention(self, q: torch.Tensor, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None):
        """q [B, Hq, Tq, D] (the last Tq positions) over the quantized tokens, the buffer and k_new/v_new."""
        B, Hq, Tq, D = q.shape
        H = self.spec.n_kv_heads
        rk, rv = self.rk, self.rv
        if k_new is not None:
            rk, rv = torch.cat([rk, k_new], 2), torch.cat([rv, v_new], 2)
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
        return [self.signs, self.norms, self.vq, self.vs, self.vm, self.rk, self.rv, self.proj]

    def nbytes(self) -> int:
        return 0 if self.rk is None else sum(t.numel() * t.element_size() for t in self._tensors())

    def seq_len(self) -> int:
        return 0 if self.rk is None else self.nq + self.rk.shape[2]

    def info(self):
        return {"impl": "triton" if self.triton else "torch", "sketch_bits": self.sketch_bits,
                "quantized": self.nq, "buffer": 0 if self.rk is None else self.rk.shape[2]}

    def decode_fns(self, q):
        return {"attention": lambda: self.attention(q), "score": lambda: self.estimate(q)}

    def decode_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())
