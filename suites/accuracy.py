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

The standard profile (the default) runs full, selfindex and snapkv at budgets of 160 tokens, 7.5% and 10% of the
context, and kivi (2 bits), in both protocols, at 1K, 2K and 4K tokens (the embedded model's context is 8K; full
still found every needle at 4K in the cells measured so far): passkey, niah_single and niah_multikey in RULER's noise
haystack and in CPython's documentation prose, vt, at depths 0.1/0.5/0.9 and seeds 0-5, plus ppl: 288 scored cells
per method and protocol (bootstrap half-widths up to 0.057), every method on the same cells, so `summary_rows` can
pair each one with full. The table shows each mean with its bootstrap 95% interval over cells and the paired
difference from full (kvbench.intervals); the same rows go to `<out>/accuracy.summary.json`. On a CPU the suite
prints its estimated time from the cost model below, calibrated on a measured run: the four methods at one budget
each (`kvbench run accuracy -m full -m selfindex:budget=0.1 -m kivi -m snapkv:capacity=0.1`) took 97 minutes on 2
idle cores (benchmarks/records/accuracy-seeds0-5-cpu.json), a third of it the dense prefill passes (1.9-11.4 s at
1K-4K), which the methods share: each instance's prefill runs once (the query-agnostic context is cut from the whole
prompt's pass) and is replayed into every method's cache. Three choices keep decoding short: an answer stops once it
is settled (`stop_settled`: the metric never falls and is at 1, so the score is the same), full is not measured
against itself for fidelity, and fidelity is measured on seeds 0-2 (`fidelity_seeds`), a third to a half of a
compressed method's decode step otherwise
(kvbench/decoding.py, issue 13; `--no-share-prefill` runs one pass per cell, about twice the time, the same scores).

