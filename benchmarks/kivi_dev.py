"""Development check of KIVI decode attention (kernels/kivi.py) on a GPU: parity against the PyTorch reference and a
timing against full at Llama-3.1-8B's attention shape; --sweep also times launch configurations. The published numbers
come from `kvbench run kernels`.

    python benchmarks/kivi_dev.py --contexts 8192 32768 --batches 1 8 [--sweep] [--memory 131072x64]
    python benchmarks/kivi_dev.py --parity      # both paths against the reference over many shapes, then exit
    compute-sanitizer --tool memcheck python benchmarks/kivi_dev.py --sanitize   # (and --tool racecheck)
"""

import argparse
import itertools

import torch
import triton

from kvbench import LayerSpec, parse_method
from kvbench.kernels.kivi import Decoder, _sm_count, cuda_path, decode_attention
from kvbench.kernels.kivi_ref import PackedKV, attention_ref
from kvbench.synthetic import synthetic_kv
from kvbench.timing import bench, copy_bandwidth, floor_us

# (block_n, num_warps, num_stages, maxnreg) timed by --sweep, each with the wave plan and with other range counts
CONFIGS = [(64, 4, 2, 128), (64, 4, 3, 128), (64, 4, 4, 128), (64, 4, 2, None), (32, 4, 2, 128), (32, 2, 2, 128),
           (32, 4, 3, 128), (128, 8, 2, 128), (128, 8, 3, 128), (64, 8, 2, 128), (128, 4, 2, 128), (128, 4, 2, None)]


