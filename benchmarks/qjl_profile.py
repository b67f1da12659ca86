"""One qjl decode step at a real shape, for a profiler to look at (ncu, torch.profiler):

    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        --kernel-name regex:_attend_kernel --launch-count 1 python benchmarks/qjl_profile.py --context 32768 --batch 8

Builds one Llama-3.1-8B attention layer (32 query heads, 8 KV heads, 128 channels, bf16) of the default qjl method,
prefills it with random keys and values, runs two decode steps (the first compiles) and prints the step time."""

from __future__ import annotations

import argparse

import torch

from kvbench import LayerSpec, parse_method


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--method", default="qjl")
    a = ap.parse_args()
    spec = LayerSpec(16, 32, 32, 8, 128, torch.bfloat16, torch.device("cuda"))
    layer = parse_method(a.method).make_layer(spec)
    B, T = a.batch, a.context
    k, v = (torch.randn(B, 8, T, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    layer.prefill(torch.randn(B, 32, 16, 128, device="cuda", dtype=torch.bfloat16), k, v)
    del k, v
    fns = layer.decode_fns(torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.bfloat16))
    for name in ("attention", "attention"):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fns[name]()
        e.record()
        torch.cuda.synchronize()
        print(f"{a.method} {name} {T} x {B}: {s.elapsed_time(e) * 1e3:.1f} us (eager, one call)", flush=True)


if __name__ == "__main__":
    main()