The quick profile (`--quick`) runs full, selfindex (budget 10% of the context), kivi (2 bits) and snapkv (capacity
10%) in both protocols on the embedded SmolLM2-135M with 1K-token prompts: passkey, niah_single and niah_multikey
(noise haystack) at depths 0.2/0.5/0.8 and ppl, seeds 0 and 1; 152 cells, about 3.5 minutes on 2 idle CPU cores by
the cost model (issue 18 measured 19 minutes before prefills were shared, on a busier machine). niah_multivalue and
niah_multiquery are left out of both profiles: the 135M model scores 0.6-0.9 on them even with the full cache
(suites/tasks.py), so they would measure the model more than the cache, and each decodes 48 tokens (four times a
needle cell's decode); `--tasks` adds them.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from kvbench.api import representative
from kvbench.decoding import Prefixes, run_instance
from kvbench.errors import KVBenchError
from kvbench.intervals import mean_interval, paired_against
from kvbench.metrics import BYTES_PER_TOKEN, PPL, SCORE
from kvbench.sizes import parse_sizes
from kvbench.suite import METHOD, Column, Options, Plan, Suite, option
from kvbench.suites import tasks as T
from kvbench.sweep import Cell

if TYPE_CHECKING:
    from kvbench.api import Method

# the quick profile's four methods at a 10% budget; the standard profile adds the 160-token and 7.5% budgets, and
# KIVI-4 beside KIVI-2: on the embedded model (GQA, head dim 64) 2-bit KIVI loses half the needles while 4-bit keeps
# all of them (36 of 36 cells, benchmarks/records/kivi-bits-cpu.jsonl), so both belong in the comparison
QUICK_METHODS = ("full", "selfindex:budget=0.1", "kivi", "snapkv:capacity=0.1")
DEFAULT_METHODS = ("full", "selfindex:budget=160", "selfindex:budget=0.075", "selfindex:budget=0.1", "kivi",
                   "kivi:bits=4", "snapkv:capacity=160", "snapkv:capacity=0.075", "snapkv:capacity=0.1")

# The cost model behind the estimate a CPU run prints (estimate_s), in seconds on 2 idle CPU cores. A cell costs its
# method's own prefill work (REPLAY_S: building its cache from the dense pass), the question chunk in the
# query-agnostic protocol (QUESTION_S) and its decode steps (STEP_S, fidelity on); the model's dense prefill pass
# (PASS_S) is paid once per instance (its whole prompt's pass serves its context too; ppl's context runs its own) for
# the methods that share it (kvbench.decoding.prefill_queries; the default, share_prefill), once per cell otherwise.
# Measured 2026-12-02 by benchmarks/accuracy_cell_costs.py (niah_single, one thread, process CPU seconds on the
# shared 2-core machine at load 3-9; records in benchmarks/records/accuracy-cell-costs.jsonl), divided by the CPU
# seconds per idle 2-core second measured near idle on the same cells (PASS_CPU_PER_S for the pass, whose matrix
# products use both cores; CPU_PER_S for the rest). Lengths between and beyond 1K, 2K and 4K are interpolated as a
# power of the length; a method not measured here costs what the costliest measured one does and runs its own pass.
# Rough (about +-30%): a design check, not a measurement.
# Recalibrated 2026-12-07 against the 4-method seeds 0-5 run (benchmarks/records/accuracy-seeds0-5-cpu.json): the
# dense pass took 1.95 / 4.55 / 11.4 s at 1K / 2K / 4K on 2 idle cores (it does not use the second core), and the
# cells' own parts 1.2x what 1.7 CPU seconds per second gave.
PASS_CPU_PER_S, CPU_PER_S = 1.05, 1.42
PASS_S = {1024: 2.31, 2048: 4.67, 4096: 12.01}
# selfindex's replay: the 2026-12-02 values x 0.64, the wall time it took at 4K after its codebook became a scatter
REPLAY_S = {"full": {1024: 0.059, 2048: 0.084, 4096: 0.203}, "selfindex": {1024: 0.26, 2048: 0.60, 4096: 1.48},
            "kivi": {1024: 0.101, 2048: 0.261, 4096: 0.459}, "snapkv": {1024: 0.094, 2048: 0.195, 4096: 0.385}}
QUESTION_S = {"full": {1024: 0.217, 2048: 0.325, 4096: 0.496}, "selfindex": {1024: 0.52, 2048: 0.67, 4096: 0.90},
              "kivi": {1024: 0.250, 2048: 0.385, 4096: 0.562}, "snapkv": {1024: 0.178, 2048: 0.205, 4096: 0.256}}
# kivi's steps: the values before x its decode_s per token in the seeds 0-5 run after its CPU working copy (eabebed,
# benchmarks/records/accuracy-seeds0-5-working-copy-cpu.json) over the run before (0.83 / 0.76 / 0.69 at 1K / 2K / 4K);
# selfindex's did not change there (0.98-1.00; why is not known yet: see the 2026-12-08 closing note), nor did full's
STEP_S = {"full": {1024: 0.081, 2048: 0.109, 4096: 0.167}, "selfindex": {1024: 0.126, 2048: 0.154, 4096: 0.213},
          "kivi": {1024: 0.099, 2048: 0.142, 4096: 0.182}, "snapkv": {1024: 0.083, 2048: 0.099, 4096: 0.126}}
# a decode step without fidelity against one with it (wall time on 2 idle cores, 2026-12-07, /tmp-style timing of 8
# steps after 3 warm-up steps, niah_single; noisy to about 10%): full's cells never measure it now
NO_FIDELITY = {"full": {1024: 0.70, 4096: 0.61}, "selfindex": {1024: 0.55, 4096: 0.62},
               "kivi": {1024: 0.82, 4096: 0.66}, "snapkv": {1024: 0.73, 4096: 0.41}}
SHARED = ("full", "selfindex", "kivi", "snapkv")  # the methods of kvbench.decoding.prefill_queries


def _list(value, kind, flag: str) -> list:
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        return [kind(x.strip()) if isinstance(x, str) else kind(x) for x in items if str(x).strip()]
    except ValueError:
        raise KVBenchError(f"{flag}: '{value}' is not a comma-separated list of {kind.__name__} values") from None


def _tasks(value, flag: str) -> list[str]:
    tasks = _list(value, str, flag)
    for t in tasks:
        if t.startswith("file:"):
            T.parse_file_task(t)
        elif t not in T.TASKS:
            raise KVBenchError(f"unknown task '{t}'; valid: {', '.join(T.task_names())}")
    return tasks


def _lengths(value, flag: str) -> list[int]:
    lengths = parse_sizes(value, flag)
    if any(n < 16 for n in lengths):
        raise KVBenchError(f"context lengths must be at least 16 tokens, got {lengths}")
    return lengths


def _depths(value, flag: str) -> list[float]:
    depths = _list(value, float, flag)
    for d in depths:
        if not 0 <= d <= 1:
            raise KVBenchError(f"depth {d} is outside [0, 1]; depths are fractions of the context, e.g. 0.1,0.5,0.9")
    return depths


def _seeds(value, flag: str) -> list[int]:
    """'0,1,2', '0-4' or a list of ints, all >= 0."""
    if not isinstance(value, str):
        seeds = _list(value, int, flag)
    else:
        seeds = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            lo, dash, hi = part.partition("-")
            try:
                seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(part)]
            except ValueError:
                raise KVBenchError(f"{flag} '{value}': use e.g. 0,1,2 or 0-4") from None
    if any(s < 0 for s in seeds):
        raise KVBenchError(f"seeds must be >= 0, got {seeds}")
    return seeds


