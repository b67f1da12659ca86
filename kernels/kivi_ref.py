"""KIVI's packed cache layout, how tokens are written into it, and the PyTorch reference of its decode attention.

One layer's cache, for B sequences, H KV heads, head dim D, b bits, group G and residual R (E = 32 / b codes per int32
word, W = D / E words per token; the capacities Ck >= Nk (a multiple of R) and Cv >= Nv (a multiple of 16 rows) grow
in steps so appends rarely copy):

    kq      int32 [B, H, Ck, W]      key codes, one row of W words per token
    ks, km  fp16  [B, H, Ck / G, D]  key scale and zero point (the min), per channel over each group of G tokens
    vq      int32 [B, H, Cv, W]      value codes, same packing
    vs, vm  fp16  [B, H, Cv, D / G]  value scale and min, per token over each group of G channels
    rk, rv  dtype [B, H, R, D]       full-precision ring: token t sits in slot t % R; it holds the last min(T, R) tokens

Word w of a row holds channels w*E .. w*E + E - 1, channel w*E + e in bits [e*b, (e+1)*b) (little-endian), so 16-byte
loads fetch whole rows and unpacking is shifts and masks in registers.

Of T tokens seen, keys [0, Nk) are packed with Nk = R * floor(T / R): the key residual grows to R tokens and is then
quantized as one block (R is a multiple of G). Values [0, Nv) are packed with Nv = max(0, T - R): the oldest value
leaves the residual at every step, so exactly R stay in full precision. The rest is read from the ring. These are the
rules of the authors' code (github.com/jy-yuan/KIVI, models/llama_kivi.py), prefill included; as there, a step attends
before its own token is written, so it sees R + 1 full-precision values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.attention import dense_attention

# rows of headroom added when the packed values outgrow their buffer (at least 1/8 of it), as FullLayer grows
GROW = 256
# packed value rows are allocated in multiples of this, so every head's rows start 64-byte aligned and the kernel's
# vector loads can be proven aligned (Triton specializes integer arguments divisible by 16)
VALUE_ROWS = 16
# elements (B x H x tokens x D) quantized at a time by pack_keys/pack_values: 2^27 elements, ~2.7 GB of intermediates
CHUNK_ELEMENTS = 2**27
# and at most 1/8 of the tensor being packed (but at least this many): ~20 B of intermediates per element of a chunk
# then stay below the 4 B per element that full's own K and V take at 16 bits, at every size, not only the largest
MIN_CHUNK_ELEMENTS = 2**20


def quantize(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uniform quantization of x over `dim` (the group): codes uint8 (x's shape), scale and min fp16 (dim
    kept as size 1). Scale and min are rounded outwards to fp16, so [min, min + (2^b - 1) * scale] still covers the
    group and every element's error stays within scale / 2."""
    x = x.float()
    levels = 2**bits - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    mn = lo.half()
    mn = torch.where(mn.float() > lo, torch.nextafter(mn, torch.full_like(mn, float("-inf"))), mn)
    # divided by a tensor, not the Python int: CUDA torch computes x / scalar as x * fl(1 / scalar). Where x / 15 is
    # exactly an fp16 value (common: bf16/fp16 inputs), x * fl(1/15) lands one fp32 step above it and the outward
    # rounding then takes the next fp16 up, so 4-bit scales on the GPU differed from the CPU's and from the fused
    # writer's div_rn in ~4% of groups (the "fused 4-bit writer bug"); fl(1/3) = (1 + 2^-25) / 3 always rounds back
    want = (hi - mn.float()) / torch.full_like(hi, levels)
    scale = want.half()
    scale = torch.where(scale.float() < want, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    safe = torch.where(scale > 0, scale.float(), 1.0)
    codes = torch.round((x - mn.float()) / safe).clamp_(0, levels).to(torch.uint8)
    return codes, scale, mn


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., D] (values < 2^bits) -> int32 words [..., D * bits / 32], channel w*E + e in bits [e*b, (e+1)*b)."""
    per_word = 32 // bits
    c = codes.unflatten(-1, (codes.shape[-1] // per_word, per_word)).to(torch.int64)
    shifts = torch.arange(0, 32, bits, device=codes.device, dtype=torch.int64)
    words = (c << shifts).sum(-1)  # disjoint bit fields: the sum is an OR
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret as signed 32-bit


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [..., W] -> codes [..., W * 32 / bits] (int32)."""
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    return ((words[..., None] >> shifts) & (2**bits - 1)).flatten(-2)


