"""accuracy: task scores, perplexity and attention fidelity of each method inside a real model, in both protocols.

A cell is one method on one task instance (task, context length, needle depth, seed) under one protocol:
- query-aware: the whole prompt, question included, is prefilled at once, then the answer is decoded;
- query-agnostic: the context is prefilled (and compressed) first, then the question arrives as one extend chunk,
  then the answer is decoded (kvpress's protocol: a method cannot tailor the context to a question it has not seen).
Decoding is greedy through the method's cache (`kvbench.bridge`). `ppl` cells prefill a prefix and score the rest
one token at a time through decode steps; they run once, under the query-agnostic label (there is no question).

Metrics per cell: `score` (0..1, by the task's metric), `prediction` and `expected`, `ppl` (ppl cells), the attention
fidelity of every decode step against the full cache (`topk_recall`, `attn_mass`, `out_rel_err`, `attended_frac`, and
their `_layers` arrays; see suites/fidelity.py), `prompt_tokens`, the needle's measured `depth`, `prefill_s`,
`decode_s`, `new_tokens`, the cache's `nbytes` and `bytes_per_token` at the end, and the attention backend.

The quick profile (`--quick`) runs full, selfindex (budget 10% of the context), kivi (2 bits) and snapkv (capacity
10%) in both protocols on the embedded SmolLM2-135M with 1K-token prompts: passkey, niah_single and niah_multikey
(noise haystack) at depths 0.2/0.5/0.8 and ppl, seeds 0 and 1; 152 cells, 8.4 minutes on this 2-core CPU with little
other load. niah_multivalue, niah_multiquery and vt are left out of it: the 135M model scores 0.6-0.9 on them even
with the full cache (suites/tasks.py), so they would measure the model more than the cache.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import typer

from kvbench.api import KVBenchError, Method, UnknownMethodError
from kvbench.bridge import attach
from kvbench.models import load_model, resolve_dtype
from kvbench.records import RecordWriter, cell_key, read_records
from kvbench.registry import parse_method
from kvbench.suites import tasks as T
from kvbench.suites.fidelity import Fidelity
from kvbench.sweep import Cell, SweepResult, console, run_sweep
from kvbench.telemetry import write_provenance
from kvbench.timing import sync

SUITE = "accuracy"
DEFAULT_METHODS = ["full", "selfindex:budget=0.1", "kivi", "snapkv:capacity=0.1"]
DEFAULT = dict(tasks=["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "ppl"],
               lengths=[1024, 2048, 4096], depths=[0.1, 0.3, 0.5, 0.7, 0.9], seeds=[0, 1, 2],
               protocols=list(T.PROTOCOLS))
QUICK = dict(tasks=["passkey", "niah_single", "niah_multikey", "ppl"], lengths=[1024], depths=[0.2, 0.5, 0.8],
             seeds=[0, 1], protocols=list(T.PROTOCOLS))


@dataclass
class Outcome:
    """What one pass of a prompt through a model and a cache gave."""

    prediction: str = ""
    new_tokens: int = 0
    nll: float | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def eos_ids(model, tok) -> set[int]:
    ids = set()
    for e in (getattr(model.generation_config, "eos_token_id", None), getattr(tok, "eos_token_id", None)):
        if e is not None:
            ids.update(e if isinstance(e, (list, tuple)) else [e])
    return ids


def run_instance(model, tok, cache, inst: T.Instance, protocol: str) -> Outcome:
    """Feed one instance through the model with `cache`: prefill (whole prompt, or context then question chunk),
    then greedy decoding, or, for ppl, scoring the last tokens one decode step at a time."""
    dev = model.device
    ids = torch.tensor([inst.ids], device=dev)
    o = Outcome()
    with torch.inference_mode():
        sync(dev)
        t0 = time.perf_counter()
        if inst.score_tokens or (protocol == T.QUERY_AGNOSTIC and 0 < inst.split < len(inst.ids)):
            out = model(ids[:, : inst.split], past_key_values=cache, logits_to_keep=1)
            sync(dev)
            o.extra["context_prefill_s"] = round(time.perf_counter() - t0, 4)
            if not inst.score_tokens:  # the question arrives after the context was compressed: one extend chunk
                out = model(ids[:, inst.split:], past_key_values=cache, logits_to_keep=1)
        else:
            out = model(ids, past_key_values=cache, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        sync(dev)
        t1 = time.perf_counter()
        o.prefill_s = t1 - t0
        if inst.score_tokens:
            targets = inst.ids[inst.split:]
            nll = torch.zeros((), dtype=torch.float64, device=dev)  # summed on the device: no sync per token
            for i, target in enumerate(targets):
                nll -= torch.log_softmax(logits, -1)[0, target].double()
                if i + 1 < len(targets):  # decode step: feed this token, predict the next
                    logits = model(ids[:, inst.split + i: inst.split + i + 1], past_key_values=cache).logits[:, -1]
                    logits = logits.float()
            o.nll, o.new_tokens = float(nll), len(targets) - 1
        else:
            stop, toks = eos_ids(model, tok), []
            for _ in range(inst.max_new_tokens):
                nxt = int(logits.argmax(-1))
                toks.append(nxt)
                if nxt in stop or len(toks) == inst.max_new_tokens:
                    break  # like generate(): the last token is never fed back
                step = torch.tensor([[nxt]], device=dev)
                logits = model(step, past_key_values=cache).logits[:, -1].float()
            o.prediction = tok.decode(toks, skip_special_tokens=True)
            o.new_tokens = len(toks)
        sync(dev)
        o.decode_s = time.perf_counter() - t1
    return o


def evaluate(model, tok, method: Method, inst: T.Instance, protocol: str, fidelity: bool = True) -> dict[str, Any]:
    """One cell: run `method` on `inst` under `protocol`; returns the record's metrics."""
    wrapped = Fidelity(inner=method) if fidelity else method
    cache = attach(model, wrapped)
    o = run_instance(model, tok, cache, inst, protocol)
    m: dict[str, Any] = {}
    if inst.score_tokens:
        m["ppl"] = math.exp(o.nll / inst.score_tokens)
        m["nll"] = o.nll / inst.score_tokens
        m["scored_tokens"] = inst.score_tokens
    else:
        pred = o.prediction.lstrip("\n").split("\n")[0] if T.first_line_only(inst) else o.prediction
        m["score"] = inst.score(pred)
        m["prediction"] = o.prediction
        m["expected"] = inst.answers
        m["metric"] = inst.metric
    seq = cache.get_seq_length()
    nbytes = cache.nbytes()
    m.update(prompt_tokens=len(inst.ids), new_tokens=o.new_tokens, prefill_s=round(o.prefill_s, 4),
             decode_s=round(o.decode_s, 4), nbytes=nbytes, seq_len=seq,
             bytes_per_token=nbytes / seq if seq else None, **o.extra)
    for k in ("context_tokens", "depth", "needle_token", "truncated_tokens", "offset", "dataset", "format"):
        if k in inst.info:
            m[k] = inst.info[k]
    layers = cache.layer_caches()
    if layers:
        m.update({f"cache_{k}": v for k, v in layers[0].info().items()})
    if fidelity:
        m.update(wrapped.stats.summary())
        m["fidelity_steps"] = wrapped.stats.steps()
    return m


