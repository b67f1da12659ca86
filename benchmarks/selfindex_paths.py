"""Fused one-launch decode against the split path (score+select, attend), with ablations of the fused kernel, under
CUDA graphs with L2-defeating rotation. Development tool."""
import torch

from kvbench import LayerSpec, parse_method
from kvbench.kernels import selfindex as ops
from selfindex_dev import graph_us

dev = torch.device("cuda")
for T, B in ((4096, 1), (32768, 1), (32768, 8), (131072, 1), (131072, 8)):
    H, D = 8, 128
    spec = LayerSpec(0, 1, 32, H, D, torch.bfloat16, dev)
    k = (torch.randn(B, H, T, D, device=dev) + torch.randn(D, device=dev)).bfloat16()
    q = torch.randn(B, 32, 1, D, device=dev, dtype=torch.bfloat16)
    first = parse_method("selfindex:budget=160").make_layer(spec)
    first.prefill(q, k, k)
    nb = first.decode_bytes()
    lays = [first] + [parse_method("selfindex:budget=160").make_layer(spec) for _ in range(max(0, min(7, -(-3 * 50 * 2**20 // nb) - 1)))]
    for lay in lays[1:]:
        lay.prefill(q, k, k)

    def fused(i, ablate):
        lay = lays[i]
        q1 = q[:, :, 0]
        lo, hi = lay.selectable()
        K = lay.n_select()
        ws = ops.Workspace.get(dev)
        _, _, ctr = ws.select_buffers(B * H, lay.cap)
        cand, cand_n = ws.candidates(B * H, hi - lo, dev)
        idx = torch.empty(B, H, K, dtype=torch.int32, device=dev)
        out = torch.empty(B, 32, D, dtype=q.dtype, device=dev)
        return {"x": lambda: ops.cuda_ops().decode(q1, lay.cb, lay.signs, lay.excl, lo, hi, K, lay.fk, lay.fv, lay.fpos,
                                                   lay.kmag, lay.kscale, lay.vq, lay.vscale, lay.chmax, lay.mu, lay.kfull,
                                                   lay.vfull, ctr, cand, cand_n, idx, out, ablate)}
    res = {}
    for name, ab in (("fused", 0), ("fused-no-attn", 2), ("fused-score-only", 1)):
        res[name] = graph_us(lambda i: fused(i, ab), "x", nb)
    ops.FUSED = False
    res["split"] = graph_us(lambda i: lays[i].decode_fns(q), "attention", nb)
    res["split-attend"] = graph_us(lambda i: lays[i].decode_fns(q), "attend", nb)
    ops.FUSED = True
    print(f"T={T} B={B}: " + ", ".join(f"{k_} {v_:.1f}us" for k_, v_ in res.items()), flush=True)
    del lays, k
    torch.cuda.empty_cache()