def _seeds_or_all(value, flag: str) -> list[int] | None:
    """_seeds, or None for 'all'."""
    return None if isinstance(value, str) and value.strip() == "all" else _seeds(value, flag)


def _one_or_both(what: str, valid: tuple[str, ...]):
    """A parser of 'a', 'a,b' or 'both' among the two `valid` names."""
    def parse(value, flag: str) -> list[str]:
        items = _list(value, str, flag)
        items = list(valid) if items == ["both"] else items
        for x in items:
            if x not in valid:
                raise KVBenchError(f"unknown {what} '{x}'; valid: {', '.join(valid)}, both")
        return items
    return parse


_protocols = _one_or_both("protocol", T.PROTOCOLS)
_haystacks = _one_or_both("haystack", T.HAYSTACKS)


def _text(value, flag: str) -> str:
    if not Path(value).is_file():
        raise KVBenchError(f"{flag} {value}: no such file; give a UTF-8 text file for the ppl task")
    return str(value)


@dataclass
class AccuracyOptions(Options):
    tasks: list[str] = option("Comma-separated tasks: " + ", ".join(T.task_names()) + ".", parse=_tasks,
                              default="passkey,niah_single,niah_multikey,vt,ppl",
                              quick="passkey,niah_single,niah_multikey,ppl")
    lengths: list[int] = option("Prompt lengths in tokens, e.g. 1K,4K.", parse=_lengths, default="1K,2K,4K",
                                quick="1K")
    depths: list[float] = option("Needle depths, fractions of the context, e.g. 0.1,0.5,0.9.", parse=_depths,
                                 default="0.1,0.5,0.9", quick="0.2,0.5,0.8")
    protocols: list[str] = option("query-aware, query-agnostic or both.", "both", parse=_protocols)
    seeds: list[int] = option("Instance seeds, e.g. 0,1,2 or 0-9; for file: tasks, line numbers from 0.",
                              parse=_seeds, default="0-5", quick="0,1")
    haystack: list[str] = option("Haystacks of the niah tasks, comma-separated: noise (RULER's repeated sentences), "
                                 "docs (CPython's documentation prose) or both.", parse=_haystacks,
                                 default="noise,docs", quick="noise")
    text: Optional[str] = option("Text file for the ppl task (default: CPython's pydoc_data topics).", parse=_text)
    score_tokens: int = option("ppl: tokens scored one decode step at a time after the prefix.", 64, min=1)
    fidelity: bool = option("Measure attention fidelity against the full cache at each decode step (costs a shadow "
                            "full cache).", True)
    fidelity_seeds: Optional[list[int]] = option(
        "The seeds whose cells measure fidelity (with --fidelity), e.g. 0-2, or 'all'; for file: tasks, line "
        "numbers. Fidelity is a third to a half of a compressed method's decode step on the CPU: the standard profile "
        "measures it on its first three seeds (half its cells), the quick profile on all.", parse=_seeds_or_all,
        default="0-2", quick="all")
    stop_settled: bool = option("Stop decoding an answer once no further token can change its score (a metric that "
                                "appended text never lowers, already at 1): the same scores in fewer decode steps; "
                                "--no-stop-settled decodes every answer to its end.", True)
    share_prefill: bool = option("On the CPU, run each prompt's dense prefill once and replay it into the cache of "
                                 "each method whose prefill is dense (full, selfindex, kivi, snapkv): the same "
                                 "records in about half the time (kvbench/decoding.py).", True)


def cache_facts(cache) -> dict[str, Any]:
    """The cache's info() as record metrics (cache_<key>), from its first layer not kept dense."""
    layers = cache.layer_caches()
    return {f"cache_{k}": v for k, v in representative(layers).info().items()} if layers else {}