# ---------------------------------------------------------------------------------------------------------------
# the sweep


def _methods(specs: list[str]) -> list[tuple[str, Method | UnknownMethodError]]:
    """Parse every spec before anything runs. A bad parameter or spec syntax is an error now; a name no method is
    registered under becomes failed records (the method may not be installed yet), with a warning."""
    out, seen = [], set()
    for spec in specs:
        try:
            m: Method | UnknownMethodError = parse_method(spec)
            label = m.label()
        except UnknownMethodError as e:
            m, label = e, spec.strip()
            console.print(f"[yellow]accuracy: {e}; its cells will be recorded as failed[/]")
        if label not in seen:
            seen.add(label)
            out.append((label, m))
    if not out:
        raise KVBenchError("no methods given; use e.g. --methods full --methods selfindex:budget=0.1")
    return out


def _check(tasks: list[str], depths: list[float], protocols: list[str], lengths: list[int], seeds: list[int]):
    for t in tasks:
        if t.startswith("file:"):
            T.parse_file_task(t)
        elif t not in T.TASKS:
            raise KVBenchError(f"unknown task '{t}'; valid: {', '.join(T.task_names())}")
    for d in depths:
        if not 0 <= d <= 1:
            raise KVBenchError(f"depth {d} is outside [0, 1]; depths are fractions of the context, e.g. 0.1,0.5,0.9")
    for p in protocols:
        if p not in T.PROTOCOLS:
            raise KVBenchError(f"unknown protocol '{p}'; valid: {', '.join(T.PROTOCOLS)}, both")
    if any(n < 16 for n in lengths):
        raise KVBenchError(f"context lengths must be at least 16 tokens, got {lengths}")
    if any(s < 0 for s in seeds):
        raise KVBenchError(f"seeds must be >= 0, got {seeds}")


