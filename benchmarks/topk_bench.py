"""Time the device top-k (kernels/topk_select.py) on its three paths (the CUDA kernel, Triton's one program per row,
Triton's split rows) against torch.topk at the selecting methods' shapes,
each call inside a CUDA graph (as a captured decode step runs it), after checking both paths against the reference.

    python benchmarks/topk_bench.py --out results/topk.jsonl

Rows are B x Hkv (Llama-3.1-8B: 8 KV heads); N is the tokens (doublesparse) or the pages of 16 (quest); k 10% of N.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import kvbench.kernels.topk_select as ts
from kvbench.timing import copy_bandwidth

SHAPES = [(8, 2048), (64, 2048), (8, 8192), (64, 8192), (8, 32768), (64, 32768), (512, 32768), (8, 131072),
          (64, 131072)]


def graph_us(fn, reps: int = 20, replays: int = 20) -> float:
    """Median microseconds of one fn call, fn captured `reps` times in one graph and the graph replayed."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


PATHS = ("cuda", "one_program", "split")


def with_path(path: str, scores, k):
    """topk_select forced onto one path."""
    old, old_env = ts.SPLIT_MIN, os.environ.get("KVBENCH_TOPK")
    ts.SPLIT_MIN = 0 if path == "split" else 1 << 62
    os.environ["KVBENCH_TOPK"] = "cuda" if path == "cuda" else "triton"
    try:
        return ts.topk_select(scores, k)
    finally:
        ts.SPLIT_MIN = old
        os.environ["KVBENCH_TOPK"] = old_env or "triton"


def torch_topk(scores, k):
    """What a PyTorch user would write: torch.topk, then the indices sorted ascending (ties not stable)."""
    return scores.topk(k, dim=-1, sorted=False).indices.sort(-1).values


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/topk.jsonl")
    args = ap.parse_args()
    gbs = copy_bandwidth()["copy_gbs"]
    rows_out = []
    for rows, n in SHAPES:
        k = max(1, n // 10)
        scores = torch.randn(rows, n, device="cuda")
        want = ts.topk_ref(scores, k)
        rec = {"rows": rows, "n": n, "k": k, "floor_us": rows * (n * 4 + k * 4) / gbs / 1e3, "copy_gbs": gbs}
        for p in PATHS:
            rec[f"{p}_ok"] = bool(torch.equal(with_path(p, scores, k), want))
            rec[f"{p}_us"] = graph_us(lambda p=p: with_path(p, scores, k))
        rec.update(torch_topk_us=graph_us(lambda: torch_topk(scores, k)), gpu=torch.cuda.get_device_name())
        rows_out.append(rec)
        print(json.dumps(rec), flush=True)
    with open(args.out, "w") as f:
        for r in rows_out:
            f.write(json.dumps(r) + "\n")
    print(f"{'rows':>5} {'N':>7} {'k':>6} {'cuda us':>8} {'one-prog us':>11} {'split us':>9} {'torch us':>9} "
          f"{'floor us':>8} ok")
    for r in rows_out:
        print(f"{r['rows']:5d} {r['n']:7d} {r['k']:6d} {r['cuda_us']:8.1f} {r['one_program_us']:11.1f} "
              f"{r['split_us']:9.1f} {r['torch_topk_us']:9.1f} {r['floor_us']:8.2f} "
              f"{all(r[f'{p}_ok'] for p in PATHS)}")


if __name__ == "__main__":
    main()