def evaluate(model, tok, method: Method, inst: T.Instance, protocol: str, fidelity: bool = True,
             prefixes: Prefixes | None = None, stop_settled: bool = False) -> dict[str, Any]:
    """One cell: run `method` on `inst` under `protocol`; returns the record's metrics. `prefixes`: the shared
    prefills to take this cell's from where the method allows (kvbench.decoding.Prefixes), or None. `full` is the
    reference of the fidelity metrics, so it is not measured against itself (its record says `fidelity:
    reference`): its attention is exact over every token, recall and mass 1 and error 0 up to float rounding."""
    from kvbench.bridge import attach
    from kvbench.methods.full import Full
    from kvbench.suites.fidelity import Fidelity

    fidelity = fidelity and type(method) is not Full
    wrapped = Fidelity(inner=method) if fidelity else method
    cache = attach(model, wrapped)
    o = run_instance(model, tok, cache, inst, question_chunk=protocol == T.QUERY_AGNOSTIC, prefixes=prefixes,
                     stop_settled=stop_settled)
    m: dict[str, Any] = {}
    if inst.score_tokens:
        m[PPL] = math.exp(o.nll / inst.score_tokens)
        m["nll"] = o.nll / inst.score_tokens
        m["scored_tokens"] = inst.score_tokens
    else:
        m[SCORE] = inst.score(o.prediction)
        m["prediction"] = o.prediction
        m["expected"] = inst.answers
        m["metric"] = inst.metric
    seq = cache.get_seq_length()
    nbytes = cache.nbytes()
    m.update(prompt_tokens=len(inst.ids), new_tokens=o.new_tokens, prefill_s=round(o.prefill_s, 4),
             decode_s=round(o.decode_s, 4), nbytes=nbytes, seq_len=seq,
             **{BYTES_PER_TOKEN: nbytes / seq if seq else None}, **o.extra)
    for k in ("context_tokens", "depth", "needle_token", "truncated_tokens", "offset", "dataset", "format"):
        if k in inst.info:
            m[k] = inst.info[k]
    m.update(cache_facts(cache))
    if fidelity:
        m.update(wrapped.stats.summary())
        m["fidelity_steps"] = wrapped.stats.steps()
    elif type(method) is Full:
        m["fidelity"] = "reference"
    return m


def cells(plan: Plan) -> list[Cell]:
    """The grid, instance-major: every method and protocol of one task instance run one after the other (ppl once,
    query-agnostic: it has no question)."""
    from kvbench.models import resolve_dtype

    o = plan.options
    dtype = plan.loaded[0].dtype if plan.loaded is not None else resolve_dtype(o.dtype, plan.torch_device)
    out = []
    for task in o.tasks:
        for length in o.lengths:
            for depth, seed, haystack in itertools.product(o.depths if task in T.DEPTH_TASKS else [None], o.seeds,
                                                           o.haystack if task.startswith("niah") else [None]):
                base = dict(model=plan.model, dtype=str(dtype).removeprefix("torch."), task=task, context=length,
                            depth=depth, seed=seed)
                if haystack is not None:
                    base["haystack"] = haystack
                if task == "ppl":
                    base.update(text=o.text or "pydoc_data.topics", score_tokens=o.score_tokens)
                out += [Cell.of(m, {**base, "protocol": p}) for m in plan.methods
                        for p in ([T.QUERY_AGNOSTIC] if task == "ppl" else o.protocols)]
    return out


def _at(table: dict[int, float], length: int) -> float:
    """table (length -> CPU seconds) at `length`, interpolated (and extrapolated past its ends) as a power of the
    length between measured points."""
    known = sorted(table)
    lo = max([n for n in known[:-1] if n <= length], default=known[0])
    hi = known[known.index(lo) + 1]
    slope = math.log(table[hi] / table[lo]) / math.log(hi / lo)
    return table[lo] * (length / lo) ** slope


def _costliest(table: dict[str, dict[int, float]], length: int) -> float:
    return max(_at(t, length) for t in table.values())


def cell_cost_s(c: Cell, max_new_tokens: int, score_tokens: int = 0, shared: bool = False,
                fidelity: bool = True) -> float:
    """Estimated seconds of one cell on 2 idle CPU cores (the cost model above); `shared`: its dense prefill pass is
    counted apart (estimate_s), not here; `fidelity`: whether it measures fidelity."""
    name, length = c.method.partition(":")[0], int(c.cell["context"])
    steps = score_tokens - 1 if score_tokens else max_new_tokens
    part = (lambda t: _at(t[name], length)) if name in STEP_S else (lambda t: _costliest(t, length))
    step = part(STEP_S) * (1.0 if fidelity or name not in NO_FIDELITY else _at(NO_FIDELITY[name], length))
    cpu = part(REPLAY_S) + steps * step
    if c.cell["protocol"] == T.QUERY_AGNOSTIC and not score_tokens:
        cpu += part(QUESTION_S)
    return cpu / CPU_PER_S + (0 if shared else _at(PASS_S, length) / PASS_CPU_PER_S)


