"""kivi: 2- or 4-bit asymmetric quantization of the KV cache, keys per channel and values per token, with the most
recent tokens kept in full precision; decode attention runs on the packed words."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kvbench.api import KVBenchError, LayerCache, LayerSpec, Method, ParamError, ReservedRoomError, capturing, param
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
    prompt; decode attention reads the packed words (on CUDA a CUDA kernel over the packed tokens where its shapes
    allow, Triton for the residual and the rest; its PyTorch reference elsewhere).

    Parameters
    ----------
    bits : int, default 2
        Bits per quantized element: 2 (KIVI-2) or 4 (KIVI-4; the authors advise it for GQA models).
    group : int, default 32
        Tokens per key quantization group and channels per value group; a power of two dividing the head dim.
    residual : int, default 128
        Recent tokens kept in full precision; a multiple of `group`.
    impl : str, default "auto"
        Decode attention: "triton" (the packed-data kernels: CUDA over the packed tokens where
        kernels.kivi.cuda_path() allows, else Triton; KVBENCH_KIVI_ATTEND=triton forces Triton), "torch" (the
        reference: dequantize, then dense attention) or "auto" (triton on CUDA, torch elsewhere).
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
    """Capture-safe with the Triton kernels (kivi_ref.PackedKV pinned by reserve()): the length lives in a device
    counter, the decode kernel's ranges are planned for the reserved length, and one write kernel packs the value
    leaving the residual and, every R steps, the completed key block, deciding on the device."""

    capture_unsafe_reason = ("kivi's PyTorch path (impl=torch, or no CUDA) dequantizes the cache and quantizes its key "
                             "residual with host-side branches at every step")

    def __init__(self, spec: LayerSpec, method: Kivi):
        self.spec, self.method = spec, method
        self.kv: kivi_ref.PackedKV | None = None
        self.use_triton = self._use_triton(spec.device)
        self.last = "none"
        self.pin = None  # after reserve(): the Decoder over the pinned cache, planned for `room` tokens
        self.room = 0

    @property
    def capture_safe(self) -> bool:
        return self.use_triton

    def reserve(self, n_new: int) -> None:
        if not self.use_triton:
            raise KVBenchError(f"kivi is not capture-safe here: {self.capture_unsafe_reason}")
        if self.kv is None:
            raise ReservedRoomError("kivi: reserve() before prefill", 0, n_new, 0)
        from kvbench.kernels import kivi as kernel

        kv, R = self.kv, self.kv.residual
        self.room = kv.n + n_new
        kv.reserve(self.room // R * R, max(0, self.room - R))  # every buffer at its final size: no step allocates
        kv.ndev = torch.full((1,), kv.n, dtype=torch.int32, device=kv.rk.device)
        s = self.spec
        q = torch.zeros(kv.rk.shape[0], s.n_heads, 1, s.head_dim, dtype=kv.rk.dtype, device=kv.rk.device)
        self.pin = kernel.Decoder(q, kv, max_tokens=self.room)

    def advance(self, n: int) -> None:
        if self.pin is None:
            raise KVBenchError("kivi: advance() needs reserve() first")
        if self.kv.n + n > self.room:
            raise ReservedRoomError("kivi", self.kv.n, n, self.room)
        self.kv.n += n

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
        self.pin, self.room = None, 0
        self.kv = kivi_ref.PackedKV.empty(B, H, D, k.dtype, k.device, m.bits, m.group, m.residual)
        self.kv.append(k, v)
        out = dense_attention(q, k, v, causal=True)  # the prompt attends in full precision, as in the authors' code
        self.last = attention.last_backend
        return out

    def extend(self, q, k, v):
        if self.pin is not None:
            return self._extend_pinned(q, k, v)
        if q.shape[2] == 1 and self.use_triton:  # a decode step: attention on the packed words, then a fused write
            from kvbench.kernels import kivi as kernel

            out = kernel.decode_attention(q, self.kv, k, v)
            kernel.append_one(self.kv, k, v)
            self.last = _packed_backend(kernel.cuda_path(q, self.kv))
            return out
        # a question chunk, or the reference: dequantize, then dense attention
        out = kivi_ref.attention_ref(q, self.kv, k, v)
        self.kv.append(k, v)
        self.last = "torch"
        return out

    def _extend_pinned(self, q, k, v):
        """A step of a reserved run: no allocation, no host sync (the room is checked first, outside a capture; a
        graph's replays are checked by advance()). A chunk of T > 1 tokens takes the eager path within the room."""
        from kvbench.kernels import kivi as kernel

        if q.shape[2] == 1:
            if not capturing(q):
                self.advance(1)
            out = self.pin.step(q, k, v)  # attends before the token is written, as the plain path does
            kernel.append_pinned(self.kv, k, v)
            self.last = _packed_backend(self.pin.cuda)
            return out
        if self.kv.n + k.shape[2] > self.room:
            raise ReservedRoomError("kivi", self.kv.n, k.shape[2], self.room)
        out = kivi_ref.attention_ref(q, self.kv, k, v)
        self.kv.append(k, v)  # within the reserved capacity: no buffer moves, so the pinned Decoder stays valid
        self.kv.ndev.fill_(self.kv.n)
        self.last = "torch"
        return out

    def nbytes(self) -> int:
        if self.kv is None:
            return 0
        return self.kv.nbytes() + (4 if self.kv.ndev is not None else 0)

    def seq_len(self) -> int:
        return self.kv.n if self.kv is not None else 0

    def info(self):
        return {"backend": self.last, "pinned": self.pin is not None}

    def decode_fns(self, q):
        if not self.use_triton:
            return {"attention": lambda: kivi_ref.attention_ref(q, self.kv)}
        from kvbench.kernels import kivi as kernel

        dec = kernel.Decoder(q, self.kv)
        fns = {"attention": dec, "split": dec.split, "combine": dec.combine}
        if dec.cuda:  # split's two launches: the CUDA kernel over the packed tokens, Triton's over the residual
            fns.update(packed=dec.packed, tail=dec.tail)
        return fns

    def decode_bytes(self) -> int:
        return self.kv.read_bytes()


def _packed_backend(cuda: bool) -> str:
    """What info()'s backend says of a step on the packed words: the CUDA kernel over the packed tokens with Triton's
    over the residual, or Triton's for both (kernels/kivi.py, cuda_path)."""
    return "cuda+triton" if cuda else "triton"
