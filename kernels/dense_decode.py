"""Dense decode attention that reads only the live tokens of a preallocated cache, the length taken from a device
tensor: what a CUDA-graph-captured decode step needs (no host sync, no shape that changes per step).

The cache is [B, cap, Hkv, D] (flash-attn's layout, the one `full` keeps); `live` is int32 [B], the tokens in slots
[0, live[b]). Two GPU kernels, the first preferred:

- "flash-varlen": PyTorch's own FlashAttention-2 kernel, the one SDPA's flash backend runs, reached through
  `torch.ops.aten._flash_attention_forward` in its variable-length form with `seqused_k` = live, so it reads only the
  live keys (cu_seqlens_k steps by cap). This op is private to PyTorch (its signature moved between releases); when it
  is missing or refuses the inputs, the Triton kernel runs instead. bf16/fp16 only.
- "triton-splitkv": a split-KV (flash-decoding) Triton kernel of our own: grid (B * Hkv, splits), each program reads a
  range of the live tokens once for the whole GQA group (padded to 16 rows for the tensor-core dot), an online softmax
  in base 2, and a second kernel combines the splits by log-sum-exp
  (https://crfm.stanford.edu/2023/10/12/flashdecoding.html). Any dtype; runs in Triton's interpreter on the CPU, so
  the CPU-only CI checks the very kernel the GPU runs.
- "torch-masked": the PyTorch reference (reads the whole buffer and masks): the CPU path and the tests' oracle.

`append_token` writes one token per sequence at its write slot and moves the counters on, in one kernel, so a decode
step's bookkeeping is one launch per layer. With `ring=(sinks, window)` the write slot wraps inside the window
(StreamingLLM's cache); without it the slot is the count.

Run `python -m kvbench.kernels.dense_decode` on a GPU to time both kernels against SDPA-flash on the same cache.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from kvbench.api import ReservedRoomError, capturing

try:
    import triton
    import triton.language as tl

    from kvbench.kernels.split_kv import store_partial

    import kvbench.kernels.kivi  # noqa: F401  (importing it fixes Triton 3.6's interpreter for numpy >= 2.4)
except ImportError:  # Triton is Linux-only; the torch reference still works
    triton = None

BACKENDS = ("flash-varlen", "triton-splitkv", "torch-masked")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --- the reference ---------------------------------------------------------------------------------------------

def decode_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, 1, D] over k, v [B, cap, Hkv, D], slots [0, live[b]) of each sequence -> [B, Hq, 1, D]."""
    B, Hq, _, D = q.shape
    cap, Hkv = k.shape[1], k.shape[2]
    kk = k.transpose(1, 2).repeat_interleave(Hq // Hkv, 1).float()  # [B, Hq, cap, D]
    vv = v.transpose(1, 2).repeat_interleave(Hq // Hkv, 1).float()
    s = (q.float() @ kk.transpose(-1, -2)) * D**-0.5  # [B, Hq, 1, cap]
    dead = torch.arange(cap, device=q.device)[None, :] >= live.to(q.device).long()[:, None]  # [B, cap]
    s = s.masked_fill(dead[:, None, None, :], float("-inf"))
    vv = vv.masked_fill(dead[:, None, :, None], 0.0)  # never-written slots may hold NaN: 0 * NaN is NaN
    return (s.softmax(-1) @ vv).to(q.dtype)


def append_ref(k_cache, v_cache, k, v, seen, live, ring: tuple[int, int] | None = None) -> None:
    """k, v [B, Hkv, 1, D] into slot(seen[b]) of the [B, cap, Hkv, D] caches; then seen += 1 and live = the tokens
    now held (seen, or at most sinks + window with a ring)."""
    b = torch.arange(k.shape[0], device=k.device)
    n = seen.long()
    slot = n if ring is None else torch.where(n < ring[0], n, ring[0] + (n - ring[0]) % ring[1])
    k_cache[b, slot] = k[:, :, 0]
    v_cache[b, slot] = v[:, :, 0]
    seen.add_(1)
    live.copy_(seen if ring is None else seen.clamp(max=ring[0] + ring[1]))


# --- Triton kernels --------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _split_kernel(Q, K, V, LIVE, OP, LSE, sq_b, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, n_splits, scale_log2,
                      HKV: tl.constexpr, GROUP: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        bh, s = tl.program_id(0), tl.program_id(1)
        b, h = bh // HKV, bh % HKV
        n_live = tl.load(LIVE + b)
        per = tl.cdiv(tl.cdiv(n_live, n_splits), BLOCK_N) * BLOCK_N  # whole tiles per split
        lo = s * per
        hi = tl.minimum(lo + per, n_live)
        rows, d = tl.arange(0, M), tl.arange(0, D)
        q = tl.load(Q + b * sq_b + (h * GROUP + rows)[:, None] * sq_h + d[None, :], mask=(rows < GROUP)[:, None],
                    other=0.0)
        m_i = tl.full([M], float("-inf"), tl.float32)
        l_i = tl.zeros([M], tl.float32)
        acc = tl.zeros([M, D], tl.float32)
        b64 = b.to(tl.int64)  # a [B, cap, Hkv, D] buffer may pass 2^31 elements
        k_base, v_base = K + b64 * sk_b + h * sk_h, V + b64 * sv_b + h * sv_h
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            ok = n < hi
            k = tl.load(k_base + n[:, None] * sk_t + d[None, :], mask=ok[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [M, BLOCK_N]
            sc = tl.where(ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * sv_t + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        row = (b * HKV * GROUP + h * GROUP + rows) * n_splits + s  # [B, Hq, splits] partials
        store_partial(OP, LSE, row, acc, l_i, m_i, d, D, rows < GROUP)

    @triton.jit
    def _combine_kernel(OP, LSE, OUT, n_splits, so_b, so_h, HQ: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                        CH: tl.constexpr):
        bh = tl.program_id(0)
        b, h = bh // HQ, bh % HQ
        p, d, c = tl.arange(0, P), tl.arange(0, D), tl.arange(0, CH)
        m = tl.max(tl.load(LSE + bh * n_splits + p, mask=p < n_splits, other=float("-inf")), 0)
        acc = tl.zeros([D], tl.float32)
        wsum = tl.sum(tl.zeros([CH], tl.float32), 0)
        for start in range(0, n_splits, CH):  # CH splits at a time, so many splits do not spill registers
            i = start + c
            w = tl.exp2(tl.load(LSE + bh * n_splits + i, mask=i < n_splits, other=float("-inf")) - m)  # empty: 0
            o = tl.load(OP + (bh * n_splits + i)[:, None] * D + d[None, :], mask=(i < n_splits)[:, None], other=0.0)
            acc += tl.sum(o * w[:, None], 0)
            wsum += tl.sum(w, 0)
        tl.store(OUT + b * so_b + h * so_h + d, (acc / wsum).to(OUT.dtype.element_ty))

    @triton.jit
    def _append_kernel(K, V, KC, VC, SEEN, LIVE, sk_b, sk_h, skc_b, skc_t, skc_h, sinks, window,
                       HKV: tl.constexpr, D: tl.constexpr, RING: tl.constexpr):
        b = tl.program_id(0)  # one program per sequence: it alone reads and moves that sequence's counters
        n = tl.load(SEEN + b)
        slot = n
        if RING:
            slot = tl.where(n < sinks, n, sinks + (n - sinks) % window)
        h, d = tl.arange(0, HKV), tl.arange(0, D)
        src = b * sk_b + h[:, None] * sk_h + d[None, :]
        dst = b.to(tl.int64) * skc_b + slot * skc_t + h[:, None] * skc_h + d[None, :]
        tl.store(KC + dst, tl.load(K + src))
        tl.store(VC + dst, tl.load(V + src))
        tl.store(SEEN + b, n + 1)
        if RING:
            tl.store(LIVE + b, tl.minimum(n + 1, sinks + window))
        else:
            tl.store(LIVE + b, n + 1)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def env_config() -> dict:
    """Launch settings from KVBENCH_DECODE_CONFIG ("block_n=64,num_warps=4,num_stages=3,waves=8"), for sweeps."""
    text = os.environ.get("KVBENCH_DECODE_CONFIG", "")
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split(",") if kv)}


def plan_splits(B: int, Hkv: int, cap: int, device: torch.device, waves: int = 8, min_tokens: int = 256) -> int:
    """Splits per (sequence, KV head): about `waves` programs per SM, no split shorter than min_tokens of the buffer.
    Fixed by the buffer's capacity, not the live length, so a captured graph keeps it."""
    want = -(-waves * _sm_count(device) // (B * Hkv))
    return max(1, min(want, -(-cap // min_tokens)))


class TritonDecoder:
    """The split-KV kernel for one cache buffer, with its scratch allocated once (a graph replays the same
    pointers): `__call__(q, live)` -> [B, Hq, 1, D]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, n_heads: int, *, block_n: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None, waves: int | None = None,
                 splits: int | None = None):
        cfg = env_config()
        B, cap, Hkv, D = k.shape
        if D & (D - 1) or D < 16:
            raise ValueError(f"the Triton decode kernel needs a power-of-two head dim >= 16, got {D}")
        self.k, self.v, self.n_heads = k, v, n_heads
        self.block_n = block_n or cfg.get("block_n", 64)
        self.num_warps = num_warps or cfg.get("num_warps", 4)
        self.num_stages = num_stages or cfg.get("num_stages", 3)
        self.splits = splits or plan_splits(B, Hkv, cap, k.device, waves or cfg.get("waves", 8))
        self.op = torch.empty(B * n_heads * self.splits, D, dtype=torch.float32, device=k.device)
        self.lse = torch.empty(B * n_heads * self.splits, dtype=torch.float32, device=k.device)
        self.out = torch.empty(B, n_heads, 1, D, dtype=k.dtype, device=k.device)

    def __call__(self, q: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        k, v = self.k, self.v
        B, cap, Hkv, D = k.shape
        if q.stride(-1) != 1:
            q = q.contiguous()
        group = self.n_heads // Hkv
        exact = q.dtype == torch.float32 or not q.is_cuda
        _split_kernel[(B * Hkv, self.splits)](
            q, k, v, live, self.op, self.lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), self.splits, D**-0.5 * math.log2(math.e),
            HKV=Hkv, GROUP=group, M=max(16, triton.next_power_of_2(group)), D=D, BLOCK_N=self.block_n,
            PRECISION="ieee" if exact else "tf32", num_warps=self.num_warps, num_stages=self.num_stages)
        _combine_kernel[(B * self.n_heads,)](
            self.op, self.lse, self.out, self.splits, self.out.stride(0), self.out.stride(1),
            HQ=self.n_heads, D=D, P=triton.next_power_of_2(self.splits), CH=16, num_warps=4)
        return self.out


# --- FlashAttention-2 through PyTorch's private variable-length entry point ------------------------------------

def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, live: torch.Tensor, cu_q: torch.Tensor,
                 cu_k: torch.Tensor) -> torch.Tensor:
    """FlashAttention-2 decode over slots [0, live[b]): q [B, Hq, 1, D], k/v [B, cap, Hkv, D] contiguous, cu_q =
    arange(B + 1), cu_k = cap * arange(B + 1) (int32, on the device)."""
    B, Hq, _, D = q.shape
    cap, Hkv = k.shape[1], k.shape[2]
    out = torch.ops.aten._flash_attention_forward(
        q.reshape(B, Hq, D), k.view(B * cap, Hkv, D), v.view(B * cap, Hkv, D), cu_q, cu_k, 1, cap, 0.0, False,
        False, scale=D**-0.5, seqused_k=live)[0]
    return out.view(B, Hq, 1, D)


class DenseDecoder:
    """Decode attention over one [B, cap, Hkv, D] cache buffer pair with a device-side live length: picks the first
    backend that works here (flash-varlen, triton-splitkv, torch-masked) once, then `__call__(q, live)` is
    capture-safe. `backend` says which one runs; KVBENCH_DENSE_DECODE (a backend name) forces one."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, n_heads: int, backend: str | None = None):
        self.k, self.v, self.n_heads = k, v, n_heads
        forced = backend or os.environ.get("KVBENCH_DENSE_DECODE") or None
        if forced is not None and forced not in BACKENDS:
            raise ValueError(f"KVBENCH_DENSE_DECODE={forced!r} is invalid; valid: {', '.join(BACKENDS)}")
        order = [forced] if forced else self._candidates(k)
        self.backend, self.why = None, {}
        for name in order:
            try:
                self._setup(name)
                self.backend = name
                break
            except Exception as e:  # a private op that moved, a dtype a kernel refuses: try the next
                self.why[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
        if self.backend is None:
            raise RuntimeError(f"no dense decode backend works here: {self.why}")

    @staticmethod
    def _candidates(k: torch.Tensor) -> list[str]:
        if k.is_cuda:
            half = k.dtype in (torch.float16, torch.bfloat16)
            return (["flash-varlen"] if half else []) + ["triton-splitkv", "torch-masked"]
        return ["triton-splitkv", "torch-masked"] if INTERPRET else ["torch-masked"]

    def _setup(self, name: str) -> None:
        B, cap, Hkv, D = self.k.shape
        q = torch.randn(B, self.n_heads, 1, D, dtype=self.k.dtype, device=self.k.device)
        live = torch.ones(B, dtype=torch.int32, device=self.k.device)
        if name == "flash-varlen":
            if not self.k.is_cuda:
                raise RuntimeError("flash-varlen needs CUDA")
            ar = torch.arange(B + 1, dtype=torch.int32, device=self.k.device)
            self.cu_q, self.cu_k = ar, ar * cap
            self.fn = lambda q, live: flash_varlen(q, self.k, self.v, live, self.cu_q, self.cu_k)
        elif name == "triton-splitkv":
            if triton is None or not (self.k.is_cuda or INTERPRET):
                raise RuntimeError("triton-splitkv needs Triton on CUDA (or TRITON_INTERPRET=1)")
            self.fn = TritonDecoder(self.k, self.v, self.n_heads)
        else:
            self.fn = lambda q, live: decode_ref(q, self.k, self.v, live)
        self.fn(q, live)  # one trial call: compiles, and proves the backend takes these inputs

    def __call__(self, q: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        return self.fn(q, live)


def append_token(k_cache, v_cache, k, v, seen, live, ring: tuple[int, int] | None = None) -> None:
    """append_ref in one kernel on CUDA (or under TRITON_INTERPRET=1); the reference elsewhere."""
    B, Hkv, _, D = k.shape
    pow2 = Hkv & (Hkv - 1) == 0 and D & (D - 1) == 0
    if triton is None or not (k.is_cuda or INTERPRET) or not pow2:
        return append_ref(k_cache, v_cache, k, v, seen, live, ring)
    if k.stride(-1) != 1 or v.stride() != k.stride():
        k, v = k.contiguous(), v.contiguous()
    sinks, window = ring or (0, 1)
    _append_kernel[(B,)](k, v, k_cache, v_cache, seen, live, k.stride(0), k.stride(1), k_cache.stride(0),
                         k_cache.stride(1), k_cache.stride(2), sinks, window, HKV=Hkv, D=D, RING=ring is not None,
                         num_warps=1)


class PinnedKV:
    """The capture-safe store behind `full` and `streaming`: K/V buffers [B, cap, Hkv, D] allocated once, device-side
    counters (seen, live: int32 [B]), one-kernel appends and live-length attention, and the host-side mirror `n`.

    Position p lives in slot p; with `ring=(sinks, window)` in slot p below sinks, else sinks + (p - sinks) % window,
    so once sinks + window slots are held each append overwrites exactly the token that leaves the window.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: list[int], n_seen: int, cap: int, n_heads: int,
                 ring: tuple[int, int] | None = None):
        B, H, _, D = k.shape
        self.ring, self.cap = ring, cap
        # zeros, not empty: a masked path weighs the not-yet-live slots by 0, and 0 * NaN garbage is NaN
        self.k, self.v = k.new_zeros(B, cap, H, D), v.new_zeros(B, cap, H, D)
        self.seen = torch.zeros(B, dtype=torch.int32, device=k.device)
        self.live = self.seen if ring is None else torch.zeros_like(self.seen)  # without a ring: one counter
        self.load(k, v, positions, n_seen)
        self.decoder = DenseDecoder(self.k, self.v, n_heads)

    def slots(self, positions: list[int]) -> torch.Tensor:
        if self.ring is None:
            return torch.tensor(positions, dtype=torch.long, device=self.k.device)
        s, w = self.ring
        return torch.tensor([p if p < s else s + (p - s) % w for p in positions], device=self.k.device)

    def load(self, k: torch.Tensor, v: torch.Tensor, positions: list[int], n_seen: int) -> None:
        """Store k, v [B, Hkv, N, D], the tokens at `positions` of the n_seen seen so far (eager; may sync)."""
        if len(positions) > self.cap:
            raise ReservedRoomError("pinned cache", len(positions), 0, self.cap)
        idx = self.slots(positions)
        self.k[:, idx], self.v[:, idx] = k.transpose(1, 2), v.transpose(1, 2)
        self.n, self.held = n_seen, len(positions)
        self.seen.fill_(n_seen)
        self.live.fill_(self.held)

    def ordered(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens at `positions`, as [B, Hkv, N, D] in that order."""
        idx = self.slots(positions)
        return self.k[:, idx].transpose(1, 2), self.v[:, idx].transpose(1, 2)

    def advance(self, n: int) -> None:
        """Host side of n one-token appends: raises ReservedRoomError, changing nothing, when they would not fit."""
        full = self.ring is not None and self.cap == sum(self.ring)
        held = min(self.held + n, self.cap) if full else self.held + n
        if held > self.cap:
            raise ReservedRoomError("pinned cache", self.held, n, self.cap)
        self.n, self.held = self.n + n, held

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One token per sequence, k/v [B, Hkv, 1, D], then q [B, Hq, 1, D] attends over the live tokens: no host
        sync or allocation, so a CUDA graph can capture it. Outside a capture the room is checked first."""
        if not capturing(q):
            self.advance(1)
        append_token(self.k, self.v, k, v, self.seen, self.live, self.ring)
        return self.decoder(q, self.live)

    def nbytes(self) -> int:
        counters = (1 if self.live is self.seen else 2) * self.seen.numel() * self.seen.element_size()
        return 2 * self.k.numel() * self.k.element_size() + counters


SWEEP = ((64, 4, 2, 8), (64, 4, 4, 8), (64, 8, 3, 8), (128, 4, 2, 8), (128, 8, 2, 8), (64, 4, 3, 4), (64, 4, 3, 16))


def _bench_candidates(q, ks, vs, live, T: int, sweep: bool) -> dict:
    """name -> one closure per cache copy: SDPA-flash over the live view, each backend, and (sweep) Triton settings."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH]

    def sdpa(k, v):
        kk, vv = k[:, :T].transpose(1, 2), v[:, :T].transpose(1, 2)

        def f():
            with sdpa_kernel(pinned):
                return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)
        return f

    Hq = q.shape[1]
    cands: dict = {"sdpa-flash": [sdpa(k, v) for k, v in zip(ks, vs)]}
    for name in ("flash-varlen", "triton-splitkv"):
        try:
            cands[name] = [functools.partial(DenseDecoder(k, v, Hq, backend=name), q, live) for k, v in zip(ks, vs)]
        except Exception as e:  # recorded as this backend's row
            cands[name] = e
    for bn, nw, ns, waves in SWEEP if sweep else ():
        decs = [TritonDecoder(k, v, Hq, block_n=bn, num_warps=nw, num_stages=ns, waves=waves) for k, v in zip(ks, vs)]
        cands[f"triton:block_n={bn},num_warps={nw},num_stages={ns},waves={waves}"] = \
            [functools.partial(d, q, live) for d in decs]
    return cands


def _bench_cell(B: int, T: int, dev: torch.device, bw: float, sweep: bool) -> list[dict]:
    """Rows for one batch x context at Llama-3.1-8B's attention shape: time, GB/s, error, ratio to SDPA-flash."""
    from kvbench.timing import bench, floor_us, l2_bytes

    Hq, H, D = 32, 8, 128
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float16
    nbytes = 2 * B * T * H * D * 2
    copies = max(1, -(-3 * l2_bytes(dev) // nbytes))  # rotate copies to defeat L2 at small sizes
    ks = [torch.randn(B, T + min(256, T), H, D, device=dev, dtype=dt) for _ in range(copies)]
    vs = [torch.randn_like(k) for k in ks]
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt)
    live = torch.full((B,), T, dtype=torch.int32, device=dev)
    want = decode_ref(q, ks[0], vs[0], live).float()
    rows = []
    for name, fns in _bench_candidates(q, ks, vs, live, T, sweep).items():
        try:
            if isinstance(fns, Exception):
                raise fns
            err = ((fns[0]().float() - want).norm() / want.norm()).item()
            t = bench(fns, set_bytes=nbytes, graph=True, device=dev)
            rows.append({"B": B, "T": T, "kernel": name, "us": t.median_us, "clock": t.clock,
                         "gbs": nbytes / t.median_us / 1e3, "floor_us": floor_us(nbytes, bw), "rel_err": err})
        except Exception as e:
            rows.append({"B": B, "T": T, "kernel": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    base = next((r["us"] for r in rows if r["kernel"] == "sdpa-flash" and "us" in r), None)
    for r in rows:
        if "us" in r and base:
            r["vs_sdpa_flash"] = r["us"] / base
    return rows


def _main() -> None:
    """Time the live-length decode kernels against SDPA-flash on the same cache at Llama-3.1-8B's attention shape
    (32 query heads, 8 KV heads, head dim 128, bf16), with a parity check; --sweep adds Triton launch settings.
    Prints one JSON line per timing (--json FILE also writes them), then a table."""
    import argparse
    import json

    from kvbench.timing import copy_bandwidth

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cuda; or cpu under TRITON_INTERPRET=1 (a slow smoke test)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    bw = copy_bandwidth(device=dev)["copy_gbs"]
    rows = []
    for B in args.batches:
        for T in args.contexts:
            rows += _bench_cell(B, T, dev, bw, args.sweep)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps({**r, "copy_gbs": bw, "gpu": gpu}) + "\n" for r in rows)
    print(f"{'B':>3} {'T':>6} {'kernel':<58} {'us':>9} {'x sdpa':>7} {'GB/s':>7} {'rel err':>8}")
    for r in rows:
        if "us" in r:
            print(f"{r['B']:>3} {r['T']:>6} {r['kernel']:<58} {r['us']:>9.1f} {r.get('vs_sdpa_flash', 0):>7.3f} "
                  f"{r['gbs']:>7.0f} {r['rel_err']:>8.1e}")
        else:
            print(f"{r['B']:>3} {r['T']:>6} {r['kernel']:<58} {r['error'][:100]}")


if __name__ == "__main__":
    _main()