def _instance(c: Cell) -> tuple:
    """A cell's task instance: its cell without the protocol (and, as _test_key, model and dtype)."""
    return _test_key({"cell": {k: v for k, v in c.cell.items() if k != "protocol"}})


def _prefix(c: Cell) -> tuple:
    """The token prefix a cell prefills: its instance's whole prompt, or (query-agnostic, ppl) its context."""
    return (_instance(c), c.cell["protocol"] == T.QUERY_AWARE and c.cell["task"] != "ppl")


def _passes(prefixes: dict[tuple, int]) -> list[int]:
    """The lengths of the dense passes the prefixes need: a context is cut from its whole prompt's pass where the
    instance has one (kvbench.decoding.Prefixes), else it runs its own."""
    return [n for (key, whole), n in prefixes.items() if whole or (key, True) not in prefixes]


# decode tokens a task asks for at most (suites/tasks.py): the estimate counts them all
MAX_NEW_TOKENS = {"passkey": 10, "niah_single": 12, "niah_multikey": 12, "niah_multivalue": 48,
                  "niah_multiquery": 48, "vt": 30}


def estimate_s(cell_list: list[Cell], share_prefill: bool = True,
               fidelity: Callable[[Cell], bool] = lambda c: c.method.partition(":")[0] != "full") -> float:
    """Estimated seconds of a list of cells on 2 idle CPU cores (`fidelity`: which cells measure it); a file: task
    counts as 64 new tokens, and every answer as its task's most tokens (decoding often stops before: stop_settled)."""
    total, prefixes = 0.0, {}
    for c in cell_list:
        shared = share_prefill and c.method.partition(":")[0] in SHARED
        if shared:
            prefixes[_prefix(c)] = int(c.cell["context"])
        total += cell_cost_s(c, MAX_NEW_TOKENS.get(c.cell["task"], 64), c.cell.get("score_tokens") or 0, shared,
                             fidelity(c))
    return total + sum(_at(PASS_S, n) for n in _passes(prefixes)) / PASS_CPU_PER_S


def estimate_text(plan: Plan) -> str:
    cell_list, o = cells(plan), plan.options
    scored = Counter((c.method, c.cell["protocol"]) for c in cell_list if c.cell["task"] != "ppl")
    return (f"accuracy: {len(cell_list)} cells ({min(scored.values(), default=0)} scored cells per method and "
            f"protocol); estimated {estimate_s(cell_list, o.share_prefill, lambda c: measures_fidelity(o, c)) / 60:.0f}"
            " minutes or less on 2 idle CPU "
            "cores (suites/accuracy.py's cost model; finished cells are skipped, a busy machine takes longer)")


class Session:
    """The model and tokenizer (loaded once per process) and the task instances built so far."""

    def __init__(self, plan: Plan):
        from kvbench.models import load_model
        from kvbench.sweep import console

        self.options, loaded = plan.options, plan.loaded
        self.announce(plan)
        if loaded is None:
            with console.status(f"loading {plan.model} ..."):
                loaded = load_model(plan.model, device=plan.torch_device, dtype=plan.options.dtype)
        self.model, self.tok = loaded
        if self.tok is None:
            raise KVBenchError(f"model '{plan.model}' has no tokenizer (synthetic models have random weights); the "
                               "accuracy suite needs a real model, e.g. --model embedded")
        self.instances: dict[tuple, T.Instance] = {}
        # suites reusing this session (fidelity_at_length) have options of their own, without share_prefill
        self.prefixes = Prefixes(self.model) if getattr(self.options, "share_prefill", False) else None

    def announce(self, plan: Plan) -> None:
        """On the CPU, the profile's estimated time before the first cell (suites reusing this session override it)."""
        from kvbench.sweep import console

        if not plan.gpu:
            console.print(f"[dim]{estimate_text(plan)}[/]")

    def instance(self, c: dict) -> T.Instance:
        key = (c["task"], c["context"], c["depth"], c["seed"], c.get("haystack"))
        if key not in self.instances:
            self.instances[key] = T.make_instance(self.tok, c["task"], c["context"], c["depth"], c["seed"],
                                                  haystack=c.get("haystack") or "noise", text=self.options.text,
                                                  score_tokens=self.options.score_tokens)
        return self.instances[key]


