"""agreement: how closely each method's decode steps agree with full attention on synthetic keys and values.

One layer (the middle one) at a real model's attention shape is prefilled with `context` synthetic tokens, then fed
`steps` random decode tokens; the Fidelity wrapper (suites/fidelity.py) shadows the method with a full cache and
compares every step: topk_recall, attn_mass, out_rel_err, attended_frac. No model is loaded, so a cell takes
seconds; the accuracy suite measures the same quantities on a real model's queries and keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbench.metrics import ATTENDED_FRAC, ATTN_MASS, OUT_REL_ERR, TOPK_RECALL
from kvbench.sizes import parse_sizes
from kvbench.suite import METHOD, STATUS, Column, Plan, Suite, SyntheticOptions, cell_value, metric, option
from kvbench.sweep import Cell


@dataclass
class AgreementOptions(SyntheticOptions):
    contexts: list[int] = option("Contexts, e.g. 1K,32K.", parse=parse_sizes, cpu="256,1K", gpu="4K,32K", quick="256")
    batch: int = option("Sequences per cell.", 1, min=1)
    steps: int = option("Decode steps compared per cell.", 8, min=1)


def cells(plan: Plan) -> list[Cell]:
    from kvbench.synthetic import resolve_shape

    shape_name, _ = resolve_shape(plan.model, plan.torch_device)
    return [Cell.of(m, {"model": shape_name, "device": plan.torch_device.type, "context": c,
                        "batch": plan.options.batch}) for m in plan.methods for c in plan.options.contexts]


def measure(plan: Plan, cell: Cell) -> dict[str, Any]:
    import torch

    from kvbench.models import resolve_dtype
    from kvbench.suites.fidelity import Fidelity
    from kvbench.synthetic import fill_synthetic, layer_specs, resolve_shape

    o, dev = plan.options, plan.torch_device
    _, shape = resolve_shape(plan.model, dev)
    spec = layer_specs(shape, resolve_dtype(o.dtype, dev), dev)[shape.n_layers // 2]
    wrapped = Fidelity(inner=cell.parsed)
    layer = wrapped.make_layer(spec)
    batch = cell.cell["batch"]
    fill_synthetic([layer], [spec], batch, cell.cell["context"], q_tail=o.q_tail, seed=o.seed)
    gen = torch.Generator(device=dev).manual_seed(o.seed + 1)
    for _ in range(o.steps):  # q [B, Hq, 1, D], k and v [B, Hkv, 1, D]
        q, k, v = (torch.randn(batch, n, 1, spec.head_dim, generator=gen, device=dev, dtype=spec.dtype)
                   for n in (spec.n_heads, spec.n_kv_heads, spec.n_kv_heads))
        layer.extend(q, k, v)
    return {**wrapped.stats.summary(), "steps": o.steps, "layer": spec.layer_idx, "nbytes": layer.nbytes()}


SUITE = Suite(
    name="agreement",
    help="How closely each method's decode steps agree with full attention, on synthetic keys and values at a real "
         "model's attention shape: top-k recall, attention mass, output error.",
    options=AgreementOptions, cells=cells, measure=measure,
    columns=(METHOD, Column("context", cell_value("context")), STATUS, Column("top-k recall", metric(TOPK_RECALL),
             ".3f"), Column("mass", metric(ATTN_MASS), ".3f"), Column("out err", metric(OUT_REL_ERR), ".4f"),
             Column("attended", metric(ATTENDED_FRAC), ".3f")),
    model_help="Attention shape: auto, embedded, a kvbench.models.SHAPES name, or a Hugging Face id.",
)
run = SUITE.run
