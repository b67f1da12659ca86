"""fidelity: attention fidelity per layer at long contexts on real prose, where the CPU is too slow to score tasks.

A cell is one method on one window of natural text (the accuracy suite's ppl text: CPython's documentation, or
--text) of `context` tokens: the first `context - steps - 1` tokens are prefilled through the method's cache, then
the next `steps` tokens of the text are fed as decode steps (teacher forcing from the text: no generation to wait
for). At each decode step every layer's attention is compared with full attention over the uncompressed cache
(suites/fidelity.py), and the per-layer means are recorded: `topk_recall`, `attn_mass`, `attended_frac` (the
selection), `sel_out_err` (output error of exact attention over the selected tokens alone: the selection stage),
`storage_err` (what the method's storage, e.g. 2-bit keys and values, adds to that), `out_rel_err` (both stages),
each with its `_layers` array. With the default `--drive full` the model runs on full attention's outputs, so every
method and layer sees the same queries and keys and a layer's numbers are its own loss, not drift from the layers
before it; `--drive method` runs the model on the method's outputs (then `ppl` of the scored tokens is the method's).

`worst_layer` is the layer with the largest `out_rel_err`, `worst_stage` the larger of its two stage errors, and
`loss_stage` the larger stage error averaged over layers: where a method falls short, these name where it loses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from kvbench.metrics import ATTENDED_FRAC, ATTN_MASS, BYTES_PER_TOKEN, OUT_REL_ERR, TOPK_RECALL
from kvbench.sizes import parse_sizes
from kvbench.suite import METHOD, Column, Options, Plan, Suite, option
from kvbench.suites import accuracy
from kvbench.sweep import Cell

SEL_OUT_ERR, STORAGE_ERR = "sel_out_err", "storage_err"
DEFAULT_METHODS = ("selfindex:budget=0.1", "selfindex:budget=0.1,fixed=scored", "selfindex:budget=0.1,setting=16+1",
                   "kivi", "snapkv:capacity=0.1")


def _lengths(value, flag: str) -> list[int]:
    lengths = parse_sizes(value, flag)
    if any(n < 64 for n in lengths):
        from kvbench.errors import KVBenchError

        raise KVBenchError(f"{flag}: context lengths must be at least 64 tokens, got {lengths}")
    return lengths


@dataclass
class FidelityOptions(Options):
    lengths: list[int] = option("Context lengths in tokens, e.g. 4K,8K (the embedded model's context is 8K).",
                                parse=_lengths, default="4K,8K", quick="4K")
    steps: int = option("Decode steps measured per cell (the text's next tokens, fed one at a time).", 4, min=1,
                        quick=2)
    seeds: list[int] = option("Text windows: each seed picks another offset in the text, e.g. 0,1 or 0-3.",
                              parse=accuracy._seeds, default="0,1", quick="0")
    text: Optional[str] = option("UTF-8 text file (default: CPython's pydoc_data topics, the accuracy suite's ppl "
                                 "text).", parse=accuracy._text)
    drive: str = option("Whose attention outputs the model runs on: full (teacher forcing: each layer measured on "
                        "the same queries and keys for every method) or method.", "full", choices=("full", "method"))


def cells(plan: Plan) -> list[Cell]:
    from kvbench.models import resolve_dtype

    o = plan.options
    dtype = plan.loaded[0].dtype if plan.loaded is not None else resolve_dtype(o.dtype, plan.torch_device)
    base = dict(model=plan.model, dtype=str(dtype).removeprefix("torch."), task="prose",
                text=o.text or "pydoc_data.topics", steps=o.steps, drive=o.drive)
    return [Cell.of(m, {**base, "context": n, "seed": s}) for n in o.lengths for s in o.seeds for m in plan.methods]


def attribution(summary: dict[str, Any]) -> dict[str, Any]:
    """The layer that loses most (largest output error) and, there and over all layers, the stage that loses more."""
    out = summary.get(f"{OUT_REL_ERR}_layers") or []
    sel, sto = summary.get(f"{SEL_OUT_ERR}_layers") or [], summary.get(f"{STORAGE_ERR}_layers") or []
    if not out or len(sel) != len(out) or len(sto) != len(out):
        return {}
    worst = max(range(len(out)), key=out.__getitem__)
    stage = lambda s, t: "selection" if s >= t else "storage"  # noqa: E731
    return dict(worst_layer=worst, worst_stage=stage(sel[worst], sto[worst]),
                loss_stage=stage(summary[SEL_OUT_ERR], summary[STORAGE_ERR]))


class Session(accuracy.Session):
    """The accuracy suite's model loading; the instances are windows of the text."""

    def announce(self, plan) -> None:  # the accuracy suite's time estimate is for its own task grid
        pass

    def instance(self, c: dict):
        from kvbench.suites import tasks as T

        key = (c["context"], c["seed"], c["steps"])
        if key not in self.instances:
            self.instances[key] = T.perplexity(self.tok, c["context"], seed=c["seed"], text=self.options.text,
                                               score_tokens=c["steps"] + 1)
        return self.instances[key]