def build_cells(methods, model_name: str, dtype: str, tasks, lengths, depths, seeds, protocols, *, haystack: str,
                text: str | None, score_tokens: int) -> list[Cell]:
    """The grid, instance-major: every method and protocol of one task instance run one after the other."""
    cells = []
    for task in tasks:
        task_depths = depths if task in T.DEPTH_TASKS else [None]
        task_protocols = [T.QUERY_AGNOSTIC] if task == "ppl" else protocols
        for length in lengths:
            for depth in task_depths:
                for seed in seeds:
                    base = dict(model=model_name, dtype=dtype, task=task, context=length, depth=depth, seed=seed)
                    if task.startswith("niah"):
                        base["haystack"] = haystack
                    if task == "ppl":
                        base.update(text=text or "pydoc_data.topics", score_tokens=score_tokens)
                    for label, m in methods:
                        params = m.params() if isinstance(m, Method) else {}
                        for p in task_protocols:
                            cells.append(Cell(label, params, {**base, "protocol": p}, context=m))
    return cells


def run(methods: list[str], out: Path, *, model: str = "embedded", quick: bool = False,
        tasks: list[str] | str | None = None, lengths: list[int] | str | None = None,
        depths: list[float] | str | None = None, seeds: list[int] | str | None = None,
        protocols: list[str] | str | None = None, haystack: str = "noise", text: str | Path | None = None,
        score_tokens: int = 64, device: str | None = None, dtype: str = "auto", fidelity: bool = True,
        rerun: bool = False, show_progress: bool = True, loaded: tuple | None = None) -> SweepResult:
    """Run the accuracy grid and append one record per cell to `out/accuracy.jsonl`.

    `tasks`, `lengths`, `depths`, `seeds`, `protocols` take lists or comma-separated text; anything not given comes
    from the quick profile (`quick=True`) or the full default grid. `loaded=(model, tokenizer)` reuses a model
    already in memory (tests); `model` then only names it in the records. Options are named, with no catch-all, so
    `kvbench compare` can check a TOML file's keys against them before anything runs."""
    from kvbench.suites.memory import parse_sizes, resolve_device

    profile = QUICK if quick else DEFAULT
    tasks = _list(tasks, str) or profile["tasks"]
    lengths = (parse_sizes(lengths, "--lengths") if lengths else None) or profile["lengths"]
    depths = _list(depths, float) or profile["depths"]
    seeds = _seeds(seeds) or profile["seeds"]
    protocols = _protocols(protocols) or profile["protocols"]
    if haystack not in T.HAYSTACKS:
        raise KVBenchError(f"unknown haystack '{haystack}'; valid: {', '.join(T.HAYSTACKS)}")
    if text is not None and not Path(text).is_file():
        raise KVBenchError(f"--text {text}: no such file; give a UTF-8 text file for the ppl task")
    if score_tokens < 1:
        raise KVBenchError(f"--score-tokens must be >= 1, got {score_tokens}")
    _check(tasks, depths, protocols, lengths, seeds)
    parsed = _methods(list(methods) if methods else DEFAULT_METHODS)

    dev = torch.device(loaded[0].device) if loaded else resolve_device(device)
    dt = loaded[0].dtype if loaded else resolve_dtype(dtype, dev)
    cells = build_cells(parsed, model, str(dt).removeprefix("torch."), tasks, lengths, depths, seeds, protocols,
                        haystack=haystack, text=None if text is None else str(text), score_tokens=score_tokens)
    out = Path(out)
    writer = RecordWriter(out / f"{SUITE}.jsonl")
    done = set() if rerun else writer.done()
    pending = [c for c in cells if cell_key(SUITE, c.method, c.cell) not in done]
    state: dict[str, Any] = {"instances": {}}
    if pending:
        if loaded is None:
            with console.status(f"loading {model} ..."):
                loaded = load_model(model, device=dev, dtype=dt)
        if loaded[1] is None:
            raise KVBenchError(f"model '{model}' has no tokenizer (synthetic models have random weights); the "
                               "accuracy suite needs a real model, e.g. --model embedded")
        write_provenance(out, SUITE, dict(methods=[lbl for lbl, _ in parsed], model=model, quick=quick, tasks=tasks,
                                          lengths=lengths, depths=depths, seeds=seeds, protocols=protocols,
                                          haystack=haystack, text=None if text is None else str(text),
                                          score_tokens=score_tokens, device=str(dev), dtype=str(dt),
                                          fidelity=fidelity, rerun=rerun))
    mdl, tok = loaded if loaded else (None, None)

    def runner(c: Cell) -> dict[str, Any]:
        if isinstance(c.context, Exception):
            raise c.context
        cl = c.cell
        key = (cl["task"], cl["context"], cl["depth"], cl["seed"])
        if key not in state["instances"]:
            state["instances"][key] = T.make_instance(tok, cl["task"], cl["context"], cl["depth"], cl["seed"],
                                                      haystack=haystack, text=cl.get("text") if text else None,
                                                      score_tokens=score_tokens)
        return evaluate(mdl, tok, c.context, state["instances"][key], cl["protocol"], fidelity=fidelity)

    result = run_sweep(SUITE, cells, runner, writer, description="accuracy", rerun=rerun,
                       show_progress=show_progress)
    if show_progress:
        summarize(writer.path, {cell_key(SUITE, c.method, c.cell) for c in cells})
    return result


