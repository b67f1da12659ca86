"""pytest-benchmark over the decode attention the kernel suite times, at a few sizes, so regressions show up in
`pytest benchmarks/test_bench_kernels.py --benchmark-json=bench.json` and `--benchmark-compare`. GPU only.

Two views of each case:
- pytest-benchmark's own statistics time one *round* = K back-to-back calls rotating among cache copies (> 3x L2 in
  all) and one device sync, K chosen so a round lasts about a millisecond and the sync is amortised; divide by
  `extra_info["calls_per_round"]` for a per-call wall time.
- `extra_info` carries the suite's measurement of the same call: the CUDA-event median with L2 evicted before each
  call (`time_us`), its floor (`floor_us` = decode bytes / copy bandwidth measured in the same session) and the GB/s
  achieved; the report reads these.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvbench.models import SHAPES
from kvbench.records import _clean
from kvbench.registry import available_methods, parse_method
from kvbench.cache_timing import build_copies, bytes_per_step, layer_spec
from kvbench.synthetic import Q_TAIL
from kvbench.timing import bench, copy_bandwidth, floor_us

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (a kvbench dependency)")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = "llama-3.1-8b"
SIZES = [(4096, 1), (32768, 1), (32768, 8), (131072, 1)]  # (context, batch)
METHODS = list(available_methods())


@pytest.fixture(scope="module")
def copy_gbs() -> float:
    return copy_bandwidth()["copy_gbs"]


@pytest.mark.parametrize("context, batch", SIZES, ids=[f"{c // 1024}K-b{b}" for c, b in SIZES])
@pytest.mark.parametrize("method", METHODS)
def test_decode_attention(benchmark, method, context, batch, copy_gbs):
    m = parse_method(method)
    shape = SHAPES[SHAPE]
    spec = layer_spec(shape, shape.n_layers // 2, torch.bfloat16, torch.device("cuda"))
    copies = build_copies(m, spec, batch, context, rotate=True, q_tail=Q_TAIL, seed=0)
    q = torch.randn(batch, spec.n_heads, 1, spec.head_dim, device="cuda", dtype=spec.dtype)
    fns = [c.decode_fns(q).get("attention") for c in copies]
    if fns[0] is None:
        pytest.skip(f"{method} has no decode_fns; the kernel suite times its extend() instead")
    step_bytes, _ = bytes_per_step(copies[0])
    t = bench(fns, flush=True)  # the suite's number: events, L2 evicted before each call
    k = max(1, math.ceil(1000.0 / t.median_us))

    def round_of_calls():
        for i in range(k):
            fns[i % len(fns)]()
        torch.cuda.synchronize()

    benchmark.group = f"decode {SHAPE} {context // 1024}K x {batch}"
    benchmark.extra_info.update(
        method=m.label(), shape=SHAPE, context=context, batch=batch, calls_per_round=k, copies=len(copies),
        time_us=t.median_us, p20_us=t.p20_us, p80_us=t.p80_us, floor_us=floor_us(step_bytes, copy_gbs),
        decode_bytes=step_bytes, bandwidth_gbs=step_bytes / (t.median_us * 1e-6) / 1e9, copy_gbs=copy_gbs,
        info=_clean(copies[0].info()))  # JSON-safe, as in records
    benchmark.pedantic(round_of_calls, rounds=30, warmup_rounds=3, iterations=1)
