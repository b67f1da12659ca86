"""kivi: quantization bounds, the packed layout's bits and bytes, KIVI's residual rules, decode attention against a
float64 reference, the Triton kernel against the PyTorch reference (in Triton's interpreter on the CPU, and on the
GPU), and the method inside a transformers model."""

import os
import textwrap

import pytest
import torch

from kvbench import KVBenchError, LayerSpec, ParamError, parse_method
from kvbench.api import ReservedRoomError
from kvbench.kernels import kivi_ref as ref
from interpreter import run_interpreted
from oracles import naive_attention

CPU = torch.device("cpu")


def make(spec="kivi", hq=8, hkv=2, d=64, dtype=torch.float32, device=CPU):
    return parse_method(spec).make_layer(LayerSpec(0, 1, hq, hkv, d, dtype, torch.device(device)))


def rand_kv(B, H, T, D, dtype=torch.float32, device="cpu"):
    # channels with different offsets and spreads, as real keys have (outlier channels)
    k = torch.randn(B, H, T, D, device=device) * torch.linspace(0.5, 3, D, device=device) + \
        torch.linspace(-4, 4, D, device=device)
    return k.to(dtype), torch.randn(B, H, T, D, device=device).to(dtype)


# --- quantization and packing ---

@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_round_trip_within_half_a_step(bits):
    torch.manual_seed(0)
    k, v = rand_kv(2, 3, 96, 64)
    words, ks, km = ref.quantize_keys(k, bits, 32)
    kd = ref.dequantize_keys(words, ks, km, 96, bits, 32)
    bound = ks.float().repeat_interleave(32, 2) / 2
    assert ((k - kd).abs() <= bound * (1 + 1e-6) + 1e-6).all()
    words, vs, vm = ref.quantize_values(v, bits, 32)
    vd = ref.dequantize_values(words, vs, vm, 96, bits, 32)
    bound = vs.float().repeat_interleave(32, 3) / 2
    assert ((v - vd).abs() <= bound * (1 + 1e-6) + 1e-6).all()
    # zero point = min and scale = (max - min) / (2^b - 1), both rounded outwards to fp16 so the grid covers the group
    x = k.unflatten(2, (3, 32))
    lo, hi, levels = x.amin(3), x.amax(3), 2**bits - 1
    assert (km.float() <= lo).all() and (km.float() >= lo - lo.abs() * 2**-10).all()
    assert (ks.float() * levels + km.float() >= hi).all()
    torch.testing.assert_close(ks.float(), (hi - lo) / levels, rtol=1e-3, atol=lo.abs().max().item() * 2**-10)


