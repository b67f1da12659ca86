"""Where a RAG method's time to the first token goes, on a GPU: each method's TTFT (median of 3 warm runs) with the
masked attention on SDPA with a dense mask, on FlexAttention and on `auto` (kvbench/rag.py), their first-token
logits against each other, and a torch.profiler table of one warm run. The published numbers come from `kvbench run
rag`.

    python benchmarks/rag_profile.py [--methods recompute,reuse,cacheblend,samkv] [--docs 8] [--doc-tokens 2048]
"""

import argparse
import statistics
import time

import torch

from kvbench import rag
from kvbench.models import load_model
from kvbench.rag_tasks import make_instance
from kvbench.timing import sync


def ttft(model, method, inst, stored, n: int = 3) -> tuple[float, torch.Tensor]:
    times = []
    for _ in range(n + 1):  # the first run warms (compiles, loads kernels)
        sync(model.device)
        t0 = time.perf_counter()
        _, logits, _ = method.first_token(rag.Scene(model, inst.prompt, stored))
        logits.argmax(-1).tolist()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), logits.float()


def profile(model, method, inst, stored, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        method.first_token(rag.Scene(model, inst.prompt, stored))
        sync(model.device)
    events = p.key_averages()
    phases = [e for e in events if e.key.startswith("rag.")]  # record_function ranges: compose, passes, restrict
    calls = {e.key: e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaStreamSynchronize",
                                                        "aten::item")}
    print("  phases (host ms / device ms):", ", ".join(f"{e.key} {e.cpu_time_total / 1e3:.1f}/"
                                                      f"{e.device_time_total / 1e3:.1f}" for e in phases))
    print("  calls:", calls)
    print(events.table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60))
    print("  by CPU total (rag.forward[n] rows: one pass of n tokens through the model):")
    print(events.table(sort_by="cpu_time_total", row_limit=top + 8, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="recompute,reuse,cacheblend,samkv")
    ap.add_argument("--model", default="synthetic:llama-3.1-8b")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=2048)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--kernels", default="sdpa,flex,auto", help="masked-attention kernels to time (auto: profiled)")
    ap.add_argument("--device", default="cuda", help="cpu: a check of the script itself (small models)")
    a = ap.parse_args()
    model, tok = load_model(a.model, device=a.device)
    inst = make_instance(tok, "synthetic", a.docs, a.doc_tokens, 0, vocab=model.config.get_text_config().vocab_size)
    with torch.inference_mode():
        stored = rag.store_documents(model, inst.prompt)
        rows = []
        for name in a.methods.split(","):
            method, res = rag.parse_rag(name), {}
            for kernel in a.kernels.split(",") + ["auto"] * ("auto" not in a.kernels.split(",")):
                rag.MASKED_KERNEL = kernel
                res[kernel] = ttft(model, method, inst, stored)
            base = res.get("sdpa", res["auto"])
            err = ((res["auto"][1] - base[1]).norm() / base[1].norm()).item()
            same = bool((res["auto"][1].argmax(-1) == base[1].argmax(-1)).all())
            nan = (float("nan"), None)
            rows.append((name, res.get("sdpa", nan)[0], res.get("flex", nan)[0], res["auto"][0], err, same))
            print(f"== {name}: TTFT " + ", ".join(f"{k} {v[0]:.4f} s" for k, v in res.items())
                  + f" (auto vs sdpa: logits rel err {err:.2e}, same first token {same})", flush=True)
            rag.MASKED_KERNEL = "auto"  # the default, profiled
            profile(model, method, inst, stored, a.top)
    rec = next((r for r in rows if r[0] == "recompute"), None)
    gpu = torch.cuda.get_device_name() if model.device.type == "cuda" else "CPU"
    print(f"\n{gpu}, {a.docs} docs x {a.doc_tokens} tokens, {a.model}")
    print(f"{'method':<14}{'sdpa s':>9}{'flex s':>9}{'auto s':>9}{'auto/recompute':>16}{'auto err':>12}{'same':>6}")
    for name, s, f, a_s, err, same in rows:
        ratio = a_s / rec[3] if rec else float("nan")
        print(f"{name:<14}{s:>9.4f}{f:>9.4f}{a_s:>9.4f}{ratio:>16.3f}{err:>12.2e}{same!s:>6}")


if __name__ == "__main__":
    main()