def measures_fidelity(o: AccuracyOptions, c: Cell) -> bool:
    """Whether cell c measures fidelity under options o (full never does: it is the reference)."""
    seeds = o.fidelity_seeds
    return o.fidelity and c.method.partition(":")[0] != "full" and (seeds is None or c.cell["seed"] in seeds)


def measure(s: Session, cell: Cell) -> dict[str, Any]:
    return evaluate(s.model, s.tok, cell.parsed, s.instance(cell.cell), cell.cell["protocol"],
                    fidelity=measures_fidelity(s.options, cell), prefixes=s.prefixes,
                    stop_settled=s.options.stop_settled)


def _test_key(r: dict) -> tuple:
    """What makes two records the same test, whatever the method: the cell without model and dtype."""
    return tuple(sorted((k, str(v)) for k, v in r["cell"].items() if k not in ("model", "dtype")))


def instance_group(c: Cell) -> str:
    """The Ray group of a cell (Suite.group_key): its task instance, so that one worker runs every method and protocol
    of an instance one after the other and its dense prefill passes once for all of them (share_prefill), as a serial
    run does, instead of once per method on each worker."""
    return repr(_instance(c))


def summary_rows(records: list[dict]) -> list[dict]:
    """One row per method and protocol: the mean score with its bootstrap 95% interval over cells, the paired
    difference from full on the cells both scored (its interval too), the median ppl, the failed cells."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], str(r["cell"].get("protocol", "-"))), []).append(r)
    scores = {key: {_test_key(r): r["metrics"][SCORE] for r in g if r["status"] == "ok"
                    and r["metrics"].get(SCORE) is not None} for key, g in groups.items()}
    rows = []
    for (method, proto), g in sorted(groups.items(), key=lambda kv: (kv[0][0] != "full", kv[0])):
        mine = scores[(method, proto)]
        ppls = [r["metrics"][PPL] for r in g if r["status"] == "ok" and r["metrics"].get(PPL) is not None]
        full = scores.get(("full", proto))
        iv = mean_interval(list(mine.values()))
        diff = paired_against(mine, full) if full and method != "full" else None
        rows.append(dict(method=method, protocol=proto, score=iv.mean if iv else None,
                         score_ci=[iv.lo, iv.hi] if iv else None, scored=len(mine),
                         vs_full=diff.mean if diff else None, vs_full_ci=[diff.lo, diff.hi] if diff else None,
                         paired_cells=diff.n if diff else 0, ppl=statistics.median(ppls) if ppls else None,
                         failed=sum(r["status"] in ("failed", "oom") for r in g)))
    return rows


def _with_interval(value_key: str, ci_key: str, signed: bool = False):
    def show(row: dict) -> str | None:
        v, ci = row.get(value_key), row.get(ci_key)
        if v is None:
            return None
        f = "+.3f" if signed else ".3f"
        return f"{v:{f}}" + (f" [{ci[0]:{f}}, {ci[1]:{f}}]" if ci else "")
    return show


SUITE = Suite(
    name="accuracy",
    help="Task scores (passkey, RULER-style needles, variable tracking, LongBench/RULER files), perplexity and "
         "attention fidelity of each method inside a real model, query-aware and query-agnostic.",
    options=AccuracyOptions, cells=cells, setup=Session, measure=measure,
    rows=summary_rows,
    columns=(METHOD, Column("protocol", lambda r: r["protocol"], left=True),
             Column("mean score [95% CI]", _with_interval("score", "score_ci")),
             Column("scored cells", lambda r: r["scored"]),
             Column("vs full, paired [95% CI]", _with_interval("vs_full", "vs_full_ci", signed=True)),
             Column("ppl (median)", lambda r: r["ppl"], ".2f"), Column("failed", lambda r: r["failed"])),
    report=("pareto", "budget", "needle", "fidelity"),
    model="embedded",
    model_help="embedded, a Hugging Face id or a local path (needs a tokenizer).",
    methods=DEFAULT_METHODS,
    quick_methods=QUICK_METHODS,
    allow_unknown_methods=True,
    telemetry_s=None,
    group_key=instance_group,
)
run = SUITE.run
