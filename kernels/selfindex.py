"""Self-indexing 1-bit VQ cache: the operations, each as a PyTorch reference and, on CUDA tensors, a CUDA kernel.

The references are the specification: every CUDA kernel in csrc/selfindex.cu is tested against the function of the
same name here. Layouts (per batch b, KV head h; T = positions, D = head_dim, G = D/4 sign groups):

    signs   [B, Hkv, cap, D/8]  uint8   bit c of token t = (k_t,c - mu_c) > 0, at byte c//8, bit c%8; so the 4-bit
                                        code of group g (channels 4g..4g+3) is nibble g: low nibble of byte g//2 for
                                        even g, high for odd g
    kmag    [B, Hkv, cap, D/4]  uint8   2-bit code of |k_c - mu_c| / chmax_c, 4 channels a byte (bits 2j..2j+1)
    kscale  [B, Hkv, cap, D/32, 2] fp16 (scale, zero) of those magnitudes per 32-channel group
    vq      [B, Hkv, cap, D/4]  uint8   2-bit code of v_c
    vscale  [B, Hkv, cap, D/32, 2] fp16 (scale, zero) of v per 32-channel group
    cb      [B, Hkv, G, 16, 4]  fp32    codebook: mean centred 4-channel key piece per sign code

Selection scores each selectable token with an 8-bit lookup table (LUT8[g, c] = round(q_g . cb[g, c] / s), one scale s
per (b, h)), so a token's score is an integer in [-127 G, 127 G], and top-k runs as a one-pass histogram select over
NBINS = 2048 bins of that integer (bin = (score + 127 G) >> shift). Tokens are ranked by bin; ties inside the threshold
bin are taken in any order. The integer LUT is what makes an exact one-pass select possible; tests measure what it
costs in recall against the float LUT and against exact q.k.
"""

from __future__ import annotations

import functools
import math

import torch

NBINS = 2048
EXCLUDED = 0xFFFF  # bin value written for tokens excluded from selection (the CUDA scratch holds uint16)
QGROUP = 32  # channels per quantization group for the 2-bit magnitudes and values


# ------------------------------------------------------------------------------------------------------------------
# small helpers shared by the reference and the tests


def n_groups(head_dim: int) -> int:
    return head_dim // 4


def bin_shift(head_dim: int) -> int:
    """Right shift that maps integer scores [-127 G, 127 G] into NBINS bins."""
    span = 254 * n_groups(head_dim) + 1
    return max(0, math.ceil(math.log2(span / NBINS)))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[..., D] bool -> [..., D/8] uint8, bit c at byte c//8, bit c%8."""
    w = (1 << torch.arange(8, device=bits.device, dtype=torch.int32))
    return (bits.reshape(*bits.shape[:-1], -1, 8).to(torch.int32) * w).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """[..., D/8] uint8 -> [..., D] bool."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    return ((packed.to(torch.int32)[..., None] >> shifts) & 1).bool().flatten(-2)


def sign_codes(signs: torch.Tensor) -> torch.Tensor:
    """Packed signs [..., D/8] uint8 -> 4-bit group codes [..., G] int64 (nibble g of the packed bytes)."""
    b = signs.to(torch.int64)
    return torch.stack([b & 15, b >> 4], dim=-1).flatten(-2)


def pack2(codes: torch.Tensor) -> torch.Tensor:
    """[..., D] 2-bit codes -> [..., D/4] uint8, channel c at byte c//4, bits 2(c%4)."""
    w = torch.tensor([1, 4, 16, 64], device=codes.device, dtype=torch.int32)
    return (codes.reshape(*codes.shape[:-1], -1, 4).to(torch.int32) * w).sum(-1).to(torch.uint8)