def _list(value, kind) -> list:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        return [kind(x.strip()) if isinstance(x, str) else kind(x) for x in items if str(x).strip()]
    except ValueError:
        raise KVBenchError(f"'{value}' is not a comma-separated list of {kind.__name__} values") from None


def _seeds(value) -> list[int]:
    """'0,1,2', '0-4' or a list of ints."""
    if isinstance(value, str):
        out = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            lo, dash, hi = part.partition("-")
            try:
                out += list(range(int(lo), int(hi) + 1)) if dash else [int(part)]
            except ValueError:
                raise KVBenchError(f"--seeds '{value}': use e.g. 0,1,2 or 0-4") from None
        return out
    return _list(value, int)


def _protocols(value) -> list[str]:
    items = _list(value, str)
    if items == ["both"]:
        return list(T.PROTOCOLS)
    return items


def summarize(path: Path, keys: set[str]) -> None:
    """Print the mean score (and median ppl) per method and protocol over the cells in `keys`, from every record in
    `path` (a rerun's record replaces the older one)."""
    from rich.table import Table

    recs, _ = read_records([path]) if Path(path).exists() else ([], [])
    latest = {k: r for r in recs if (k := cell_key(SUITE, r["method"], r["cell"])) in keys}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in latest.values():
        groups.setdefault((r["method"], str(r["cell"].get("protocol", "-"))), []).append(r)
    table = Table(title="accuracy", title_justify="left")
    for col in ("method", "protocol", "mean score", "scored cells", "ppl (median)", "failed"):
        table.add_column(col)
    for (method, proto), g in sorted(groups.items()):
        good = [r["metrics"] for r in g if r["status"] == "ok"]
        scores = [m["score"] for m in good if m.get("score") is not None]
        ppls = [m["ppl"] for m in good if m.get("ppl") is not None]
        table.add_row(method, proto, f"{sum(scores) / len(scores):.3f}" if scores else "-", str(len(scores)),
                      f"{statistics.median(ppls):.2f}" if ppls else "-",
                      str(sum(r["status"] in ("failed", "oom") for r in g)))
    console.print(table)