def old_splits(nv: int, B: int, H: int, sms: int, block_n: int = 64) -> int:
    """The ranges per head of the rule before the wave plan: at least 256 tokens, about 8 programs per SM."""
    st = -(-max(256, -(-nv * B * H // (8 * sms))) // block_n) * block_n
    return -(-nv // st)


def sanitize_run(dev: torch.device) -> None:
    """Every KIVI kernel once or more at the parity tests' smallest shapes, for compute-sanitizer: split + combine
    (default plan and 3 ranges, with and without the new token), the fused writer across a key block, and the pinned
    (capture-safe) steps; raises if an output leaves the reference's tolerance."""
    from kvbench.kernels import kivi as K
    from kvbench.kernels import kivi_ref as ref

    torch.manual_seed(0)
    for bits in (2, 4):
        for B, Hq, H, D, T in ((1, 8, 8, 64, 333), (2, 32, 8, 128, 127), (3, 8, 2, 64, 300)):
            spec = LayerSpec(0, 1, Hq, H, D, torch.bfloat16, dev)
            kv = ref.PackedKV.empty(B, H, D, torch.bfloat16, dev, bits, 32, 128)
            k, v = (torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
            kv.append(k, v)
            q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
            kn, vn = (torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
            err = 0.0
            for args in ((), (kn, vn)):
                for cfg in ({}, dict(splits=3)):
                    out = K.decode_attention(q, kv, *args, **cfg)
                    err = max(err, (out.float() - ref.attention_ref(q, kv, *args).float()).abs().max().item())
            for _ in range(130):  # quantizes a value every step, a key block at the next multiple of 128
                K.append_one(kv, kn, vn)
            impl = ",impl=triton" if dev.type == "cpu" else ""  # the interpreter (a CPU smoke test of this mode)
            layer = parse_method(f"kivi:bits={bits}{impl}").make_layer(spec)
            layer.prefill(q, k, v)
            layer.reserve(130)
            for _ in range(130):
                layer.extend(q, kn, vn)
            err = max(err, (layer.kv.keys().float() - kv.keys().float()).abs().max().item())  # the pinned writer
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            print(f"sanitize {bits}-bit B {B} Hq {Hq} Hkv {H} D {D} T {T}: max error {err:.1e}", flush=True)
            if err > 2e-2:
                raise SystemExit(f"kivi kernels disagree with the reference by {err}")


# B, Hq, Hkv, D, T of --parity: odd lengths, batch > 1, GQA 1/4/8, head_dim 64/128, T below the residual
PARITY_SHAPES = [(1, 8, 8, 64, 333), (3, 8, 2, 64, 1001), (2, 32, 8, 128, 4097), (1, 16, 2, 128, 2049),
                 (4, 4, 1, 128, 777), (2, 32, 8, 128, 127), (1, 32, 8, 128, 12345), (2, 8, 1, 64, 5555)]


def parity_run(dev: torch.device) -> None:
    """Every shape of PARITY_SHAPES x bf16/fp16 x 2/4 bits through the CUDA path (default plan and 5 parts) and the
    Triton path, with and without the new token, against kivi_ref.attention_ref; then 140 pinned steps of each bit
    width (a key block crossed) against the PyTorch path. Prints one line per case; raises on an error above 2e-2."""
    from kvbench.kernels import kivi as K

    worst = 0.0
    for (B, Hq, H, D, T), dtype, bits in itertools.product(PARITY_SHAPES, (torch.bfloat16, torch.float16), (2, 4)):
        torch.manual_seed(B + Hq + H + D + T + bits)
        kv = PackedKV.empty(B, H, D, dtype, dev, bits, 32, 128)
        k = torch.randn(B, H, T, D, device=dev) * torch.linspace(0.5, 3, D, device=dev) + \
            torch.linspace(-4, 4, D, device=dev)
        kv.append(k.to(dtype), torch.randn(B, H, T, D, device=dev, dtype=dtype))
        q = torch.randn(B, Hq, 1, D, device=dev, dtype=dtype)
        kn, vn = (torch.randn(B, H, 1, D, device=dev, dtype=dtype) for _ in range(2))
        errs = {}
        for args in ((), (kn, vn)):
            want = attention_ref(q, kv, *args).float()
            for name, cfg in (("cuda", dict(path="cuda")), ("cuda/5", dict(path="cuda", splits=5)),
                              ("triton", dict(path="triton"))):
                out = decode_attention(q, kv, *args, **cfg).float()
                errs[name] = max(errs.get(name, 0.0), (out - want).abs().max().item())
        worst = max(worst, *errs.values())
        print(f"parity B {B} Hq {Hq} Hkv {H} D {D} T {T} {str(dtype)[6:]} {bits}-bit (cuda path: "
              f"{cuda_path(q, kv)}): " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()), flush=True)
    K.CUDA_MIN_ROWS = 0  # the pinned steps below are too small for the CUDA path's threshold
    for bits in (2, 4):
        spec = LayerSpec(0, 1, 32, 8, 128, torch.bfloat16, dev)
        a, b = (parse_method(f"kivi:bits={bits}{impl}").make_layer(spec) for impl in ("", ",impl=torch"))
        k, v = (torch.randn(3, 8, 1000, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
        q = torch.randn(3, 32, 8, 128, device=dev, dtype=torch.bfloat16)
        a.prefill(q, k, v), b.prefill(q, k, v)
        a.reserve(140)
        err = 0.0
        for _ in range(140):
            q = torch.randn(3, 32, 1, 128, device=dev, dtype=torch.bfloat16)
            k, v = (torch.randn(3, 8, 1, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
            err = max(err, (a.extend(q, k, v).float() - b.extend(q, k, v).float()).abs().max().item())
        worst = max(worst, err)
        print(f"parity pinned {bits}-bit, 140 steps from 1000 tokens (cuda path: {a.pin.cuda}): max error {err:.1e}")
    print(f"parity worst {worst:.1e}: {'ok' if worst <= 2e-2 else 'FAILED'}", flush=True)
    if worst > 2e-2:
        raise SystemExit(1)


def memory_check(spec, context: int, batch: int, bits: int) -> None:
    """Peak memory of a kivi prefill beyond its inputs, next to the bytes of full's cache at the same cell (the
    suites' synthetic fill): kivi must fit wherever full does."""
    dev = spec.device
    gen = torch.Generator(device=dev).manual_seed(0)
    k, v = synthetic_kv(batch, spec.n_kv_heads, context, spec.head_dim, spec.dtype, dev, gen)
    q = torch.randn(batch, spec.n_heads, 16, spec.head_dim, generator=gen, device=dev, dtype=spec.dtype)
    full_bytes = 2 * k.numel() * k.element_size()
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    layer = parse_method(f"kivi:bits={bits}").make_layer(spec)
    layer.prefill(q, k, v)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    print(f"memory {context} x {batch} kivi:bits={bits}: peak beyond inputs {peak / 2**30:.2f} GiB (cache "
          f"{layer.nbytes() / 2**30:.2f} GiB, transient {(peak - layer.nbytes()) / 2**30:.2f} GiB); full's cache "
          f"{full_bytes / 2**30:.2f} GiB")


def main() -> None:
    """Parity and a quick timing of KIVI decode attention against full (dense FlashAttention-class) decode, at
    Llama-3.1-8B's attention shape (32 query heads, 8 KV heads, head dim 128). The real benchmark is `kvbench run
    kernels`; this is the kernel author's check. --sweep also times a grid of launch configurations."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--bits", type=int, default=2, choices=(2, 4))
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--sweep", action="store_true", help="also time block_n x num_warps x num_stages x splits")
    ap.add_argument("--sanitize", action="store_true",
                    help="only run every kernel at small shapes (under compute-sanitizer), then exit")
    ap.add_argument("--split-sweep", action="store_true", help="also time the CUDA path at other part counts")
    ap.add_argument("--parity", action="store_true", help="only check both paths against the reference, then exit")
    ap.add_argument("--memory", nargs="*", default=[], metavar="TxB",
                    help="peak prefill memory of kivi against full's cache bytes at these cells, e.g. 131072x64")
    ap.add_argument("--device", default="cuda", help="cuda; or cpu under TRITON_INTERPRET=1 (slow: a smoke test)")
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu under TRITON_INTERPRET=1)")
    if args.sanitize:
        return sanitize_run(dev)
    if args.parity:
        return parity_run(dev)
    Hq, H, D = 32, 8, 128
    spec = LayerSpec(0, 32, Hq, H, D, dtype, dev)
    copy_gbs = copy_bandwidth(device=dev)["copy_gbs"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)"
    print(f"{name} | torch {torch.__version__} | triton {triton.__version__} | "
          f"copy {copy_gbs:.0f} GB/s | Hq {Hq}, Hkv {H}, D {D}, {args.dtype}, kivi {args.bits}-bit")
    for cell in args.memory:
        T, B = map(int, cell.split("x"))
        memory_check(spec, T, B, args.bits)
        torch.cuda.empty_cache()
    print(f"{'context':>8} {'batch':>5} {'full us':>9} {'kivi us':>9} {'speedup':>7} {'floor us':>8} {'GB/s':>6} "
          f"{'split us':>8} {'combine':>7} {'max err':>8} {'triton us':>9}")
    for T, B in itertools.product(args.contexts, args.batches):
        torch.manual_seed(0)
        k = torch.randn(B, H, T, D, device=dev, dtype=dtype)
        v = torch.randn(B, H, T, D, device=dev, dtype=dtype)
        q = torch.randn(B, Hq, 1, D, device=dev, dtype=dtype)
        full = parse_method("full").make_layer(spec)
        full.prefill(q, k, v)
        kivi = parse_method(f"kivi:bits={args.bits}").make_layer(spec)
        kivi.prefill(q, k, v)
        del k, v
        dec = Decoder(q, kivi.kv)
        err = (dec().float() - attention_ref(q, kivi.kv).float()).abs().max().item()
        t_full = bench(full.decode_fns(q)["attention"], device=dev).median_us
        t_kivi = bench(dec, device=dev).median_us
        t_split = bench(dec.split, device=dev).median_us
        t_comb = bench(dec.combine, device=dev).median_us
        t_triton = bench(Decoder(q, kivi.kv, path="triton"), device=dev).median_us  # the path before the CUDA one
        nbytes = kivi.decode_bytes()
        print(f"{T:>8} {B:>5} {t_full:>9.1f} {t_kivi:>9.1f} {t_full / t_kivi:>6.2f}x "
              f"{floor_us(nbytes, copy_gbs):>8.1f} {nbytes / t_kivi / 1e3:>6.0f} {t_split:>8.1f} {t_comb:>7.1f} "
              f"{err:>8.1e} {t_triton:>9.1f}")
        old = Decoder(q, kivi.kv, splits=old_splits(kivi.kv.nv, B, H, _sm_count(dev)))
        t_old = bench(old, device=dev).median_us
        print(f"    wave plan: {dec.n_parts - 1} ranges of {dec.split_tokens} tokens per head, {dec.resident} programs "
              f"per SM (compiled kernel); the old rule's {old.n_parts - 1} ranges of {old.split_tokens}: "
              f"{t_old:.1f} us")
        if args.split_sweep and dec.cuda:  # the CUDA path's parts per head around the wave plan's choice
            times = {sp: bench(Decoder(q, kivi.kv, splits=sp), device=dev, warmup_ms=5, rep_ms=20).median_us
                     for sp in sorted({1, 2, 4, 8, 16, 32, 64, dec.n_parts - 1})}
            print("    cuda parts per head: " + ", ".join(f"{sp} {t:.1f} us" for sp, t in times.items()))
        if args.sweep:
            results = []
            sms = _sm_count(dev)
            for bn, nw, ns, reg in CONFIGS:
                base = dict(block_n=bn, num_warps=nw, num_stages=ns, maxnreg=reg)
                try:
                    d0 = Decoder(q, kivi.kv, **base)
                    counts = {None, old_splits(kivi.kv.nv, B, H, sms, bn), max(1, (d0.n_parts - 1) // 2),
                              2 * (d0.n_parts - 1)}
                    for sp in counts:
                        d = d0 if sp is None else Decoder(q, kivi.kv, splits=sp, **base)
                        t = bench(d, device=dev, warmup_ms=5, rep_ms=20).median_us
                        results.append((t, d.n_parts - 1, dict(base, splits=sp), d0.resident))
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for this configuration
                    print(f"    {base}: {type(e).__name__}: {str(e)[:80]}")
            for t, s, cfg, res in sorted(results, key=lambda r: r[0])[:8]:
                print(f"    {t:9.1f} us  {cfg} ({s} ranges, {res} per SM)")
        del full, kivi, dec
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
