"""Development timing of the self-indexing decode step against dense FlashAttention decode, one layer at
Llama-3.1-8B's attention shape (bf16). The published numbers come from `kvbench run kernels`; this script is for
iterating on the kernels: it prints one line per cell with per-stage medians, the floor and the speed-up.

    python benchmarks/selfindex_dev.py --contexts 32768,131072 --batches 1,8
    python benchmarks/selfindex_dev.py --sweep 32768x8x0.1,32768x1x0.1   # attend and select launch settings
"""

import argparse
import json
import sys

import torch

from kvbench import LayerSpec, parse_method
from kvbench.timing import bench, copy_bandwidth, l2_bytes


def graph_us(make_fns, name, per_copy_bytes):
    """Median per call of fns[name] over enough cache copies to defeat L2, back to back in one CUDA graph
    (kvbench.timing's graph mode; with too few copies it flushes L2 and times eager calls instead)."""
    n = max(1, min(16, -(-3 * l2_bytes() // max(per_copy_bytes, 1))))
    return bench([make_fns(i)[name] for i in range(n)], graph=True, set_bytes=per_copy_bytes).median_us


# (module, attribute overrides) per sweep point: selfindex_attend's paths and plans, then the select grid
ATTEND_SWEEP = [("cuda pps=%d" % n, dict(USE_CUDA=True, CUDA_ASYNC=True, CUDA_PROGRAMS_PER_SM=n))
                for n in (2, 3, 4, 6, 8, 12, 16)] + [
    ("cuda registers pps=%d" % n, dict(USE_CUDA=True, CUDA_ASYNC=False, CUDA_PROGRAMS_PER_SM=n)) for n in (3, 6)] + [
    ("triton", dict(USE_CUDA=False, FAST_DEQUANT=False)), ("triton ptx", dict(USE_CUDA=False, FAST_DEQUANT=True)),
    ("triton ptx pps=4", dict(USE_CUDA=False, FAST_DEQUANT=True, PROGRAMS_PER_SM=4)),
    ("triton ptx 128x8", dict(USE_CUDA=False, FAST_DEQUANT=True, BLOCK_N=128, NUM_WARPS=8))]
SELECT_SWEEP = (0, 2, 4, 8, 16, 32, 64)


def sweep(cells, dev, bw):
    """Per-stage graph medians of the decode step under each launch setting: one line per (cell, setting)."""
    from kvbench.kernels import selfindex as ops
    from kvbench.kernels import selfindex_attend as sa

    rows = []
    for cell in cells:
        T, B, budget = cell.split("x")
        T, B = int(T), int(B)
        spec = LayerSpec(15, 32, 32, 8, 128, torch.bfloat16, dev)
        g = torch.Generator(device=dev).manual_seed(0)
        k = (torch.randn(B, 8, T, 128, device=dev, generator=g) + torch.randn(128, device=dev, generator=g)).bfloat16()
        v = torch.randn(B, 8, T, 128, device=dev, generator=g).bfloat16()
        q = torch.randn(B, 32, 1, 128, device=dev, generator=g).bfloat16()
        ms = f"selfindex:budget={budget}"
        copies = []
        for _ in range(16):
            c = parse_method(ms).make_layer(spec)
            c.prefill(q, k, v)
            copies.append(c)
            nb = c.decode_bytes()
            if len(copies) * nb >= 3 * l2_bytes():
                break
        fns = [c.decode_fns(q) for c in copies]
        floor = nb / bw / 1e3
        saved = {n: getattr(sa, n) for n in ("USE_CUDA", "CUDA_ASYNC", "FAST_DEQUANT", "CUDA_PROGRAMS_PER_SM",
                                             "PROGRAMS_PER_SM", "BLOCK_N", "NUM_WARPS")}
        for label, over in ATTEND_SWEEP:
            for n, val in over.items():
                setattr(sa, n, val)
            try:
                t = bench([f["attend"] for f in fns], graph=True, set_bytes=nb, warmup_ms=5, rep_ms=20).median_us
            except Exception as e:  # a setting that fails is a finding, not the end of the sweep
                t = float("nan")
                print(f"  {label}: {type(e).__name__}: {str(e)[:200]}")
            for n, val in saved.items():
                setattr(sa, n, val)
            rows.append(dict(cell=cell, stage="attend", setting=label, us=t, floor_us=floor))
            print(f"{cell:16s} attend       {label:22s} {t:8.1f} us  (step floor {floor:.1f})", flush=True)
        for nb_sel in SELECT_SWEEP:
            ops.SELECT_BLOCKS = nb_sel
            t = bench([f["score_select"] for f in fns], graph=True, set_bytes=nb, warmup_ms=5, rep_ms=20).median_us
            ta = bench([f["attention"] for f in fns], graph=True, set_bytes=nb, warmup_ms=5, rep_ms=20).median_us
            ops.SELECT_BLOCKS = 0
            rows.append(dict(cell=cell, stage="score_select", setting=f"blocks={nb_sel}", us=t, step_us=ta,
                             floor_us=floor))
            print(f"{cell:16s} score_select blocks={nb_sel:<15d} {t:8.1f} us  step {ta:8.1f} us", flush=True)
        del copies, fns, k, v
        torch.cuda.empty_cache()
    return rows


def prefill_breakdown(dev):
    """Where the index-building time goes at 32K tokens, next to dense prefill attention."""
    from kvbench import attention
    from kvbench.kernels import selfindex as ops

    for B in (1, 4):
        T, H, D = 32768, 8, 128
        k = (torch.randn(B, H, T, D, device=dev) + torch.randn(D, device=dev)).bfloat16()
        v = torch.randn(B, H, T, D, device=dev).bfloat16()
        q = torch.randn(B, 32, T, D, device=dev).bfloat16()
        spec = LayerSpec(15, 32, 32, 8, 128, torch.bfloat16, dev)
        t = {}
        t["dense_prefill_attention"] = bench(lambda: attention.dense_attention(q, k, v, causal=True),
                                             rep_ms=300).median_us
        t["median_float_dim2"] = bench(lambda: k.float().median(dim=2)).median_us
        t["median_bf16_transposed"] = bench(lambda: k.transpose(2, 3).contiguous().median(dim=-1)).median_us
        t["kthvalue_bf16_transposed"] = bench(
            lambda: k.transpose(2, 3).contiguous().kthvalue((T + 1) // 2, dim=-1)).median_us
        t["mean"] = bench(lambda: k.float().mean(2)).median_us
        mu = ops.centre_stats(k, "median")
        t["chmax"] = bench(lambda: (k.float() - mu[:, :, None]).abs().amax(2)).median_us
        t["minmax"] = bench(lambda: torch.aminmax(k, dim=2)).median_us
        for m in ("full", "selfindex", "selfindex:centre=mean", "selfindex:setting=16+1"):
            t[f"prefill[{m}]"] = bench(lambda: parse_method(m).make_layer(spec).prefill(q, k, v), rep_ms=300).median_us
        print(f"B={B} T={T}: " + ", ".join(f"{k_}={v_ / 1e3:.2f}ms" for k_, v_ in t.items()), flush=True)
        del k, v, q
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--methods",
                    default="selfindex:budget=160;selfindex:budget=0.075;selfindex:setting=16+1,budget=160")
    ap.add_argument("--out", default=None)
    ap.add_argument("--prefill", action="store_true")
    ap.add_argument("--sweep", default=None, help="cells TxBxbudget,... : time the launch settings instead")
    a = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(device=dev)["copy_gbs"]
    print(f"copy bandwidth {bw:.0f} GB/s on {torch.cuda.get_device_name()}")
    if a.sweep:
        rows = sweep(a.sweep.split(","), dev, bw)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    rows = []
    for T in map(int, a.contexts.split(",")):
        for B in map(int, a.batches.split(",")):
            spec = LayerSpec(15, 32, 32, 8, 128, torch.bfloat16, dev)
            g = torch.Generator(device=dev).manual_seed(0)
            k = (torch.randn(B, 8, T, 128, device=dev, generator=g)
                 + torch.randn(128, device=dev, generator=g)).bfloat16()
            v = torch.randn(B, 8, T, 128, device=dev, generator=g).bfloat16()
            q = torch.randn(B, 32, 1, 128, device=dev, generator=g).bfloat16()
            full = parse_method("full").make_layer(spec)
            full.prefill(q, k, v)
            fb = full.decode_bytes()
            n_full = max(0, min(15, -(-3 * l2_bytes() // fb) - 1))
            fulls = [full] + [parse_method("full").make_layer(spec) for _ in range(n_full)]
            for f in fulls[1:]:
                f.prefill(q, k, v)
            t_full_eager = bench(full.decode_fns(q)["attention"]).median_us
            t_full = graph_us(lambda i: fulls[i].decode_fns(q), "attention", fb)
            del full, fulls
            for ms in a.methods.split(";"):
                lay = parse_method(ms).make_layer(spec)
                torch.cuda.synchronize()
                t0 = torch.cuda.Event(enable_timing=True); t1 = torch.cuda.Event(enable_timing=True)
                t0.record(); lay.prefill(q, k, v); t1.record(); torch.cuda.synchronize()
                fns = lay.decode_fns(q)
                eager = bench(fns["attention"]).median_us
                nb = lay.decode_bytes()
                copies = [lay]
                for _ in range(max(0, min(15, -(-3 * l2_bytes() // nb) - 1))):
                    c = parse_method(ms).make_layer(spec)
                    c.prefill(q, k, v)
                    copies.append(c)
                st = {name: graph_us(lambda i: copies[i].decode_fns(q), name, nb) for name in fns}
                row = dict(method=ms, T=T, B=B, full_us=t_full, full_floor_us=fb / bw / 1e3, floor_us=nb / bw / 1e3,
                           speedup=t_full / st["attention"], prefill_ms=t0.elapsed_time(t1),
                           **{f"{k}_us": v for k, v in st.items()},
                           bytes_per_token=lay.nbytes() / (B * 8 * T))
                row["eager_us"], row["full_eager_us"] = eager, t_full_eager
                rows.append(row)
                print(f"{ms:38s} T={T:6d} B={B:2d} graph: attn {st['attention']:7.1f}us (score+sel "
                      f"{st['score_select']:6.1f}, attend {st['attend']:6.1f}) floor {row['floor_us']:6.1f} | full "
                      f"{t_full:7.1f} (floor {row['full_floor_us']:7.1f}) x{row['speedup']:5.1f} | eager {eager:6.1f} "
                      f"vs {t_full_eager:7.1f} | prefill+index {row['prefill_ms']:.1f}ms", flush=True)
                del lay, copies
            del k, v
            torch.cuda.empty_cache()
    if a.prefill:
        prefill_breakdown(dev)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