def quantize_keys(k: torch.Tensor, bits: int, group: int):
    """k [B, H, N, D], N a multiple of group -> (codes int32 [B, H, N, W], scale, min fp16 [B, H, N / group, D])."""
    x = k.unflatten(2, (k.shape[2] // group, group))  # [B, H, N/G, G, D]: per channel over G tokens
    codes, scale, mn = quantize(x, 3, bits)
    return pack(codes.flatten(2, 3), bits), scale.squeeze(3), mn.squeeze(3)


def quantize_values(v: torch.Tensor, bits: int, group: int):
    """v [B, H, N, D] -> (codes int32 [B, H, N, W], scale, min fp16 [B, H, N, D / group])."""
    x = v.unflatten(3, (v.shape[3] // group, group))  # [B, H, N, D/G, G]: per token over G channels
    codes, scale, mn = quantize(x, 4, bits)
    return pack(codes.flatten(3, 4), bits), scale.squeeze(4), mn.squeeze(4)


def dequantize_keys(kq, ks, km, n: int, bits: int, group: int) -> torch.Tensor:
    """The first n packed keys as fp32 [B, H, n, D]."""
    codes = unpack(kq[:, :, :n], bits).float().unflatten(2, (n // group, group))  # [B, H, n/G, G, D]
    g = n // group
    return (codes * ks[:, :, :g, None].float() + km[:, :, :g, None].float()).flatten(2, 3)


def dequantize_values(vq, vs, vm, n: int, bits: int, group: int) -> torch.Tensor:
    """The first n packed values as fp32 [B, H, n, D]."""
    codes = unpack(vq[:, :, :n], bits).float().unflatten(3, (-1, group))  # [B, H, n, D/G, G]
    return (codes * vs[:, :, :n, :, None].float() + vm[:, :, :n, :, None].float()).flatten(3, 4)


def _capacity(cap: int, need: int, unit: int) -> int:
    """Rows to allocate for `need` rows: just `need` the first time (a prefill holds its prompt), later at least
    max(GROW, cap / 8) more; rounded up to a multiple of `unit`."""
    if need <= cap:
        return cap
    new = need if cap == 0 else max(need, cap + max(GROW, cap // 8))
    return -(-new // unit) * unit


def _resized(buf: torch.Tensor, rows: int) -> torch.Tensor:
    """buf [B, H, C, ...] with `rows` >= C rows along dim 2, the first C copied."""
    if rows == buf.shape[2]:
        return buf
    new = buf.new_empty(*buf.shape[:2], rows, *buf.shape[3:])
    new[:, :, : buf.shape[2]] = buf
    return new


@dataclass
class PackedKV:
    """One layer's KIVI cache in the layout above; T = n tokens seen."""

    bits: int
    group: int
    residual: int
    kq: torch.Tensor
    ks: torch.Tensor
    km: torch.Tensor
    vq: torch.Tensor
    vs: torch.Tensor
    vm: torch.Tensor
    rk: torch.Tensor
    rv: torch.Tensor
    n: int = 0
    # a pinned cache (capture-safe decode, methods/kivi.py reserve()): int32 [1], the tokens seen, kept on the device
    # by kernels.kivi.append_pinned; n is its host mirror
    ndev: torch.Tensor | None = None
    # the CPU reference's working copy (dense()): keys [0, dnk) and values [0, dnv) dequantized, in the model dtype,
    # in buffers of room for the ring and a chunk's new tokens after them; not part of the layout (nbytes)
    dk: torch.Tensor | None = None
    dv: torch.Tensor | None = None
    dnk: int = 0
    dnv: int = 0

    @classmethod
    def empty(cls, B: int, H: int, D: int, dtype: torch.dtype, device, bits: int, group: int, residual: int):
        W = D * bits // 32
        i32 = dict(dtype=torch.int32, device=device)
        f16 = dict(dtype=torch.float16, device=device)
        return cls(bits, group, residual,
                   kq=torch.empty(B, H, 0, W, **i32), ks=torch.empty(B, H, 0, D, **f16),
                   km=torch.empty(B, H, 0, D, **f16), vq=torch.empty(B, H, 0, W, **i32),
                   vs=torch.empty(B, H, 0, D // group, **f16), vm=torch.empty(B, H, 0, D // group, **f16),
                   rk=torch.zeros(B, H, residual, D, dtype=dtype, device=device),
                   rv=torch.zeros(B, H, residual, D, dtype=dtype, device=device))

    @property
    def nk(self) -> int:
        """Packed keys: whole blocks of R tokens."""
        return self.n // self.residual * self.residual

    @property
    def nv(self) -> int:
        """Packed values: all but the last R tokens."""
        return max(0, self.n - self.residual)

    def tensors(self) -> list[torch.Tensor]:
        return [self.kq, self.ks, self.km, self.vq, self.vs, self.vm, self.rk, self.rv]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def read_bytes(self) -> int:
        """Bytes one decode step's attention reads: the packed rows and their scales, and the live residual."""
        B, H, _, D = self.rk.shape
        W, es = self.kq.shape[3], self.rk.element_size()
        nk, nv, n = self.nk, self.nv, self.n
        per_head = (nk * W * 4 + nk // self.group * D * 4 + nv * W * 4 + nv * (D // self.group) * 4
                    + ((n - nk) + (n - nv)) * D * es)
        return B * H * per_head

    def _ring_tokens(self, ring: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Tokens [start, end) of the ring (all within the last R tokens): [B, H, end - start, D]."""
        R = self.residual
        a, count = start % R, end - start
        if a + count <= R:
            return ring[:, :, a : a + count]
        return torch.cat([ring[:, :, a:], ring[:, :, : a + count - R]], 2)

    def _tokens(self, ring: torch.Tensor, new: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Full-precision tokens [start, end) from the ring (t < n) and `new` (tokens n, n+1, ...)."""
        parts = []
        if start < self.n:
            parts.append(self._ring_tokens(ring, start, min(end, self.n)))
        if end > self.n:
            parts.append(new[:, :, max(start, self.n) - self.n : end - self.n])
        return parts[0] if len(parts) == 1 else torch.cat(parts, 2)

    def reserve(self, nk: int, nv: int) -> None:
        """Room for nk packed keys and nv packed values (buffers grow in steps; nothing happens when they fit)."""
        G = self.group
        cap = _capacity(self.kq.shape[2], nk, self.residual)
        self.kq, self.ks, self.km = _resized(self.kq, cap), _resized(self.ks, cap // G), _resized(self.km, cap // G)
        cap = _capacity(self.vq.shape[2], nv, VALUE_ROWS)
        self.vq, self.vs, self.vm = _resized(self.vq, cap), _resized(self.vs, cap), _resized(self.vm, cap)

    def _chunk(self, x: torch.Tensor) -> int:
        """Tokens quantized at a time: at most CHUNK_ELEMENTS elements and 1/8 of x (MIN_CHUNK_ELEMENTS at least),
        whole key groups. The quantizer's float and int64 intermediates take ~20 bytes per element, so a 128K x 64
        prefill in one piece needed 10x the memory of the bf16 cache it compresses (a 32 GiB allocation); in chunks
        its transient memory is at most ~2.7 GB, and below what full's own cache takes for the same tokens."""
        B, H, _, D = x.shape
        cap = min(CHUNK_ELEMENTS, max(MIN_CHUNK_ELEMENTS, x.numel() // 8))
        return max(self.group, cap // (B * H * D) // self.group * self.group)

    def pack_keys(self, k: torch.Tensor, start: int) -> None:
        """Quantize keys k [B, H, N, D] of tokens start .. start + N - 1 (whole groups) into their reserved rows."""
        G, step = self.group, self._chunk(k)
        for i in range(0, k.shape[2], step):
            a, b = start + i, start + min(k.shape[2], i + step)
            words, scale, mn = quantize_keys(k[:, :, i : i + step], self.bits, G)
            self.kq[:, :, a:b] = words
            self.ks[:, :, a // G : b // G] = scale
            self.km[:, :, a // G : b // G] = mn

    def pack_values(self, v: torch.Tensor, start: int) -> None:
        """Quantize values v [B, H, N, D] of tokens start .. start + N - 1 into their reserved rows."""
        step = self._chunk(v)
        for i in range(0, v.shape[2], step):
            a, b = start + i, start + min(v.shape[2], i + step)
            words, scale, mn = quantize_values(v[:, :, i : i + step], self.bits, self.group)
            self.vq[:, :, a:b] = words
            self.vs[:, :, a:b] = scale
            self.vm[:, :, a:b] = mn

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write tokens n .. n + T - 1 (k, v [B, H, T, D]): quantize the keys of every completed block of R tokens and
        the values that leave the last R, then put the newest min(n + T, R) tokens in the ring."""
        T, R = k.shape[2], self.residual
        nk, nv = self.nk, self.nv
        end = self.n + T
        nk2, nv2 = end // R * R, max(0, end - R)
        self.reserve(nk2, nv2)
        if nk2 > nk:
            self.pack_keys(self._tokens(self.rk, k, nk, nk2), nk)
        if nv2 > nv:
            self.pack_values(self._tokens(self.rv, v, nv, nv2), nv)
        # the newest min(end, R) tokens go to the ring, token t in slot t % R
        first = max(self.n, end - R)
        src_k, src_v = k[:, :, first - self.n :], v[:, :, first - self.n :]
        a = first % R
        head = min(R - a, end - first)
        self.rk[:, :, a : a + head] = src_k[:, :, :head]
        self.rv[:, :, a : a + head] = src_v[:, :, :head]
        if head < end - first:
            self.rk[:, :, : end - first - head] = src_k[:, :, head:]
            self.rv[:, :, : end - first - head] = src_v[:, :, head:]
        self.n = end

    def keys(self) -> torch.Tensor:
        """All n keys as the attention sees them, [B, H, n, D] in the model dtype: packed ones dequantized."""
        nk = self.nk
        deq = dequantize_keys(self.kq, self.ks, self.km, nk, self.bits, self.group).to(self.rk.dtype)
        return torch.cat([deq, self._ring_tokens(self.rk, nk, self.n)], 2)

    def values(self) -> torch.Tensor:
        nv = self.nv
        deq = dequantize_values(self.vq, self.vs, self.vm, nv, self.bits, self.group).to(self.rv.dtype)
        return torch.cat([deq, self._ring_tokens(self.rv, nv, self.n)], 2)

    def dense(self, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None):
        """keys() and values() followed by k_new, v_new [B, H, T, D] (not stored), the same values. On the CPU the
        dequantized packed rows are kept between calls (dk, dv): a row never changes once packed, so a decode step
        dequantizes only the rows packed since the last one (on the 135M model at 4K tokens the whole cache's
        dequantization and concatenations were 40% of a kivi decode step); elsewhere every call dequantizes all."""
        if self.rk.device.type != "cpu":
            k, v = self.keys(), self.values()
            return (k, v) if k_new is None else (torch.cat([k, k_new], 2), torch.cat([v, v_new], 2))
        total = self.n + (0 if k_new is None else k_new.shape[2])
        if self.dk is None or self.dk.shape[2] < total:
            self._grow_dense(total)
        G, nk, nv = self.group, self.nk, self.nv
        if nk > self.dnk:
            a = self.dnk
            self.dk[:, :, a:nk] = dequantize_keys(self.kq[:, :, a:nk], self.ks[:, :, a // G :], self.km[:, :, a // G :],
                                                  nk - a, self.bits, G)
        if nv > self.dnv:
            a = self.dnv
            self.dv[:, :, a:nv] = dequantize_values(self.vq[:, :, a:nv], self.vs[:, :, a:nv], self.vm[:, :, a:nv],
                                                    nv - a, self.bits, G)
        self.dnk, self.dnv = nk, nv
        self.dk[:, :, nk : self.n] = self._ring_tokens(self.rk, nk, self.n)
        self.dv[:, :, nv : self.n] = self._ring_tokens(self.rv, nv, self.n)
        if k_new is not None:
            self.dk[:, :, self.n : total], self.dv[:, :, self.n : total] = k_new, v_new
        return self.dk[:, :, :total], self.dv[:, :, :total]

    def _grow_dense(self, tokens: int) -> None:
        """dk, dv with room for `tokens` (and headroom), keeping the rows already dequantized (n only grows)."""
        B, H, R, D = self.rk.shape
        cap = max(tokens + GROW, tokens + tokens // 8)
        dk, dv = (torch.empty(B, H, cap, D, dtype=self.rk.dtype) for _ in range(2))
        if self.dk is not None:
            dk[:, :, : self.dnk], dv[:, :, : self.dnv] = self.dk[:, :, : self.dnk], self.dv[:, :, : self.dnv]
        self.dk, self.dv = dk, dv


def attention_ref(q: torch.Tensor, kv: PackedKV, k_new: torch.Tensor | None = None,
                  v_new: torch.Tensor | None = None) -> torch.Tensor:
    """The reference of KIVI attention: q [B, Hq, Tq, D] attends causally over the cache (packed tokens dequantized
    in fp32, then cast to the model dtype) followed by the new full-precision tokens k_new/v_new [B, H, Tq, D], which
    are not stored. Returns [B, Hq, Tq, D]. Dequantizing the cache is what a reference may do (on the CPU it keeps
    the dequantized rows between calls: PackedKV.dense); the Triton kernel in kivi.py computes the same on the packed
    words."""
    k, v = kv.dense(k_new, v_new)
    return dense_attention(q, k, v, causal=True)