def test_constant_group_is_exact():
    x = torch.full((1, 1, 32, 32), 1.5)
    words, s, m = ref.quantize_keys(x, 2, 32)
    assert (s == 0).all()
    assert torch.equal(ref.dequantize_keys(words, s, m, 32, 2, 32), x)


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_layout_is_the_documented_bits(bits):
    torch.manual_seed(1)
    codes = torch.randint(0, 2**bits, (5, 64), dtype=torch.uint8)
    words = ref.pack(codes, bits)
    per_word = 32 // bits
    assert words.dtype == torch.int32 and words.shape == (5, 64 // per_word)
    for t in range(5):
        for c in range(64):  # channel c: word c // E, bits [(c % E) * b, (c % E + 1) * b)
            word = int(words[t, c // per_word]) & 0xFFFFFFFF
            assert (word >> ((c % per_word) * bits)) & (2**bits - 1) == codes[t, c]
    assert torch.equal(ref.unpack(words, bits), codes.int())


# --- the cache: KIVI's residual rules, bytes, chunking ---

def kivi_bytes(B, H, D, T, bits, G, R, es):
    """The layout's arithmetic for a cache that has just been prefilled with T tokens: keys packed in whole blocks of
    R, values in rows allocated 16 at a time, the ring of R tokens."""
    nk, nv = T // R * R, -(-max(0, T - R) // 16) * 16
    code_row = D * bits // 8
    return B * H * (nk * code_row + nk // G * D * 2 * 2 + nv * code_row + nv * (D // G) * 2 * 2 + 2 * R * D * es)


@pytest.mark.parametrize("T", [1, 100, 128, 129, 300, 1024])
@pytest.mark.parametrize("bits", [2, 4])
def test_nbytes_is_the_layout_arithmetic(T, bits):
    layer = make(f"kivi:bits={bits}", 8, 2, 128, torch.float16)
    q, k, v = torch.randn(1, 8, T, 128).half(), *rand_kv(1, 2, T, 128, torch.float16)
    layer.prefill(q, k, v)
    assert layer.nbytes() == kivi_bytes(1, 2, 128, T, bits, 32, 128, 2)
    assert layer.nbytes() == sum(t.numel() * t.element_size() for t in layer.kv.tensors())


@pytest.mark.parametrize("bits", [2, 4])
def test_chunked_quantization_packs_what_one_piece_packs(bits, monkeypatch):
    """Prefill quantizes in chunks of tokens (bounded transient memory); the packed cache is the same."""
    torch.manual_seed(7)
    k, v = torch.randn(2, 2, 1000, 64), torch.randn(2, 2, 1000, 64)
    whole = ref.PackedKV.empty(2, 2, 64, torch.float32, "cpu", bits, 32, 128)
    whole.append(k, v)
    monkeypatch.setattr(ref, "CHUNK_ELEMENTS", 2 * 2 * 64 * 96)  # 96 tokens a chunk: 10 chunks, a short last one
    chunked = ref.PackedKV.empty(2, 2, 64, torch.float32, "cpu", bits, 32, 128)
    chunked.append(k, v)
    for name in ("kq", "ks", "km", "vq", "vs", "vm", "rk", "rv"):
        rows = whole.nv if name in ("vq", "vs", "vm") else getattr(whole, name).shape[2]  # rows past nv are unset
        assert torch.equal(getattr(whole, name)[:, :, :rows], getattr(chunked, name)[:, :, :rows]), name


@pytest.mark.parametrize("B, T", [(1, 300), (2, 5000), (4, 20000)])
def test_quantizer_transient_stays_below_fulls_cache(B, T, monkeypatch):
    """Each quantizer call takes at most max(1/8 of the tensor, MIN_CHUNK_ELEMENTS) elements: its ~20 B per element
    of intermediates stay below the 4 B per element of full's fp16 K and V (the memory target: kivi fits wherever
    full fits, 128K x 64 included)."""
    monkeypatch.setattr(ref, "MIN_CHUNK_ELEMENTS", 2**10)  # small shapes exercise the 1/8 bound
    seen = []
    quantize = ref.quantize
    monkeypatch.setattr(ref, "quantize", lambda x, *a: seen.append(x.numel()) or quantize(x, *a))
    k, v = rand_kv(B, 2, T, 64, torch.float16)
    kv = ref.PackedKV.empty(B, 2, 64, torch.float16, "cpu", 2, 32, 128)
    kv.append(k, v)
    assert len(seen) > 2 and max(seen) <= k.numel() // 8
    assert max(seen) * 20 < 2 * k.numel() * k.element_size()


def test_decode_bytes_is_96_bytes_per_token_per_head_at_2_bits():
    layer = make("kivi", 32, 8, 128, torch.float16)
    T = 4096 + 64
    layer.prefill(torch.randn(1, 32, 1, 128).half(), *rand_kv(1, 8, T, 128, torch.float16))
    # packed keys (4096) and values (T - 128): 32 B codes + 16 B scale/min per token each; the key residual (64) and
    # the value residual (128) in fp16
    assert layer.decode_bytes() == 8 * (4096 * 48 + (T - 128) * 48 + (64 + 128) * 128 * 2)
    assert 96 * 8 * T < layer.decode_bytes() < 96 * 8 * T * 1.1


def test_residual_rules_and_chunking():
    """Keys are packed in whole blocks of R, values all but the last R; writing in a prefill, steps and chunks gives
    the very same cache as one prefill."""
    torch.manual_seed(2)
    B, H, D, G, R = 2, 2, 64, 32, 64
    k, v = rand_kv(B, H, 400, D)
    whole = ref.PackedKV.empty(B, H, D, torch.float32, "cpu", 2, G, R)
    whole.append(k, v)
    parts = ref.PackedKV.empty(B, H, D, torch.float32, "cpu", 2, G, R)
    bounds = [0, 37, 38, 39, 64, 65, 127, 128, 200, 201, 333, 400]  # prefill, steps, chunks across block edges
    for a, b in zip(bounds, bounds[1:]):
        parts.append(k[:, :, a:b], v[:, :, a:b])
        n = b
        assert (parts.nk, parts.nv) == (n // R * R, max(0, n - R))
        keys, values = parts.keys(), parts.values()
        assert torch.equal(keys[:, :, parts.nk:], k[:, :, parts.nk:n])  # the key residual is exact
        assert torch.equal(values[:, :, parts.nv:], v[:, :, parts.nv:n])  # the R newest values are exact
        if parts.nk:
            assert not torch.equal(keys[:, :, : parts.nk], k[:, :, : parts.nk])  # older ones are quantized
    for name, rows in (("kq", whole.nk), ("ks", whole.nk // G), ("km", whole.nk // G), ("vq", whole.nv),
                       ("vs", whole.nv), ("vm", whole.nv)):  # the live rows; capacity beyond them is not written
        assert torch.equal(getattr(whole, name)[:, :, :rows], getattr(parts, name)[:, :, :rows]), name
    assert torch.equal(whole.keys(), parts.keys()) and torch.equal(whole.values(), parts.values())


def naive_dequant(words, scale, mn, n, bits, group, per_channel):
    """float64, from the documented bit layout with integer arithmetic: codes * scale + min."""
    per_word = 32 // bits
    D = words.shape[-1] * per_word
    c = torch.arange(D)
    w = words[:, :, :n].long() & 0xFFFFFFFF
    codes = (w[..., c // per_word] >> ((c % per_word) * bits)) & (2**bits - 1)
    if per_channel:  # keys: (scale, min) per channel for each group of tokens
        idx = torch.arange(n) // group
        s, m = scale[:, :, idx].double(), mn[:, :, idx].double()
    else:  # values: per token for each group of channels
        s, m = scale[:, :, :n][..., c // group].double(), mn[:, :, :n][..., c // group].double()
    return codes.double() * s + m


@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (9, 3)])
@pytest.mark.parametrize("bits", [2, 4])
def test_decode_matches_float64_reference(hq, hkv, bits):
    """Every extend (steps and a chunk) equals float64 attention over the packed tokens dequantized from the bits, the
    full-precision residual and the new tokens."""
    torch.manual_seed(3)
    B, D, R = 2, 64, 64
    layer = make(f"kivi:bits={bits},residual={R}", hq, hkv, D)
    ks, vs = [], []
    for step, t in enumerate([150, 1, 1, 7, 1, 60, 1]):
        q = torch.randn(B, hq, t, D)
        k, v = rand_kv(B, hkv, t, D)
        kv = layer.kv
        if kv is None:
            kk, vv = k.double(), v.double()
        else:
            kk = torch.cat([naive_dequant(kv.kq, kv.ks, kv.km, kv.nk, bits, 32, True),
                            torch.cat(ks, 2)[:, :, kv.nk:].double(), k.double()], 2)
            vv = torch.cat([naive_dequant(kv.vq, kv.vs, kv.vm, kv.nv, bits, 32, False),
                            torch.cat(vs, 2)[:, :, kv.nv:].double(), v.double()], 2)
        out = layer.prefill(q, k, v) if step == 0 else layer.extend(q, k, v)
        torch.testing.assert_close(out.double(), naive_attention(q, kk, vv), atol=2e-5, rtol=1e-5)
        ks.append(k), vs.append(v)
    assert layer.seq_len() == 221


def test_four_bits_are_closer_to_exact_attention_than_two():
    torch.manual_seed(3)
    B, hq, hkv, D = 2, 8, 2, 64
    k, v = rand_kv(B, hkv, 400, D)
    q = torch.randn(B, hq, 1, D) * 0.3
    exact = naive_attention(q, k, v)
    errors = {}
    for bits in (2, 4):
        layer = make(f"kivi:bits={bits},residual=64", hq, hkv, D)
        layer.prefill(torch.randn(B, hq, 400, D), k, v)
        out = layer.decode_fns(q)["attention"]().double()
        errors[bits] = ((out - exact).norm() / exact.norm()).item()
    # 4 bits have 5x finer steps than 2 bits ((2^4 - 1) / (2^2 - 1)); measured 0.44 and 0.08 here
    assert errors[4] < errors[2] / 3, errors


def test_bad_parameters_fail_on_construction():
    for spec, name in [("kivi:bits=3", "bits"), ("kivi:group=24", "group"), ("kivi:residual=100", "residual"),
                       ("kivi:residual=0", "residual"), ("kivi:impl=cuda", "impl")]:
        with pytest.raises(ParamError) as e:
            parse_method(spec)
        assert e.value.name == name
    with pytest.raises(KVBenchError, match="head dim"):
        make("kivi:group=32", 4, 4, 48)


def test_triton_impl_on_cpu_says_how_to_fix():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the interpreter runs Triton on the CPU")
    with pytest.raises(KVBenchError, match="impl=torch"):
        make("kivi:impl=triton")


# --- the Triton kernel in Triton's interpreter, on the CPU ---

INTERPRETER_CHECK = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    from kvbench import LayerSpec, parse_method
    from kvbench.kernels.kivi import decode_attention
    from kvbench.kernels.kivi_ref import PackedKV, attention_ref
    torch.manual_seed(0)
    worst = 0.0
    for dtype in (torch.float32, torch.float16):
        for B, Hq, H, D, bits, G, R in ((2, 4, 2, 32, 2, 16, 32), (1, 4, 1, 64, 4, 32, 64), (1, 3, 3, 32, 2, 8, 16)):
            for T in (1, 33, 170):
                kv = PackedKV.empty(B, H, D, dtype, "cpu", bits, G, R)
                kv.append(torch.randn(B, H, T, D).to(dtype) * 2 + 1, torch.randn(B, H, T, D).to(dtype))
                q = torch.randn(B, Hq, 1, D).to(dtype)
                kn, vn = torch.randn(B, H, 1, D).to(dtype), torch.randn(B, H, 1, D).to(dtype)
                for new in (False, True):
                    args = (kn, vn) if new else ()
                    out = decode_attention(q, kv, *args, block_n=16, splits=3)
                    want = attention_ref(q, kv, *args)
                    tol = 1e-5 if dtype == torch.float32 else 2e-3
                    torch.testing.assert_close(out, want, atol=tol, rtol=tol)
                    worst = max(worst, (out.float() - want.float()).abs().max().item())
    # the fused one-token write packs exactly what the reference packs
    from kvbench.kernels.kivi import append_one
    for dtype in (torch.float32, torch.bfloat16):
        for B, H, D, bits, G, R in ((2, 2, 32, 2, 16, 32), (1, 3, 64, 4, 32, 64)):
            a, b = (PackedKV.empty(B, H, D, dtype, "cpu", bits, G, R) for _ in range(2))
            k = (torch.randn(B, H, 100, D) * 3 + 1).to(dtype)
            v = (torch.randn(B, H, 100, D) * torch.linspace(0.1, 5, D)).to(dtype)
            v[:, :, 40, :16] = 0.75  # a constant group: scale 0
            a.append(k[:, :, :5], v[:, :, :5]), b.append(k[:, :, :5], v[:, :, :5])
            for t in range(5, 100):
                a.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
                append_one(b, k[:, :, t : t + 1], v[:, :, t : t + 1])
            assert (a.n, a.nk, a.nv) == (b.n, b.nk, b.nv)
            for name, rows in (("kq", a.nk), ("ks", a.nk // G), ("km", a.nk // G), ("vq", a.nv), ("vs", a.nv),
                               ("vm", a.nv), ("rk", R), ("rv", R)):
                assert torch.equal(getattr(a, name)[:, :, :rows], getattr(b, name)[:, :, :rows]), name
    # the method's decode path runs the kernels too
    layer = parse_method("kivi:impl=triton,residual=32,group=16").make_layer(
        LayerSpec(0, 1, 4, 2, 32, torch.float32, torch.device("cpu")))
    layer.prefill(torch.randn(1, 4, 70, 32), torch.randn(1, 2, 70, 32), torch.randn(1, 2, 70, 32))
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
    want = attention_ref(q, layer.kv, k, v)
    torch.testing.assert_close(layer.extend(q, k, v), want, atol=1e-5, rtol=1e-5)
    assert layer.info()["backend"] == "triton"
    print("max abs difference", worst)
""")


PINNED_CHECK = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from kvbench import LayerSpec, parse_method
    from kvbench.api import ReservedRoomError
    torch.manual_seed(0)
    B, Hq, H, D = 2, 4, 2, 32
    for dtype, bits, G, R, prompt in ((torch.float32, 2, 8, 16, 21), (torch.float16, 4, 16, 32, 30)):
        spec = f"kivi:impl=triton,bits={bits},group={G},residual={R}"
        mk = lambda: parse_method(spec).make_layer(LayerSpec(0, 1, Hq, H, D, dtype, torch.device("cpu")))
        rand = lambda h, t, scale=1.0: (torch.randn(B, h, t, D) * scale + (scale - 1)).to(dtype)
        plain, pinned = mk(), mk()
        q, k, v = rand(Hq, prompt), rand(H, prompt, 2.0), rand(H, prompt)
        plain.prefill(q, k, v), pinned.prefill(q, k, v)
        steps = 40
        pinned.reserve(steps + 2)  # 40 steps, one of them a 3-token chunk: room for exactly 42 tokens
        assert pinned.capture_safe and pinned.info()["pinned"]
        for i in range(steps):
            t = 3 if i == 7 else 1
            q, k, v = rand(Hq, t), rand(H, t, 2.0), rand(H, t)
            a, b = plain.extend(q, k, v), pinned.extend(q, k, v)
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            torch.testing.assert_close(b, a, atol=tol, rtol=tol)
            assert pinned.seq_len() == plain.seq_len() == int(pinned.kv.ndev)
        x, y = plain.kv, pinned.kv
        assert y.nk >= 2 * R  # key blocks completed on the device during the run
        for name, rows in (("kq", x.nk), ("ks", x.nk // G), ("km", x.nk // G), ("vq", x.nv), ("vs", x.nv),
                           ("vm", x.nv), ("rk", R), ("rv", R)):
            assert torch.equal(getattr(x, name)[:, :, :rows], getattr(y, name)[:, :, :rows]), (name, bits)
        # the room is spent: the next step fails before any write, and so does a replay's advance()
        bits_of = lambda: [t.clone().view(torch.uint8) for t in y.tensors()] + [y.n, int(y.ndev)]  # NaN-proof
        before = bits_of()
        for call in (lambda: pinned.extend(rand(Hq, 1), rand(H, 1), rand(H, 1)), lambda: pinned.advance(1)):
            try:
                call()
                raise AssertionError("stepped past the reserved room")
            except ReservedRoomError:
                pass
        after = bits_of()
        assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(before, after))
    print("pinned steps equal the plain ones")
""")


def test_reserved_steps_equal_the_plain_path_in_the_interpreter():
    """The capture-safe path (reserve(): device length, ranges planned for the reserved length, one write kernel that
    packs values and completed key blocks on the device) gives the plain path's outputs and the very same packed
    cache, across key blocks and a 3-token chunk; past the room it refuses before writing."""
    r = run_interpreted(PINNED_CHECK)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "pinned steps equal the plain ones" in r.stdout


def test_kivi_on_the_torch_path_is_not_capture_safe():
    layer = make("kivi")  # on the CPU: the PyTorch reference
    assert not layer.capture_safe and "PyTorch path" in layer.capture_unsafe_reason
    layer.prefill(torch.randn(1, 8, 40, 64), torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64))
    with pytest.raises(KVBenchError, match="not capture-safe"):
        layer.reserve(4)


def test_triton_kernel_matches_reference_in_the_interpreter():
    """The very kernel the GPU runs, executed by Triton's interpreter on small shapes (a subprocess, because
    TRITON_INTERPRET must be set before triton is imported)."""
    r = run_interpreted(INTERPRETER_CHECK)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "max abs difference" in r.stdout


# --- the Triton kernel on the GPU ---

GPU_SHAPES = [  # B, Hq, Hkv, D, T
    (1, 8, 8, 64, 333),
    (3, 8, 2, 64, 1000),
    (2, 32, 8, 128, 4097),
    (1, 16, 2, 128, 2049),
    (4, 4, 1, 128, 777),
    (2, 32, 8, 128, 127),
    (1, 32, 8, 128, 12345),
]


# ids, so a GPU run can split the tests over processes that compile in parallel (-k "bf16 and b2", ...)
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
BITS = pytest.mark.parametrize("bits", [2, 4], ids=["b2", "b4"])
# the packed tokens' kernel for the method-level GPU tests: CUDA whatever the size (CUDA_MIN_ROWS 0), or Triton
PATHS = pytest.mark.parametrize("min_rows", [0, 1 << 62], ids=["cuda", "triton"])


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@DTYPES
@BITS
@pytest.mark.parametrize("path", ["cuda", "triton"])
def test_kernels_match_reference_on_gpu(shape, dtype, bits, path):
    """Both paths of the packed tokens: csrc/kivi_attend.cu (then Triton's ring part) and Triton's split kernel."""
    from kvbench.kernels import kivi as kernel

    torch.manual_seed(sum(shape) + bits)
    B, Hq, H, D, T = shape
    kv = ref.PackedKV.empty(B, H, D, dtype, "cuda", bits, 32, 128)
    k, v = rand_kv(B, H, T, D, dtype, "cuda")
    kv.append(k, v)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype)
    kn, vn = (torch.randn(B, H, 1, D, device="cuda", dtype=dtype) for _ in range(2))
    for args in ((), (kn, vn)):
        want = ref.attention_ref(q, kv, *args)
        # the default plan, and other tiles, warps, stages, register caps and range counts (every range but the
        # last is whole tiles; splits=1 leaves one range, 7 a partial tile in the middle of the packed tokens)
        for config in ({}, dict(block_n=128, num_warps=8, splits=7), dict(block_n=32, num_stages=3, maxnreg=None,
                                                                          splits=1)):
            out = kernel.decode_attention(q, kv, *args, path=path, **config)
            torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
        # against float64 over the dequantized cache: the kernel's own error, not just agreement with the reference
        exact = naive_attention(q.cpu(), torch.cat([kv.keys(), *args[:1]], 2).cpu(),
                                torch.cat([kv.values(), *args[1:]], 2).cpu())
        assert (out.cpu().double() - exact).abs().max() < 2e-2


@pytest.mark.gpu
@DTYPES
@BITS
def test_fused_write_packs_what_the_reference_packs_on_gpu(dtype, bits):
    from kvbench.kernels.kivi import append_one

    torch.manual_seed(5)
    B, H, D, R = 3, 8, 128, 128
    a, b = (ref.PackedKV.empty(B, H, D, dtype, "cuda", bits, 32, R) for _ in range(2))
    k, v = rand_kv(B, H, 600, D, dtype, "cuda")
    a.append(k[:, :, :300], v[:, :, :300]), b.append(k[:, :, :300], v[:, :, :300])
    for t in range(300, 600):
        a.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        append_one(b, k[:, :, t : t + 1], v[:, :, t : t + 1])
    # bit for bit: both divide exactly (the 4-bit mismatch was the reference's x * fl(1/15) on CUDA, kivi_ref.quantize)
    for name, rows in (("ks", a.nk // 32), ("km", a.nk // 32), ("vs", a.nv), ("vm", a.nv), ("rk", R), ("rv", R),
                       ("kq", a.nk), ("vq", a.nv)):
        x, y = getattr(a, name)[:, :, :rows], getattr(b, name)[:, :, :rows]
        assert torch.equal(x, y), f"{name}: {(x != y).sum().item()} of {x.numel()} differ"


@pytest.mark.gpu
@BITS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_quantization_on_gpu_is_bit_identical_to_the_cpu(bits, dtype):
    """The reference quantizer gives the same codes, scales and mins on CUDA as on the CPU (CUDA torch divides by a
    Python scalar through its reciprocal; the quantizer must not)."""
    torch.manual_seed(7)
    k, v = rand_kv(2, 4, 256, 128, dtype)
    for fn, t in ((ref.quantize_keys, k), (ref.quantize_values, v)):
        for x, y in zip(fn(t, bits, 32), fn(t.cuda(), bits, 32)):
            assert torch.equal(x, y.cpu()), f"{fn.__name__}: {(x != y.cpu()).sum().item()} of {x.numel()} differ"


@pytest.mark.gpu
@DTYPES
@BITS
@PATHS
def test_method_decodes_with_the_kernel_on_gpu(dtype, bits, min_rows, monkeypatch):
    from kvbench.kernels import kivi as kernel

    monkeypatch.setattr(kernel, "CUDA_MIN_ROWS", min_rows)
    torch.manual_seed(4)
    B, Hq, H, D = 2, 32, 8, 128
    layer = make(f"kivi:bits={bits}", Hq, H, D, dtype, "cuda")  # both bits decode through the fused writer now
    reference = make(f"kivi:bits={bits},impl=torch", Hq, H, D, dtype, "cuda")
    k, v = rand_kv(B, H, 700, D, dtype, "cuda")
    q = torch.randn(B, Hq, 700, D, device="cuda", dtype=dtype)
    layer.prefill(q, k, v), reference.prefill(q, k, v)
    for _ in range(200):  # crosses a key block boundary (700 -> 900)
        q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype)
        k, v = rand_kv(B, H, 1, D, dtype, "cuda")
        torch.testing.assert_close(layer.extend(q, k, v), reference.extend(q, k, v), atol=2e-2, rtol=2e-2)
    want = "cuda+triton" if kernel.cuda_path(q, layer.kv) else "triton"  # the kernel that ran, in the record
    assert layer.info()["backend"] == want and reference.info()["backend"] == "torch"
    fns = layer.decode_fns(q)
    torch.testing.assert_close(fns["attention"](), ref.attention_ref(q, layer.kv), atol=2e-2, rtol=2e-2)
    for key in fns:  # the stages the kernel suite times (packed and tail on the CUDA path)
        fns[key]()
    assert ("packed" in fns) == kernel.cuda_path(q, layer.kv)


@pytest.mark.gpu
@DTYPES
@BITS
@PATHS
def test_reserved_steps_equal_the_plain_path_on_gpu(dtype, bits, min_rows, monkeypatch):
    """The pinned path at the Llama shape on the GPU: outputs of 300 steps (two key blocks) and the packed cache."""
    from kvbench.kernels import kivi as kernel

    monkeypatch.setattr(kernel, "CUDA_MIN_ROWS", min_rows)
    torch.manual_seed(6)
    B, Hq, H, D = 3, 32, 8, 128
    plain, pinned = (make(f"kivi:bits={bits}", Hq, H, D, dtype, "cuda") for _ in range(2))
    k, v = rand_kv(B, H, 1000, D, dtype, "cuda")
    q = torch.randn(B, Hq, 8, D, device="cuda", dtype=dtype)
    plain.prefill(q, k, v), pinned.prefill(q, k, v)
    pinned.reserve(300)
    assert pinned.pin.cuda == (min_rows == 0)
    for _ in range(300):
        q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype)
        k, v = rand_kv(B, H, 1, D, dtype, "cuda")
        torch.testing.assert_close(pinned.extend(q, k, v), plain.extend(q, k, v), atol=2e-2, rtol=2e-2)
    x, y = plain.kv, pinned.kv
    assert y.n == x.n == int(y.ndev) == 1300
    for name, rows in (("kq", x.nk), ("ks", x.nk // 32), ("km", x.nk // 32), ("vq", x.nv), ("vs", x.nv),
                       ("vm", x.nv), ("rk", 128), ("rv", 128)):
        assert torch.equal(getattr(x, name)[:, :, :rows], getattr(y, name)[:, :, :rows]), name
    with pytest.raises(ReservedRoomError):
        pinned.extend(q, k, v)


@pytest.mark.gpu
@BITS
def test_graph_replays_are_token_identical_to_eager_steps_on_gpu(bits):
    """32 steps of the tiny model over a 360-token prompt (crossing a key block at 384): the CUDA graph's tokens are
    the eager steps' tokens, and the reserved room is enforced at the end."""
    from test_graph_decode import tiny_model as graph_tiny_model

    from kvbench.decoding import real_prefill
    from kvbench.graph_decode import graph_decode, unsafe_reason

    model = graph_tiny_model(torch.bfloat16, "cuda")
    ids = torch.randint(0, 256, (2, 360), generator=torch.Generator().manual_seed(4)).cuda()
    a, nxt, _ = real_prefill(model, parse_method(f"kivi:bits={bits}"), ids)
    b, _, _ = real_prefill(model, parse_method(f"kivi:bits={bits}"), ids)
    assert unsafe_reason(b, torch.device("cuda")) is None
    eager, _ = graph_decode(model, a, nxt, 2, 30, graph=False, extra=0)
    graph, sg = graph_decode(model, b, nxt, 2, 30, graph=True, extra=0)
    assert graph.facts["decode_mode"] == "graph" and sg.graph is not None, graph.facts
    assert torch.equal(eager.tokens, graph.tokens)
    assert a.get_seq_length() == b.get_seq_length() == 360 + 32
    with pytest.raises(ReservedRoomError):
        sg.replay()


# --- inside a transformers model ---

def tiny_model():
    from transformers import AutoModelForCausalLM

    from test_bridge import tiny_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config()).eval()


def token_identical_to_full(spec: str):
    """On the tiny model, `spec` (set to drop and quantize nothing) generates the very tokens `full` does. Returns
    (model, prompt ids [2, 100], full's cache) for further checks."""
    from kvbench.bridge import attach, with_cache

    model = tiny_model()
    ids = torch.randint(0, 1000, (2, 100))
    full = attach(model, parse_method("full"))
    ref_out = model.generate(ids, **with_cache(model, full), max_new_tokens=8, do_sample=False)
    cache = attach(model, parse_method(spec))
    assert torch.equal(model.generate(ids, **with_cache(model, cache), max_new_tokens=8, do_sample=False), ref_out)
    return model, ids, full


def test_through_the_bridge_on_a_tiny_model():
    from kvbench.bridge import attach, with_cache

    model, ids, full = token_identical_to_full("kivi:residual=128")  # every token fits in the residual
    # quantized: prefill, decode steps, then a question chunk; it holds less than full
    cache = attach(model, parse_method("kivi:residual=32"))
    out = model.generate(ids, **with_cache(model, cache), max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 108) and cache.get_seq_length() == 107
    with torch.no_grad():
        logits = model(torch.randint(0, 1000, (2, 5)), **with_cache(model, cache)).logits
    assert torch.isfinite(logits).all() and cache.get_seq_length() == 112
    assert cache.nbytes() < full.nbytes()


def story_ids(tok) -> torch.Tensor:
    """A chat prompt of ~200 tokens: a short story repeated, then a question whose answer is not in it."""
    story = ("Anna lives in a small village by the sea. Every morning she walks her dog to the harbour, where the "
             "fishermen sell the night's catch. ") * 6
    return tok.apply_chat_template([{"role": "user", "content": story + "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]


@pytest.mark.slow
def test_generates_sensible_text_on_the_embedded_model(embedded):
    from kvbench.bridge import attach, with_cache

    model, tok = embedded
    ids = story_ids(tok)
    assert ids.shape[1] > 2 * 32  # long enough that keys and values are quantized
    for spec in ("kivi:residual=32", "kivi:bits=4,residual=32"):
        cache = attach(model, parse_method(spec))
        out = model.generate(ids, **with_cache(model, cache), max_new_tokens=16, do_sample=False)
        assert "Paris" in tok.decode(out[0, ids.shape[1]:]), spec


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits, R", [(2, 128), (4, 64)])
def test_cpu_working_copy_attends_exactly_as_dequantizing_everything(dtype, bits, R):
    """PackedKV.dense keeps the dequantized packed rows between calls on the CPU; over steps and chunks that pack new
    key blocks and values, attention through it equals attention over keys() and values() to the last bit."""
    from kvbench.attention import dense_attention

    torch.manual_seed(0)
    B, H, Hq, D = 2, 3, 9, 64
    kv = ref.PackedKV.empty(B, H, D, dtype, "cpu", bits, 32, R)
    kv.append(*(torch.randn(B, H, 517, D).to(dtype) for _ in range(2)))
    for step in range(2 * R + 40):
        T = 5 if step % 37 == 0 else 1
        q = torch.randn(B, Hq, T, D).to(dtype)
        k, v = (torch.randn(B, H, T, D).to(dtype) for _ in range(2))
        want = dense_attention(q, torch.cat([kv.keys(), k], 2), torch.cat([kv.values(), v], 2), causal=True)
        assert torch.equal(ref.attention_ref(q, kv, k, v), want), step
        kv.append(k, v)
    assert kv.dnk > 517 // R * R and kv.dnv > 517 - R  # rows packed during the steps were converted
    assert kv.nbytes() == sum(t.numel() * t.element_size() for t in kv.tensors())  # the copy is not in the layout
