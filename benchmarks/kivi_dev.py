"""Development check of KIVI decode attention (kernels/kivi.py) on a GPU: parity against the PyTorch reference and a
timing against full at Llama-3.1-8B's attention shape; --sweep also times launch configurations. The published numbers
come from `kvbench run kernels`.

    python benchmarks/kivi_dev.py --contexts 8192,32768 --batches 1,8 [--sweep]
"""

import argparse
import itertools

import torch
import triton

from kvbench import LayerSpec, parse_method
from kvbench.kernels.kivi import Decoder, plan
from kvbench.kernels.kivi_ref import attention_ref
from kvbench.timing import bench, copy_bandwidth, floor_us


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
    ap.add_argument("--device", default="cuda", help="cuda; or cpu under TRITON_INTERPRET=1 (slow: a smoke test)")
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu under TRITON_INTERPRET=1)")
    Hq, H, D = 32, 8, 128
    spec = LayerSpec(0, 32, Hq, H, D, dtype, dev)
    copy_gbs = copy_bandwidth(device=dev)["copy_gbs"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)"
    print(f"{name} | torch {torch.__version__} | triton {triton.__version__} | "
          f"copy {copy_gbs:.0f} GB/s | Hq {Hq}, Hkv {H}, D {D}, {args.dtype}, kivi {args.bits}-bit")
    print(f"{'context':>8} {'batch':>5} {'full us':>9} {'kivi us':>9} {'speedup':>7} {'floor us':>8} {'GB/s':>6} "
          f"{'split us':>8} {'combine':>7} {'max err':>8}")
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
        nbytes = kivi.decode_bytes()
        print(f"{T:>8} {B:>5} {t_full:>9.1f} {t_kivi:>9.1f} {t_full / t_kivi:>6.2f}x "
              f"{floor_us(nbytes, copy_gbs):>8.1f} {nbytes / t_kivi / 1e3:>6.0f} {t_split:>8.1f} {t_comb:>7.1f} "
              f"{err:>8.1e}")
        if args.sweep:
            results = []
            grid = itertools.product((64, 128), (4, 8), (2, 3), (None, 128), (None, 0.5, 2.0))
            for bn, nw, ns, reg, sp in grid:
                base = plan(kivi.kv, B, bn)[2] - 1
                splits = None if sp is None else max(1, int(base * sp))
                cfg = dict(block_n=bn, num_warps=nw, num_stages=ns, maxnreg=reg, splits=splits)
                try:
                    d = Decoder(q, kivi.kv, **cfg)
                    results.append((bench(d, device=dev).median_us, d.n_parts - 1, cfg))
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for this configuration
                    print(f"    {cfg}: {type(e).__name__}: {str(e)[:80]}")
            for t, s, cfg in sorted(results, key=lambda r: r[0])[:5]:
                print(f"    {t:9.1f} us  {cfg} ({s} splits)")
        del full, kivi, dec
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