def unpack2(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([0, 2, 4, 6], device=packed.device, dtype=torch.int32)
    return ((packed.to(torch.int32)[..., None] >> shifts) & 3).flatten(-2)


def quant2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 2-bit quantization per 32-channel group: x [..., D] float32 -> (packed [..., D/4] uint8,
    scale_zero [..., D/32, 2] fp16). The codes use the fp16-rounded scale and zero that are stored."""
    g = x.reshape(*x.shape[:-1], x.shape[-1] // QGROUP, QGROUP)
    mn, mx = g.amin(-1), g.amax(-1)
    scale = ((mx - mn) / 3).half().float()
    zero = mn.half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((g - zero[..., None]) / safe[..., None]).clamp_(0, 3)
    q = torch.where(scale[..., None] > 0, q, torch.zeros_like(q))
    return pack2(q.flatten(-2)), torch.stack([scale, zero], -1).half()


def dequant2(packed: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    """Inverse of quant2: -> [..., D] float32."""
    q = unpack2(packed).float()
    q = q.reshape(*q.shape[:-1], q.shape[-1] // QGROUP, QGROUP)
    sz = scale_zero.float()
    return (sz[..., 0:1] * q + sz[..., 1:2]).flatten(-2)


# ------------------------------------------------------------------------------------------------------------------
# reference ops


def centre_stats(k: torch.Tensor, centre: str) -> torch.Tensor:
    """Per-channel centre of the prompt's keys: k [B, Hkv, T, D] -> mu [B, Hkv, D] float32 (lower median or mean)."""
    if centre == "mean":
        return k.float().mean(2)
    # the median of bf16/fp16 values is one of them: take it in the input dtype, over a contiguous last dim, which is
    # 5x faster on the GPU than over the strided token dim in float32 (measured on an H100, 32K tokens)
    return k.transpose(2, 3).contiguous().median(dim=-1).values.float()


def pack_ref(k: torch.Tensor, v: torch.Tensor, mu: torch.Tensor, inv_chmax: torch.Tensor | None):
    """Centre, sign bits and (when inv_chmax is given) the 2-bit key magnitudes and values of a chunk.

    k, v [B, Hkv, T, D]; mu, inv_chmax [B, Hkv, D] float32.
    Returns signs [B, Hkv, T, D/8] and, for 2+1, (kmag, kscale, vq, vscale) else None.
    """
    kc = k.float() - mu[:, :, None]
    signs = pack_bits(kc > 0)
    if inv_chmax is None:
        return signs, None
    kmag, kscale = quant2(kc.abs() * inv_chmax[:, :, None])
    vq, vscale = quant2(v.float())
    return signs, (kmag, kscale, vq, vscale)


def codebook_ref(k: torch.Tensor, mu: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Centroid of the prompt's centred 4-channel key pieces per sign code: -> cb [B, Hkv, G, 16, 4] float32.

    A code no token used gets its sign pattern scaled by the group's mean |k| (never NaN)."""
    B, H, T, D = k.shape
    G = D // 4
    kc = (k.float() - mu[:, :, None]).reshape(B, H, T, G, 4)
    onehot = torch.nn.functional.one_hot(sign_codes(signs), 16).float()  # [B, H, T, G, 16]
    sums = torch.einsum("bhtgc,bhtgj->bhgcj", onehot, kc)  # [B, H, G, 16, 4]
    return finish_codebook(sums, onehot.sum(2), kc.abs().sum(dim=(2, 4)), T)


def finish_codebook(sums: torch.Tensor, counts: torch.Tensor, abs_sum: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Centroids from per-code sums [B, H, G, 16, 4], counts [B, H, G, 16] and per-group sums of |k| [B, H, G]."""
    dev = sums.device
    bits = ((torch.arange(16, device=dev)[:, None] >> torch.arange(4, device=dev)) & 1).float()
    pattern = 2 * bits - 1  # [16, 4]: the sign pattern a code stands for
    fallback = (abs_sum / (4 * n_tokens))[..., None, None] * pattern
    counts = counts.float()
    return torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], fallback)


def lut8_ref(qm: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """LUT[g, c] = qm_g . cb[g, c], quantized to int8 with one scale per (b, h): qm [B, Hkv, D] -> [B, Hkv, G, 16]."""
    B, H, D = qm.shape
    lut = (cb * qm.reshape(B, H, D // 4, 1, 4)).sum(-1)
    s = lut.abs().amax(dim=(2, 3), keepdim=True) / 127
    q = torch.where(s > 0, torch.round(lut / torch.where(s > 0, s, torch.ones_like(s))), torch.zeros_like(lut))
    return q.clamp_(-127, 127).to(torch.int32)


def score_bins_ref(lut8: torch.Tensor, signs: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Histogram bin of each token's LUT score: lut8 [B, Hkv, G, 16], signs [B, Hkv, N, D/8] -> bins [B, Hkv, N]
    int32 (EXCLUDED where `excluded` [B, Hkv, N] is true)."""
    G = lut8.shape[2]
    codes = sign_codes(signs)  # [B, H, N, G]
    per_group = torch.gather(lut8[:, :, None].expand(-1, -1, codes.shape[2], -1, -1), 4, codes[..., None])
    score = per_group.squeeze(-1).sum(-1)
    bins = (score + 127 * G) >> bin_shift(4 * G)
    if excluded is not None:
        bins = torch.where(excluded, torch.full_like(bins, EXCLUDED), bins)
    return bins


def select_ref(bins: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k tokens by bin (ties in any order): bins [B, Hkv, N] -> indices [B, Hkv, k] int64 into N."""
    key = torch.where(bins == EXCLUDED, torch.full_like(bins, -1), bins)
    return key.topk(k, dim=-1, sorted=False).indices


def attend_ref(q: torch.Tensor, fk: torch.Tensor, fv: torch.Tensor, fvalid: torch.Tensor | None,
               keys: torch.Tensor, values: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Exact softmax attention of one query per head over a full-precision set and selected tokens.

    q [B, Hq, D]; fk/fv [B, Hkv, F, D] full-precision set, fvalid [B, Hkv, F] which of its slots hold a token (None:
    all); keys/values [B, Hkv, K, D] selected tokens, already dequantized; key_bias [B, Hq] added to the selected
    tokens' scores (q . mu for centred 2+1 keys). Scale 1/sqrt(D). Returns [B, Hq, D] float32.
    """
    B, Hq, D = q.shape
    Hkv, F = fk.shape[1], fk.shape[2]
    g = Hq // Hkv
    qf = q.float().reshape(B, Hkv, g, D) * D**-0.5
    s_f = torch.einsum("bhgd,bhfd->bhgf", qf, fk.float())
    if fvalid is not None:
        s_f = s_f.masked_fill(~fvalid[:, :, None], float("-inf"))
    s_k = torch.einsum("bhgd,bhkd->bhgk", qf, keys.float())
    if key_bias is not None:
        s_k = s_k + key_bias.reshape(B, Hkv, g, 1) * D**-0.5
    p = torch.softmax(torch.cat([s_f, s_k], -1), -1)
    out = torch.einsum("bhgf,bhfd->bhgd", p[..., :F], fv.float())
    out = out + torch.einsum("bhgk,bhkd->bhgd", p[..., F:], values.float())
    return out.reshape(B, Hq, D)


# ------------------------------------------------------------------------------------------------------------------
# CUDA kernels (csrc/selfindex.cu), used by methods/selfindex.py on CUDA tensors


@functools.cache
def cuda_ops():
    from kvbench.kernels import jit

    return jit.load("kvbench_selfindex", "selfindex.cu", "selfindex_binding.cpp")


N_COUNTERS = 8  # int32 counters per (b, h), see csrc/selfindex.h
FUSED_K = 256  # the fused decode kernel serves steps that select 1..FUSED_K tokens (csrc/selfindex.h kFusedK)
FUSED_CHUNK = 16384  # tokens a fused block scores at most
# The fused one-launch kernel is exact (GPU parity tests) but slower than the split path on an H100: its single-block
# tail (merge + attention) is latency-bound (2026-11-22: 65.7 vs 47.7 us at 32K x 8, 117 vs 101 us at 128K x 8,
# benchmarks/selfindex_paths.py). Kept, tested and benchmarked; off by default.
FUSED = False


class Workspace:
    """Scratch shared by every layer on one device (layers run one after another on one stream): the histogram and
    counters are zero between calls (the kernels reset them), the rest is overwritten every step. It is not part of
    any cache's nbytes(); the allocator's view in the memory suite sees it."""

    _per_device: dict = {}

    def __init__(self, device):
        self.device = device
        self.hist = self.ctr = self.bins = self.part_o = self.part_ml = self.cand = self.cand_n = None
        self.bh = 0

    @classmethod
    def get(cls, device) -> "Workspace":
        device = torch.device(device)
        if device.index is None:
            device = torch.device(device.type, torch.cuda.current_device())
        if device not in cls._per_device:
            cls._per_device[device] = cls(device)
        return cls._per_device[device]

    def select_buffers(self, bh: int, cap: int):
        if bh > self.bh:
            self.hist = torch.zeros(bh * NBINS, dtype=torch.int32, device=self.device)
            self.ctr = torch.zeros(bh * N_COUNTERS, dtype=torch.int32, device=self.device)
            self.bh = bh
        stride = -(-cap // 8) * 8  # rows start 16-byte aligned: the select kernel reads 8 bins at a time
        if self.bins is None or self.bins.numel() < bh * stride:
            self.bins = torch.empty(bh * stride, dtype=torch.int16, device=self.device)
        return self.bins, self.hist, self.ctr

    def candidates(self, bh: int, n: int, device):
        """Candidate buffers for the fused kernel: at most one block per 2048 tokens, and no more than a full GPU
        (8 blocks of 256 threads per SM) unless a block would exceed FUSED_CHUNK tokens."""
        blocks = max(-(-n // FUSED_CHUNK), min(-(-8 * sm_count(device) // bh), -(-n // 2048)), 1)
        if self.cand_n is None or self.cand_n.numel() < bh * blocks:
            self.cand_n = torch.empty(bh * blocks, dtype=torch.int32, device=self.device)
            self.cand = torch.empty(bh * blocks * FUSED_K, dtype=torch.int32, device=self.device)
        return self.cand[: bh * blocks * FUSED_K], self.cand_n[: bh * blocks]

    def partials(self, rows: int, head_dim: int):
        if self.part_o is None or self.part_o.numel() < rows * head_dim:
            self.part_o = torch.empty(rows * head_dim, dtype=torch.float32, device=self.device)
            self.part_ml = torch.empty(rows * 2, dtype=torch.float32, device=self.device)
        return self.part_o, self.part_ml


@functools.cache
def sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def attend_split(n: int, bh: int, device) -> int:
    """Tokens per attention block, a multiple of the 32-token tile: at most 256 (a block walks its tiles one after
    another, so long lists need many blocks), and at least two blocks per SM in all when there is enough work."""
    per_bh = max(1, min(-(-n // 32), max(-(-2 * sm_count(device) // bh), -(-n // 256))))
    return 32 * -(-(-(-n // per_bh)) // 32)
