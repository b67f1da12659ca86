"""Capture a model's real post-RoPE queries, keys and values per layer, through the bridge (no hooks, no patching)."""

from dataclasses import dataclass

import torch

from kvbench import Method
from kvbench.bridge import attach, with_cache
from kvbench.methods.full import FullLayer


class _Recorder(FullLayer):
    def __init__(self, spec, sink):
        super().__init__(spec, 256)
        self.sink = sink

    def prefill(self, q, k, v):
        self.sink[self.spec.layer_idx] = (q.detach().clone(), k.detach().clone(), v.detach().clone())
        return super().prefill(q, k, v)


@dataclass(frozen=True)
class _Record(Method):
    name = "_record"  # never registered

    def make_layer(self, spec):
        return _Recorder(spec, self.sink)


def capture_qkv(model, ids):
    """Prefill `ids` [1, T]; return [(q [1, Hq, T, D], k [1, Hkv, T, D], v), ...] one tuple per layer."""
    sink = {}
    method = _Record()
    object.__setattr__(method, "sink", sink)
    with torch.no_grad():
        model(ids, **with_cache(model, attach(model, method)))
    return [sink[i] for i in sorted(sink)]
