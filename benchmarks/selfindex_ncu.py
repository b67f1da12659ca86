"""Run the self-indexing decode step a few times at 32K x 8 for Nsight Compute (development tool):
    ncu --clock-control none --set basic -k regex:"attend|score" -c 4 python benchmarks/selfindex_ncu.py"""
import torch

from kvbench import LayerSpec, parse_method

dev = torch.device("cuda")
B, H, T, D = 8, 8, 32768, 128
k = (torch.randn(B, H, T, D, device=dev) + torch.randn(D, device=dev)).bfloat16()
for m in ("selfindex:budget=0.075", "selfindex:budget=160"):
    lay = parse_method(m).make_layer(LayerSpec(0, 1, 32, H, D, torch.bfloat16, dev))
    lay.prefill(torch.randn(B, 32, 1, D, device=dev, dtype=torch.bfloat16), k, k)
    q = torch.randn(B, 32, 1, D, device=dev, dtype=torch.bfloat16)
    fn = lay.decode_fns(q)["attention"]
    for _ in range(2):
        fn()
torch.cuda.synchronize()
