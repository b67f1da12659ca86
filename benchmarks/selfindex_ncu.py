"""Run the self-indexing decode step a few times for Nsight Compute (development tool), e.g.
    ncu --clock-control none --set basic -k regex:'score|select|attend' -c 3 \
        python benchmarks/selfindex_ncu.py 32768 8 160"""
import sys

import torch

from kvbench import LayerSpec, parse_method

T, B, budget = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dev = torch.device("cuda")
H, D = 8, 128
k = (torch.randn(B, H, T, D, device=dev) + torch.randn(D, device=dev)).bfloat16()
lay = parse_method(f"selfindex:budget={budget}").make_layer(LayerSpec(0, 1, 32, H, D, torch.bfloat16, dev))
lay.prefill(torch.randn(B, 32, 1, D, device=dev, dtype=torch.bfloat16), k, k)
q = torch.randn(B, 32, 1, D, device=dev, dtype=torch.bfloat16)
fn = lay.decode_fns(q)["attention"]
for _ in range(3):
    fn()
torch.cuda.synchronize()