def command(
    methods: Optional[list[str]] = typer.Option(None, "--methods", "-m", help="Method specs, repeatable or space-"
                                                "separated: full, selfindex:budget=0.1, kivi:bits=4, ... (default: "
                                                + " ".join(DEFAULT_METHODS) + ")."),
    model: str = typer.Option("embedded", help="embedded, a Hugging Face id or a local path (needs a tokenizer)."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated tasks: " + ", ".join(T.task_names())
                                        + f" (default: {','.join(DEFAULT['tasks'])}; quick: "
                                          f"{','.join(QUICK['tasks'])})."),
    lengths: Optional[str] = typer.Option(None, help="Prompt lengths in tokens, e.g. 1K,4K (default 1K,2K,4K; "
                                                     "quick 1K)."),
    depths: Optional[str] = typer.Option(None, help="Needle depths, fractions of the context, e.g. 0.1,0.5,0.9 "
                                                    "(default 0.1,0.3,0.5,0.7,0.9; quick 0.2,0.5,0.8)."),
    protocols: Optional[str] = typer.Option(None, help="query-aware, query-agnostic or both (default both)."),
    seeds: Optional[str] = typer.Option(None, help="Instance seeds, e.g. 0,1,2 or 0-9; for file: tasks, line "
                                                   "numbers from 0 (default 0,1,2; quick 0,1)."),
    haystack: str = typer.Option("noise", help="Haystack of the niah tasks: noise (RULER's repeated sentences) or "
                                               "docs (CPython's documentation text)."),
    text: Optional[Path] = typer.Option(None, help="Text file for the ppl task (default: CPython's pydoc_data "
                                                   "topics)."),
    score_tokens: int = typer.Option(64, help="ppl: tokens scored one decode step at a time after the prefix."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Folder for accuracy.jsonl and its provenance."),
    quick: bool = typer.Option(False, help="The quick profile: about 10 minutes on a 2-core CPU."),
    rerun: bool = typer.Option(False, help="Run cells again even if out/accuracy.jsonl already has them."),
    fidelity: bool = typer.Option(True, help="Measure attention fidelity against the full cache at each decode "
                                             "step (costs a shadow full cache)."),
    device: Optional[str] = typer.Option(None, help="cuda or cpu (default: cuda when present)."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32."),
):
    """Task scores (passkey, RULER-style needles, variable tracking, LongBench/RULER files), perplexity and attention
    fidelity of each method inside a real model, query-aware and query-agnostic."""
    specs = [s for m in (methods or []) for s in m.split()]
    result = run(specs, out, model=model, quick=quick, tasks=tasks, lengths=lengths, depths=depths, seeds=seeds,
                 protocols=protocols, haystack=haystack, text=text, score_tokens=score_tokens, device=device,
                 dtype=dtype, fidelity=fidelity, rerun=rerun)
    console.print(f"accuracy: {result.summary()}; records in {Path(out) / (SUITE + '.jsonl')}")