def measure(s: Session, cell: Cell) -> dict[str, Any]:
    from kvbench.bridge import attach
    from kvbench.decoding import run_instance
    from kvbench.suites.fidelity import Fidelity

    inst, drive = s.instance(cell.cell), cell.cell["drive"]
    cell.parsed.check_context(len(inst.ids))
    wrapped = Fidelity(inner=cell.parsed, drive=drive)
    cache = attach(s.model, wrapped)
    o = run_instance(s.model, s.tok, cache, inst, question_chunk=False)
    summary = wrapped.stats.summary()
    seq, nbytes = cache.get_seq_length(), cache.nbytes()
    m: dict[str, Any] = {**summary, **attribution(summary), "fidelity_steps": wrapped.stats.steps(),
                         "prompt_tokens": inst.split, "offset": inst.info.get("offset"),
                         "prefill_s": round(o.prefill_s, 3), "decode_s": round(o.decode_s, 3), "nbytes": nbytes,
                         BYTES_PER_TOKEN: nbytes / seq if seq else None}
    if drive == "method":  # under teacher forcing the logits are full's, not the method's
        m["ppl"] = math.exp(o.nll / inst.score_tokens)
    m.update(accuracy.cache_facts(cache))
    return m


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summary_rows(records: list[dict]) -> list[dict]:
    """One row per method and context: the metrics' means over the text windows, and where the loss is."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["cell"].get("context")), []).append(r)
    rows = []
    for (method, context), g in sorted(groups.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        good = [r["metrics"] for r in g if r["status"] == "ok"]
        row = dict(method=method, context=context, cells=len(good), failed=len(g) - len(good))
        for name in (TOPK_RECALL, ATTN_MASS, ATTENDED_FRAC, SEL_OUT_ERR, STORAGE_ERR, OUT_REL_ERR):
            row[name] = _mean([m.get(name) for m in good])
            arrays = [m[f"{name}_layers"] for m in good if m.get(f"{name}_layers")]
            row[f"{name}_layers"] = [_mean(list(col)) for col in zip(*arrays)] if arrays else None
        where = attribution(row) if row[OUT_REL_ERR] is not None else {}
        row["where"] = f"layer {where['worst_layer']} ({where['worst_stage']})" if where else "-"
        row["loss_stage"] = where.get("loss_stage", "-")
        rows.append(row)
    return rows


def _col(name: str) -> Any:
    return lambda r: r[name]


SUITE = Suite(
    name="fidelity",
    help="Attention fidelity per layer at long contexts on real prose (top-k recall, attention mass, the output "
         "error of the selection stage and of the storage stage), where the CPU is too slow to score tasks.",
    options=FidelityOptions, cells=cells, setup=Session, measure=measure, rows=summary_rows,
    columns=(METHOD, Column("context", _col("context")), Column("cells", _col("cells")),
             Column("top-k recall", _col(TOPK_RECALL), ".3f"), Column("mass", _col(ATTN_MASS), ".3f"),
             Column("attended", _col(ATTENDED_FRAC), ".3f"), Column("sel err", _col(SEL_OUT_ERR), ".4f"),
             Column("storage err", _col(STORAGE_ERR), ".4f"), Column("out err", _col(OUT_REL_ERR), ".4f"),
             Column("worst layer", _col("where"), left=True), Column("loses more in", _col("loss_stage"), left=True),
             Column("failed", _col("failed"))),
    report=("fidelity-length",),
    model="embedded",
    model_help="embedded, a Hugging Face id or a local path (needs a tokenizer).",
    methods=DEFAULT_METHODS,
    allow_unknown_methods=True,
    telemetry_s=None,
)
run = SUITE.run
