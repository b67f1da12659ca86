"""kivi: 2- or 4-bit asymmetric quantization of the KV cache, keys per channel and values per token, with the most
recent tokens kept in full precision; decode attention runs on the packed words."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kvbench.api import KVBenchError, LayerCache, LayerSpec, Method, ParamError, param
from kvbench import attention
from kvbench.attention import dense_attention
from kvbench.kernels import kivi_ref
from kvbench.registry import register


@register
@dataclass(frozen=True)
class Kivi(Method):
    """kivi: quantize keys per channel and values per token to 2 or 4 bits, keeping a full-precision residual.

    Based on KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (Liu et al., ICML 2024),
    https://arxiv.org/abs/2402.02750. Keys are quantized per channel over groups of `group` tokens, values per token
    over groups of `group` channels, asymmetrically (scale = (max - min) / (2^bits - 1), zero point = min, fp16
    each). The key residual grows to `residual` tokens and is then quantized as one block; values leave the residual
    one per step, so exactly `residual` stay in full precision. Prefill attention is dense over the full-precision
    prompt; decode attention reads the packed words (a Triton kernel on CUDA, its PyTorch reference elsewhere).

    Parameters
    ----------
    bits : int, default 2
        Bits per quantized element: 2 (KIVI-2) or 4 (KIVI-4; the authors advise it for GQA models).
    group : int, default 32
        Tokens per key quantization group and channels per value group; a power of two dividing the head dim.
    residual : int, default 128
        Recent tokens kept in full precision; a multiple of `group`.
    impl : str, default "auto"
        Decode attention: "triton" (the packed-data kernel), "torch" (the reference: dequantize, then dense
        attention) or "auto" (triton on CUDA, torch elsewhere).
    """

    name = "kivi"
    family = "quantization"
    bits: int = param(2, "bits per quantized key/value element", choices=(2, 4))
    group: int = param(32, "tokens per key group and channels per value group", valid="a power of two >= 1")
    residual: int = param(128, "recent tokens kept in full precision", valid="a positive multiple of group")
    impl: str = param("auto", "decode attention: triton kernel, torch reference, or auto (triton on CUDA)",
                       choices=("auto", "triton", "torch"))

    def validate(self) -> None:
        if self.group < 1 or self.group & (self.group - 1):
            raise ParamError(self.name, "group", self.group, "a power of two >= 1")
        if self.residual < self.group or self.residual % self.group:
            raise ParamError(self.name, "residual", self.residual, f"a positive multiple of group ({self.group})")

    def make_layer(self, spec: LayerSpec) -> LayerCache:
        D = spec.head_dim
        if D % self.group or (D * self.bits) % 32:
            raise KVBenchError(f"kivi: head dim {D} needs to be a multiple of group ({self.group}) and of "
                               f"{32 // self.bits} (codes are packed in 32-bit words); choose another group")
        return KiviLayer(spec, self)


class KiviLayer(LayerCache):
    # not yet: a device-side residual counter and a flush kernel that runs every step (doing nothing on most) would
    # make it capture-safe, as selfindex's planned steps are
    capture_unsafe_reason = ("kivi quantizes its key residual as a block once it is full, a host-side branch, and its "
                             "kernels take the packed and residual lengths as host integers")

    def __init__(self, spec: LayerSpec, method: Kivi):
        self.spec, self.method = spec, method
        self.kv: kivi_ref.PackedKV | None = None
        self.use_triton = self._use_triton(spec.device)
        self.last = "none"

    def _use_triton(self, device: torch.device) -> bool:
        m = self.method
        on_cuda = torch.device(device).type == "cuda"
        if m.impl == "torch" or (m.impl == "auto" and not on_cuda):
            return False
        try:
            from kvbench.kernels import kivi as kernel
        except ImportError as e:
            if m.impl == "triton":
                raise KVBenchError(f"kivi:impl=triton needs the triton package ({e}); pip install triton, or use "
                                   "impl=torch") from None
            return False
        if not kernel.supported(self.spec.head_dim, m.bits, m.group, m.residual):
            if m.impl == "triton":
                raise KVBenchError(f"kivi's Triton kernel needs a power-of-two head dim >= 16 and group <= 128 "
                                   f"(got head dim {self.spec.head_dim}, group {m.group}); use impl=torch")
            return False
        if not on_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise KVBenchError("kivi:impl=triton runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1); "
                               "use impl=torch or auto")
        return True

    def prefill(self, q, k, v):
        m = self.method
        B, H, _, D = k.shape
        self.kv = kivi_ref.PackedKV.empty(B, H, D, k.dtype, k.device, m.bits, m.group, m.residual)
        self.kv.append(k, v)
        out = dense_attention(q, k, v, causal=True)  # the prompt attends in full precision, as in the authors' code
        self.last = attention.last_backend
        return out

    def extend(self, q, k, v):
        if q.shape[2] == 1 and self.use_triton:  # a decode step: attention on the packed words, then a fused write
            from kvbench.kernels import kivi as kernel

            out = kernel.decode_attention(q, self.kv, k, v)
            kernel.append_one(self.kv, k, v)
            self.last = "triton"
            return out
        # a question chunk, or the reference: dequantize, then dense attention
        out = kivi_ref.attention_ref(q, self.kv, k, v)
        self.kv.append(k, v)
        self.last = "torch"
        return out

    def nbytes(self) -> int:
        return self.kv.nbytes() if self.kv is not None else 0

    def seq_len(self) -> int:
        return self.kv.n if self.kv is not None else 0

    def info(self):
        return {"backend": self.last}

    def decode_fns(self, q):
        if not self.use_triton:
            return {"attention": lambda: kivi_ref.attention_ref(q, self.kv)}
        from kvbench.kernels import kivi as kernel

        dec = kernel.Decoder(q, self.kv)
        return {"attention": dec, "split": dec.split, "combine": dec.combine}

    def decode_bytes(self) -> int:
        return self.kv.read_bytes()
