"""Self-indexing 1-bit VQ cache: the operations, each as a PyTorch reference and, on CUDA tensors, a GPU kernel, and
IndexedKV, the storage of one layer that runs each operation on one or the other.

The references are the specification: every CUDA kernel in csrc/selfindex.cu (pack, append, score-and-select) and the
Triton attention in selfindex_attend.py is tested against the function of the same name here. Layouts (per batch b,
KV head h; T = positions, D = head_dim, G = D/4 sign groups):

    signs   [B, Hkv, cap, D/8]  uint8   bit c of token t = (k_t,c - mu_c) > 0, at byte c//8, bit c%8; so the 4-bit
                                        code of group g (channels 4g..4g+3) is nibble g: low nibble of byte g//2 for
                                        even g, high for odd g
    kmag    [B, Hkv, cap, D/4]  uint8   2-bit code of |k_c - mu_c| / chmax_c, 4 channels a byte (bits 2j..2j+1)
    kscale  [B, Hkv, cap, D/32, 2] fp16 (scale, zero) of those magnitudes per 32-channel group
    vq      [B, Hkv, cap, D/4]  uint8   2-bit code of v_c
    vscale  [B, Hkv, cap, D/32, 2] fp16 (scale, zero) of v per 32-channel group
            (kmag, vq, kscale and vscale are views of one [B, Hkv, cap, 3D/4] byte buffer, q2_buffers: a token's
            2-bit storage is one row of whole 32-byte sectors, so the sparse attention's gather of a selected token
            reads one run of bytes instead of four scattered pieces)
    cb      [B, Hkv, G, 16, 4]  fp32    codebook: mean centred 4-channel key piece per sign code

Selection scores each selectable token with an 8-bit lookup table (LUT8[g, c] = round(q_g . cb[g, c] / s), one scale s
per (b, h)), so a token's score is an integer in [-127 G, 127 G], and top-k runs as a one-pass histogram select over
NBINS = 2048 bins of that integer (bin = (score + 127 G) >> shift). Tokens are ranked by bin; the CUDA select takes
the ties inside the threshold bin lowest position first and lists the tokens in position order (above the threshold
bin, then from it), so it is deterministic; the reference's topk breaks ties its own way. The integer LUT is what
makes an exact one-pass select possible; tests measure what it costs in recall against the float LUT and against
exact q.k.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from kvbench.attention import gather_rows

NBINS = 2048
EXCLUDED = 0xFFFF  # bin value written for tokens excluded from selection (the CUDA scratch holds uint16)
QGROUP = 32  # channels per quantization group for the 2-bit magnitudes and values


# ------------------------------------------------------------------------------------------------------------------
# small helpers shared by the reference and the tests


def q2_buffers(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """kmag, vq [B, H, cap, D/4] uint8 and kscale, vscale [B, H, cap, D/32, 2] fp16 as views of rows [B, H, cap,
    3D/4] uint8, in this order within a row (every part aligned for the kernels' 8- and 16-byte loads)."""
    D = rows.shape[-1] * 4 // 3
    c, s = D // 4, D // 8
    scales = lambda o: rows[..., o: o + s].view(torch.float16).unflatten(-1, (D // 32, 2))  # noqa: E731
    return {"kmag": rows[..., :c], "vq": rows[..., c: 2 * c], "kscale": scales(2 * c), "vscale": scales(2 * c + s)}


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


def compressed_chmax(k: torch.Tensor, mu: torch.Tensor, lo: int, hi: int, kept: torch.Tensor | None = None):
    """The 2+1 key normaliser: per-channel max |k - mu| over the compressed prompt tokens, positions [lo, hi) less
    `kept` [B, Hkv, n] (full-precision ones among them), as the paper's code takes it; over every prompt token when
    none is compressed (kept positions are distinct: fewer of them than [lo, hi) holds leaves one compressed).
    k [B, Hkv, T, D] -> [B, Hkv, D] float32, at least 1e-6. A large-norm sink token, kept in full precision anyway,
    so no longer stretches the 2-bit scale of the tokens that are compressed."""
    n_kept = 0 if kept is None else kept.shape[2]
    if hi - lo <= n_kept:  # nothing compressed (a short prompt under fixed=scored): an empty max would be 0, then inf
        lo, hi, kept = 0, k.shape[2], None
    part = k[:, :, lo:hi]
    if kept is not None and kept.numel():
        # a kept token must not set the max: give it the centre (|k - mu| = 0); the copy is one sequence's range
        part = part.clone()
        rel = (kept - lo).clamp(0, hi - lo - 1)
        inside = ((kept >= lo) & (kept < hi))[..., None]
        cur = part.gather(2, rel[..., None].expand(-1, -1, -1, k.shape[3]))
        centre = mu[:, :, None].to(k.dtype).expand_as(cur)
        part.scatter_(2, rel[..., None].expand_as(cur), torch.where(inside, centre, cur))
    # max |k - mu| per channel sits at the channel's min or max: no float copy of k; identical to
    # (k.float() - mu).abs().amax(2) since rounding is monotonic
    lo_k, hi_k = torch.aminmax(part, dim=2)
    return torch.maximum(hi_k.float() - mu, mu - lo_k.float()).clamp_(min=1e-6)


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
    kc = (k.float() - mu[:, :, None]).reshape(B, H, T * G, 4)
    # each token's piece g adds to slot 16 g + its code: a scatter, not a one-hot product (5x faster on the CPU)
    slot = (sign_codes(signs) + 16 * torch.arange(G, device=k.device)).reshape(B, H, T * G)
    sums = torch.zeros(B, H, G * 16, 4, device=k.device).scatter_add_(2, slot[..., None].expand(-1, -1, -1, 4), kc)
    counts = torch.zeros(B, H, G * 16, device=k.device).scatter_add_(2, slot, torch.ones_like(kc[..., 0]))
    abs_sum = kc.view(B, H, T, G, 4).abs().sum(dim=(2, 4))
    return finish_codebook(sums.view(B, H, G, 16, 4), counts.view(B, H, G, 16), abs_sum, T)


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
    return bins_of_scores(per_group.squeeze(-1).sum(-1), G, excluded)


def bins_of_scores(score: torch.Tensor, G: int, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Integer LUT scores [B, Hkv, N] of G groups -> their histogram bins (EXCLUDED where `excluded`)."""
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
# CUDA kernels (csrc/selfindex.cu) and the storage that runs them (or the references above)


@functools.cache
def cuda_ops():
    from kvbench.kernels import jit

    return jit.load("kvbench_selfindex", "selfindex.cu", "selfindex_binding.cpp")


N_COUNTERS = 8  # int32 counters per (b, h), see csrc/selfindex.h
SELECT_BLOCKS = 0  # score/select blocks per (b, h); 0: the launcher sizes one wave (selfindex_dev.py sweeps it)
# 1: score, threshold, count and place in one launch (csrc/selfindex.cu: select_kernel) where the grid fits in one
# wave, else 3: score, count and place kernels (the earlier path); KVBENCH_SELFINDEX_SELECT picks one for a run
# default 3: the one-launch path was only ~2 us faster (32K x 1, H200) and its GPU parity run timed out: opt in
SELECT_LAUNCHES = int(os.environ.get("KVBENCH_SELFINDEX_SELECT", "3"))
if SELECT_LAUNCHES not in (1, 3):
    raise ValueError(f"KVBENCH_SELFINDEX_SELECT={SELECT_LAUNCHES}: 1 or 3")
MAX_CHUNKS = 1024  # csrc/selfindex.h: kMaxChunks
PLAN = 5  # csrc/selfindex.h: a step plan is (pos, slot, old, hi, k)
class Workspace:
    """Scratch shared by every layer on one device (layers run one after another on one stream): the histogram and
    counters are zero between calls (the kernels reset them), the rest is overwritten every step. It is not part of
    any cache's nbytes(); the allocator's view in the memory suite sees it."""

    _per_device: dict = {}

    def __init__(self, device):
        self.device = device
        self.hist = self.ctr = self.bins = self.part_o = self.part_ml = self.counts = None
        self.bh = 0

    @classmethod
    def get(cls, device) -> "Workspace":
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
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

    def chunk_counts(self, bh: int) -> torch.Tensor:
        """Per-chunk counts of the deterministic select (csrc/selfindex.h: counts), [bh, kMaxChunks, 2] int32."""
        if self.counts is None or self.counts.numel() < bh * MAX_CHUNKS * 2:
            self.counts = torch.zeros(bh * MAX_CHUNKS * 2, dtype=torch.int32, device=self.device)
        return self.counts

    def partials(self, rows: int, head_dim: int):
        """Split-KV partial outputs [rows, head_dim] and (m, l) or lse per row, float32."""
        if self.part_o is None or self.part_o.numel() < rows * head_dim:
            self.part_o = torch.empty(rows * head_dim, dtype=torch.float32, device=self.device)
            self.part_ml = torch.empty(rows * 2, dtype=torch.float32, device=self.device)
        return self.part_o[: rows * head_dim].view(rows, head_dim), self.part_ml


class IndexedKV:
    """One layer's selfindex storage (the layouts above) and the operations on it, on CUDA kernels or on the
    PyTorch reference, chosen once at construction (`cuda`).

    Per-token buffers [B, H, cap, ...] are indexed by position and grow in steps; the full-precision set fk/fv
    [B, H, F, D] holds F slots, fpos [B, H, F] the position in each (-1: empty); excl [B, H, cap/8] is the bitmap
    of positions excluded from selection (the scored fixed tokens), or None."""

    def __init__(self, B: int, H: int, D: int, dtype: torch.dtype, device, *, quantized: bool, n_full: int,
                 exclusions: bool, cuda: bool):
        self.quantized, self.cuda, self.dtype, self.D = quantized, cuda, dtype, D
        self.n = 0  # positions stored
        self.cap = 0
        self.signs = self.kmag = self.kscale = self.vq = self.vscale = self.kfull = self.vfull = None
        self.q2rows = None  # owns kmag, kscale, vq and vscale (q2_buffers)
        self.mu = self.chmax = self.inv_chmax = self.cb = None
        self.excl = torch.zeros(B, H, 0, dtype=torch.uint8, device=device) if exclusions else None
        self.plan_table = self.plan = self.plan_step = self.idx_buf = self.out_buf = None  # planned steps (pin)
        self.fk = torch.zeros(B, H, n_full, D, dtype=dtype, device=device)
        self.fv = torch.zeros(B, H, n_full, D, dtype=dtype, device=device)
        self.fpos = torch.full((B, H, n_full), -1, dtype=torch.int64, device=device)
        # the CPU reference's working copy of positions [w_lo, w_hi) of the selectable range (_working): each one's
        # group codes as offsets into the flattened LUT, and (2+1) its centred key and value dequantized, in float32
        self.w_off = self.w_k = self.w_v = None
        self.w_lo = self.w_hi = 0

    PER_TOKEN = ("signs", "kmag", "kscale", "vq", "vscale", "kfull", "vfull")

    def tensors(self) -> list[torch.Tensor]:
        names = self.PER_TOKEN + ("mu", "chmax", "inv_chmax", "cb", "fk", "fv", "fpos", "excl", "plan_table", "plan",
                                  "plan_step", "idx_buf")
        return [t for t in (getattr(self, n) for n in names) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors()) if self.n else 0

    def reserve(self, cap: int) -> None:
        """Room for `cap` positions (at least), keeping what the first self.n hold; grows in steps of >= 1/8."""
        if cap <= self.cap:
            return
        if self.cap:
            cap = max(cap, self.cap + max(256, self.cap // 8))
        B, H, _, D = self.fk.shape
        shapes = {"signs": ((D // 8,), torch.uint8)}
        if self.quantized:
            shapes |= {"q2rows": ((3 * D // 4,), torch.uint8)}
        else:
            shapes |= {"kfull": ((D,), self.dtype), "vfull": ((D,), self.dtype)}
        for name, (tail, dtype) in shapes.items():
            buf = torch.zeros(B, H, cap, *tail, dtype=dtype, device=self.fk.device)
            old = getattr(self, name)
            if old is not None and self.n:
                buf[:, :, : self.n] = old[:, :, : self.n]
            setattr(self, name, buf)
        if self.quantized:
            for name, view in q2_buffers(self.q2rows).items():
                setattr(self, name, view)
        if self.excl is not None:
            excl = torch.zeros(B, H, (cap + 7) // 8, dtype=torch.uint8, device=self.fk.device)
            excl[:, :, : self.excl.shape[2]] = self.excl
            self.excl = excl
        self.cap = cap

    def pack_prompt(self, k: torch.Tensor, v: torch.Tensor, centre: str, quant_lo: int, quant_hi: int,
                    kept: torch.Tensor | None = None) -> None:
        """The prompt k, v [B, H, T, D]: per-channel centre (and max |k - mu| for 2+1), sign bits of every token,
        2-bit storage of positions [quant_lo, quant_hi), the codebook. Transient memory: per sequence, not per batch.
        `kept` [B, H, n]: positions inside [quant_lo, quant_hi) that stay in full precision (scored fixed tokens)."""
        B, H, T, D = k.shape
        self.w_off = self.w_k = self.w_v = None  # a new prompt: the working copy starts again
        self.mu = torch.cat([centre_stats(k[b : b + 1], centre) for b in range(B)])  # [B, H, D] float32
        if self.quantized:
            self.chmax = torch.cat([compressed_chmax(k[b : b + 1], self.mu[b : b + 1], quant_lo, quant_hi,
                                                     None if kept is None else kept[b : b + 1]) for b in range(B)])
            self.inv_chmax = 1.0 / self.chmax
        self.reserve(T)
        if not self.quantized:
            self.kfull[:, :, :T] = k
            self.vfull[:, :, :T] = v
        if self.cuda:
            G = D // 4
            sums = torch.zeros(B, H, G, 16, 4, device=k.device)
            counts = torch.zeros(B, H, G, 16, dtype=torch.int32, device=k.device)
            abs_sum = torch.zeros(B, H, G, device=k.device)
            cuda_ops().pack(k, v, self.mu, self.inv_chmax, self.signs, self.kmag, self.kscale, self.vq, self.vscale,
                            sums, counts, abs_sum, 0, quant_lo, quant_hi)
            self.cb = finish_codebook(sums, counts, abs_sum, T)
        else:
            signs, q2 = pack_ref(k, v, self.mu, self.inv_chmax)
            self.signs[:, :, :T] = signs
            if q2 is not None and quant_hi > quant_lo:
                for name, t in zip(("kmag", "kscale", "vq", "vscale"), q2):
                    getattr(self, name)[:, :, quant_lo:quant_hi] = t[:, :, quant_lo:quant_hi]
            self.cb = codebook_ref(k, self.mu, signs)
        self.n = T

    def put_full(self, slots: torch.Tensor | slice, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Full-precision slots `slots` hold positions pos [B, H, n] (or [n]) with keys/values k, v [B, H, n, D]."""
        self.fk[:, :, slots] = k
        self.fv[:, :, slots] = v
        self.fpos[:, :, slots] = pos

    def exclude(self, pos: torch.Tensor) -> None:
        """Mark positions pos [B, H, n] as never selected."""
        bits = unpack_bits(self.excl).scatter_(2, pos, True)
        self.excl = pack_bits(bits)

    def append(self, k1: torch.Tensor, v1: torch.Tensor, slot: int, old: int) -> None:
        """Append position n (k1, v1 [B, H, D]) into full-precision slot `slot`; the position `old` that held it
        (-1: none) is stored in 2 bits from that slot (2+1)."""
        p = self.n
        self.reserve(p + 1)
        old = old if self.quantized else -1
        if self.cuda:
            cuda_ops().append(k1, v1, self.mu, self.inv_chmax, self.signs, self.kmag, self.kscale, self.vq,
                              self.vscale, self.kfull, self.vfull, self.fk, self.fv, self.fpos, p, slot, old, None)
        else:
            signs, _ = pack_ref(k1[:, :, None], v1[:, :, None], self.mu, None)
            self.signs[:, :, p] = signs[:, :, 0]
            if not self.quantized:
                self.kfull[:, :, p] = k1
                self.vfull[:, :, p] = v1
            elif old >= 0:
                _, q2 = pack_ref(self.fk[:, :, slot, None], self.fv[:, :, slot, None], self.mu, self.inv_chmax)
                for name, t in zip(("kmag", "kscale", "vq", "vscale"), q2):
                    getattr(self, name)[:, :, old] = t[:, :, 0]
            self.put_full(slot, p, k1, v1)
        self.n = p + 1

    def select(self, q: torch.Tensor, lo: int, hi: int, K: int) -> torch.Tensor:
        """The K positions of [lo, hi) the GQA-mean of q [B, Hq, D] picks: [B, H, K] (int32 on CUDA, else int64)."""
        B, Hq, D = q.shape
        H = self.fk.shape[1]
        if self.cuda:
            idx = torch.empty(B, H, K, dtype=torch.int32, device=q.device)
            if K:
                ws = Workspace.get(q.device)
                bins, hist, ctr = ws.select_buffers(B * H, self.cap)
                cuda_ops().score_select(q, self.cb, self.signs, self.excl, lo, hi, K, bins, hist, ctr, idx,
                                        SELECT_BLOCKS, ws.chunk_counts(B * H), None, SELECT_LAUNCHES)
            return idx
        if K == 0:
            return torch.zeros(B, H, 0, dtype=torch.int64, device=q.device)
        qm = q.float().reshape(B, H, Hq // H, D).mean(2)
        excluded = unpack_bits(self.excl)[:, :, lo:hi] if self.excl is not None else None
        lut8 = lut8_ref(qm, self.cb)
        if self._working(lo, hi):  # score_bins_ref's sums, from the codes converted once
            score = lut8.flatten(2).gather(2, self.w_off[:, :, lo:hi].flatten(2)).view(B, H, hi - lo, -1).sum(-1)
            bins = bins_of_scores(score, lut8.shape[2], excluded)
        else:
            bins = score_bins_ref(lut8, self.signs[:, :, lo:hi], excluded)
        return select_ref(bins, K) + lo

    def _working(self, lo: int, hi: int) -> bool:
        """Bring the CPU working copy up to positions [lo, hi) of the selectable range; False where there is none (on
        CUDA, or a range that does not start where it did). Positions are final once selectable (their 2 bits were
        written when they left the window, their signs when they arrived), so each decode step converts only the one
        that became selectable: on the 135M model at 4K tokens the per-step unpacking of every position's signs and
        of the selected ones' 2 bits was most of selfindex's CPU decode step."""
        if self.cuda or hi <= lo:
            return False
        if self.w_off is None or self.w_lo != lo or self.w_off.shape[2] < self.cap:
            self._grow_working(lo)
        a, D = self.w_hi, self.D
        if hi > a:
            codes = sign_codes(self.signs[:, :, a:hi])  # [B, H, n, G]
            self.w_off[:, :, a:hi] = codes + 16 * torch.arange(codes.shape[-1])
            if self.quantized:
                sgn = unpack_bits(self.signs[:, :, a:hi]).float() * 2 - 1
                self.w_k[:, :, a:hi] = sgn * dequant2(self.kmag[:, :, a:hi], self.kscale[:, :, a:hi]) * self.chmax[
                    :, :, None]
                self.w_v[:, :, a:hi] = dequant2(self.vq[:, :, a:hi], self.vscale[:, :, a:hi])
            self.w_hi = hi
        return True

    def _grow_working(self, lo: int) -> None:
        """Working buffers for self.cap positions, keeping the rows converted so far where they still apply."""
        B, H, _, D = self.fk.shape
        keep = self.w_off is not None and self.w_lo == lo
        off = torch.empty(B, H, self.cap, D // 4, dtype=torch.int64)
        k, v = ((torch.empty(B, H, self.cap, D) for _ in range(2)) if self.quantized else (None, None))
        if keep:
            a, b = lo, self.w_hi
            off[:, :, a:b] = self.w_off[:, :, a:b]
            if self.quantized:
                k[:, :, a:b], v[:, :, a:b] = self.w_k[:, :, a:b], self.w_v[:, :, a:b]
        else:
            self.w_lo = self.w_hi = lo
        self.w_off, self.w_k, self.w_v = off, k, v

    def attend(self, q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Exact attention of q [B, Hq, D] over the full-precision set and the positions idx [B, H, K]: [B, Hq, D]."""
        if self.cuda:
            from kvbench.kernels import selfindex_attend

            return selfindex_attend.attend(q, self, idx)
        B, Hq, D = q.shape
        H = self.fk.shape[1]
        i = idx.long()[..., None]
        if self.quantized and self.w_k is not None and idx.numel() and self.w_lo <= idx.min() and idx.max() < self.w_hi:
            keys, values = gather_rows(self.w_k, idx), gather_rows(self.w_v, idx)  # the same values as below
            bias = torch.einsum("bhgd,bhd->bhg", q.float().reshape(B, H, Hq // H, D), self.mu).reshape(B, Hq)
        elif self.quantized:
            sgn = unpack_bits(torch.gather(self.signs, 2, i.expand(-1, -1, -1, D // 8))).float() * 2 - 1
            mag = dequant2(torch.gather(self.kmag, 2, i.expand(-1, -1, -1, D // 4)),
                           torch.gather(self.kscale, 2, i[..., None].expand(-1, -1, -1, D // 32, 2)))
            keys = sgn * mag * self.chmax[:, :, None]  # centred keys: their scores lack q . mu
            values = dequant2(torch.gather(self.vq, 2, i.expand(-1, -1, -1, D // 4)),
                              torch.gather(self.vscale, 2, i[..., None].expand(-1, -1, -1, D // 32, 2)))
            bias = torch.einsum("bhgd,bhd->bhg", q.float().reshape(B, H, Hq // H, D), self.mu).reshape(B, Hq)
        else:
            keys = torch.gather(self.kfull, 2, i.expand(-1, -1, -1, D))
            values = torch.gather(self.vfull, 2, i.expand(-1, -1, -1, D))
            bias = None
        return attend_ref(q, self.fk, self.fv, self.fpos >= 0, keys, values, bias).to(q.dtype)

    # --- planned steps (capture-safe decode on CUDA): the host values of each step made at reserve() ---

    def pin(self, rows: list[tuple[int, int, int, int, int]], lo: int, n_heads: int) -> None:
        """Room and scratch for len(rows) planned one-token steps: rows[i] = (pos, slot, old, hi, k) of step i (the
        step plan of csrc/selfindex.h), lo the start of the selectable range. Every buffer a planned step touches is
        made here, so planned_step() neither allocates nor reads anything back; the launches never change."""
        self.reserve(max(r[0] for r in rows) + 1)
        dev = self.fk.device
        B, H, _, D = self.fk.shape
        self.plan_table = torch.tensor(rows, dtype=torch.int32, device=dev).view(len(rows), PLAN)
        self.plan = torch.zeros(8, dtype=torch.int32, device=dev)  # the current row (8: 32-byte aligned)
        self.plan_step = torch.zeros(1, dtype=torch.int32, device=dev)
        self.plan_lo, self.k_max, self.hi_max = lo, max(r[4] for r in rows), max(r[3] for r in rows)
        self.idx_buf = torch.zeros(B, H, max(1, self.k_max), dtype=torch.int32, device=dev)
        self.out_buf = torch.empty(B, n_heads, D, dtype=self.dtype, device=dev)
        ws = Workspace.get(dev)
        ws.select_buffers(B * H, self.cap), ws.chunk_counts(B * H)
        from kvbench.kernels import selfindex_attend

        selfindex_attend.scratch(B, n_heads, H, D, self.idx_buf.shape[2], self.cap, dev,
                                 cuda=selfindex_attend.cuda_path(self.quantized, n_heads // H, D, dev))

    def unpin(self) -> None:
        self.plan_table = self.plan = self.plan_step = self.idx_buf = self.out_buf = None

    @property
    def pinned(self) -> bool:
        return self.plan_table is not None

    def planned_step(self, q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next planned step on the device: its plan row, the append, the selection into idx_buf and the
        attention of q [B, Hq, D] -> (out [B, Hq, D], idx_buf [B, H, k_max], of which the row's k are live). Host
        counters are the caller's (it knows whether a graph is being captured)."""
        from kvbench.kernels import selfindex_attend

        selfindex_attend.next_plan(self.plan_table, self.plan_step, self.plan)
        cuda_ops().append(k1, v1, self.mu, self.inv_chmax, self.signs, self.kmag, self.kscale, self.vq, self.vscale,
                          self.kfull, self.vfull, self.fk, self.fv, self.fpos, 0, 0, -1, self.plan)
        B, H = self.fk.shape[:2]
        if self.k_max:
            ws = Workspace.get(q.device)
            bins, hist, ctr = ws.select_buffers(B * H, self.cap)
            cuda_ops().score_select(q, self.cb, self.signs, self.excl, self.plan_lo, self.hi_max, self.k_max, bins,
                                    hist, ctr, self.idx_buf, SELECT_BLOCKS, ws.chunk_counts(B * H), self.plan,
                                    SELECT_LAUNCHES)
        out = selfindex_attend.attend(q, self, self.idx_buf, nsel=self.plan[4:5], out=self.out_buf)
        return out, self.idx_buf

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored position as keys/values [B, H, n, D] in the model dtype: exact where full precision is
        kept, reconstructed from 2 bits elsewhere (2+1)."""
        n, D, dt = self.n, self.D, self.dtype
        if not self.quantized:
            return self.kfull[:, :, :n], self.vfull[:, :, :n]
        sgn = unpack_bits(self.signs[:, :, :n]).float() * 2 - 1
        keys = (sgn * dequant2(self.kmag[:, :, :n], self.kscale[:, :, :n]) * self.chmax[:, :, None]
                + self.mu[:, :, None]).to(dt)
        values = dequant2(self.vq[:, :, :n], self.vscale[:, :, :n]).to(dt)
        valid = self.fpos[0, 0] >= 0  # the full-precision set overrides (every (b, h) fills the same slots)
        pos = self.fpos[:, :, valid]
        idx = pos[..., None].expand(-1, -1, -1, D)
        keys.scatter_(2, idx, self.fk[:, :, valid])
        values.scatter_(2, idx, self.fv[:, :, valid])
        return keys, values
