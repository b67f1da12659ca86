"""The suite contract: a suite is one declaration; its CLI command, the comparison file's checks and its part of
`kvbench compare` are generated from it.

    SUITE = Suite(
        name="memory", help="...",                # `kvbench run memory` and its --help
        options=MemoryOptions,                     # a dataclass of option(...) fields: help, CPU / GPU / quick defaults
        cells=cells,                               # plan -> [Cell]: the grid, nothing measured
        setup=Session,                             # plan -> session: what one process builds once (a model, a budget)
        measure=measure,                           # (session, cell) -> the cell's metrics
        columns=(Column(...), ...),                # the table printed after a run
        report=("memory",))                        # the report sections (reports/build.py) that draw its records

and one line in SUITES below registers it. A run, step by step (`Suite.run` does all of it; a distributed driver
does it piecewise, the measuring part in other processes):

    suite = get_suite("memory")
    plan = suite.plan(methods, model="embedded", quick=True, contexts="1K")  # every option and method checked
    cells = suite.cells(plan)                                                # the grid, nothing measured
    for (suite_name, model, method), group in group_cells(plan, cells).items():
        session = suite.start(plan)                                          # once per process
        for record in suite.records(plan, group, session):                  # one record per cell, never raises
            writer.append(record)                                            # the driver's RecordWriter

Nothing here imports torch: `kvbench --help` and a bad option answer at once. Suites import their heavy modules
inside the functions that measure.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from kvbench.errors import KVBenchError, UnknownMethodError
from kvbench.records import RecordWriter, cell_key, git_commit, now_iso, read_records
from kvbench.sweep import Cell, SweepResult, console, measure_cell, pending, run_sweep

# The registry: every suite by name, and the module that declares it (as `SUITE`). Adding a suite is one line here.
SUITES: dict[str, str] = {
    "accuracy": "kvbench.suites.accuracy",
    "memory": "kvbench.suites.memory",
    "kernels": "kvbench.suites.kernels",
    "throughput": "kvbench.suites.throughput",
    "agreement": "kvbench.suites.agreement",
    "fidelity": "kvbench.suites.fidelity_at_length",
    "rag": "kvbench.suites.rag",
}

_UNSET: Any = dataclasses.MISSING
_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


# --------------------------------------------------------------------------------------------------------------------
# options


def option(help: str, default: Any = None, *, cpu: Any = _UNSET, gpu: Any = _UNSET, quick: Any = _UNSET,
           quick_cpu: Any = _UNSET, quick_gpu: Any = _UNSET, parse: Callable[[Any, str], Any] | None = None,
           choices: Sequence[str] | None = None, min: float | None = None) -> Any:
    """A suite option: a dataclass field with its one-line help and its defaults per profile.

    The default of a run on the GPU with --quick is the first one given of quick_gpu, quick, gpu, default (on the
    CPU: quick_cpu, quick, cpu, default). `parse(value, flag)` turns what a user wrote (text on the command line,
    text or a list in TOML) into the field's type, or raises KVBenchError naming the flag; an option with `parse` is
    text on the command line. `choices` and `min` are checked on every value, on the CLI and in comparison files."""
    profiles = dict(default=default, cpu=cpu, gpu=gpu, quick=quick, quick_cpu=quick_cpu, quick_gpu=quick_gpu)
    meta = dict(help=help, profiles={k: v for k, v in profiles.items() if v is not _UNSET}, parse=parse,
                choices=tuple(choices) if choices else None, min=min)
    return field(default=None, metadata=meta)


@dataclass
class Options:
    """Options every suite takes; a suite's own options dataclass subclasses this one."""

    device: Optional[str] = option("cuda, cuda:N or cpu (default: cuda when present).")
    dtype: str = option("auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32.", "auto")


@dataclass
class SyntheticOptions(Options):
    """Options of the suites that fill caches with synthetic keys and values (kvbench.synthetic)."""

    # 1 is kvbench.synthetic.Q_TAIL, which says why
    q_tail: int = option("Prefill queries per layer in a synthetic fill (the last positions; 32 for window-based "
                         "methods such as SnapKV).", 1, min=1)
    seed: int = option("Seed of the synthetic keys, values and prompts.", 0)


def profile_default(f: dataclasses.Field, gpu: bool, quick: bool) -> Any:
    """The field's default for a run on the GPU or the CPU, quick or not."""
    profiles = f.metadata["profiles"]
    order = (["quick_gpu" if gpu else "quick_cpu", "quick"] if quick else []) + ["gpu" if gpu else "cpu", "default"]
    return next((profiles[k] for k in order if k in profiles), None)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plain_type(hint: Any) -> Any:
    """Optional[int] -> int; anything else unchanged."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1
    return args[0] if optional else hint


def check_value(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """One option value as the suite will see it: parsed, type-checked, its choices and minimum enforced."""
    flag, meta = _flag(f.name), f.metadata
    if value is None:
        return None
    if meta["parse"] is not None:
        value = meta["parse"](value, flag)
    else:
        kind = _plain_type(hint)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind in _KINDS and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
            raise KVBenchError(f"{flag}: {value!r} must be {_KINDS[kind]}")
    if meta["choices"] and value not in meta["choices"]:
        raise KVBenchError(f"{flag}: unknown {f.name.replace('_', ' ')} '{value}'; valid: {', '.join(meta['choices'])}")
    if meta["min"] is not None and value < meta["min"]:
        raise KVBenchError(f"{flag}: {value} is below its minimum {meta['min']}")
    return value


# --------------------------------------------------------------------------------------------------------------------
# methods


@dataclass(frozen=True)
class Unavailable:
    """A method spec whose name no method is registered under (its plugin may not be installed here yet): a suite that
    allows it records its cells as failed with this reason instead of refusing the run."""

    spec: str
    reason: str
    family = None

    def label(self) -> str:
        return self.spec

    def params(self) -> dict:
        return {}


def resolve_methods(specs: Sequence[Any], *, allow_unknown: bool = False) -> list[Any]:
    """Parse every spec (text or a Method) before any work starts; 'all' is every registered method with its defaults.
    Duplicates (by label) are dropped. A bad parameter is an error; an unknown name too, unless `allow_unknown`."""
    from kvbench.api import Method
    from kvbench.registry import available_methods, check_specs, parse_method

    check_specs(specs, allow_unknown=allow_unknown)  # a bad spec fails before a good one imports the methods
    out: list[Any] = []
    for spec in specs:
        if isinstance(spec, str) and spec.strip() == "all":
            out.extend(cls() for cls in available_methods().values())
            continue
        try:
            out.append(parse_method(spec))
        except UnknownMethodError as e:
            if not allow_unknown or isinstance(spec, Method):
                raise
            console.print(f"[yellow]{e}; its cells will be recorded as failed[/]")
            out.append(Unavailable(spec.strip(), str(e)))
    unique: dict[str, Any] = {}
    for m in out:  # the first method of each label, in the order given
        unique.setdefault(m.label(), m)
    if not unique:
        raise KVBenchError("no methods given; use e.g. --methods full --methods selfindex:budget=0.1")
    return list(unique.values())


# --------------------------------------------------------------------------------------------------------------------
# the plan: one suite run, resolved


@dataclass
class Plan:
    """One run of a suite, every option checked and every default filled for its device and profile. Picklable (once
    `loaded` is None), so a driver can build it, list its cells and ship both to workers."""

    suite: str
    methods: list[Any]  # Method objects (and Unavailable ones where the suite allows them)
    model: str  # as the user gave it ("auto" included); each suite names the model its cells record
    quick: bool
    device: str  # "cpu", "cuda", "cuda:1": where the cells run; its kind picked the defaults
    options: Any  # the suite's options dataclass, filled
    loaded: Any = field(default=None, repr=False, compare=False)  # (model, tokenizer) already in memory, e.g. tests

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def torch_device(self):
        import torch

        return torch.device(self.device)


@dataclass(frozen=True)
class Column:
    """One column of the table a suite prints after a run: its header and how a row (a record, unless the suite
    declares `rows`) gives the value; numbers are formatted with `fmt`, None shows as '-'."""

    header: str
    value: Callable[[dict], Any]
    fmt: str = ""
    left: bool = False


def metric(name: str, scale: float = 1.0) -> Callable[[dict], Any]:
    """A column value: the record's metric `name` (divided by `scale`), or None."""
    def get(r: dict) -> Any:
        v = r.get("metrics", {}).get(name)
        return v / scale if isinstance(v, (int, float)) and not isinstance(v, bool) and scale != 1.0 else v
    return get


def cell_value(name: str) -> Callable[[dict], Any]:
    """A column value: the record's cell key `name`, or None."""
    return lambda r: r.get("cell", {}).get(name)


METHOD = Column("method", lambda r: r["method"], left=True)
STATUS = Column("status", lambda r: r["status"], left=True)


def group_cells(plan: Plan, cells: Sequence[Cell]) -> dict[tuple[str, str, str], list[Cell]]:
    """Cells by (suite, model, method label), in order: the cells of one group share a model load and a warm-up, so a
    distributed run sends each group to one worker."""
    groups: dict[tuple[str, str, str], list[Cell]] = {}
    for c in cells:
        groups.setdefault((plan.suite, str(c.cell.get("model")), c.method), []).append(c)
    return groups


# --------------------------------------------------------------------------------------------------------------------
# the declaration


@dataclass(frozen=True)
class Suite:
    """A suite: what it measures (cells, measure) and how it is asked (options), declared once."""

    name: str
    help: str  # the command's --help: what the suite measures
    options: type  # a dataclass subclassing Options, every field an option(...)
    cells: Callable[[Plan], list[Cell]]  # the grid of a plan, without measuring anything
    measure: Callable[[Any, Cell], dict]  # (session, cell) -> the cell's metrics; raise to record a failure
    setup: Callable[[Plan], Any] | None = None  # plan -> session, once per process before measuring; None: the plan
    columns: tuple[Column, ...] = ()
    rows: Callable[[list[dict]], list[dict]] | None = None  # records -> table rows (e.g. means); None: one per record
    report: tuple[str, ...] = ()  # ids of the report sections that draw its records (reports/build.py SECTIONS)
    model: str = "auto"  # the default --model
    model_help: str = "The model or attention shape."
    methods: tuple[str, ...] = ("all",)  # the default --methods
    quick_methods: tuple[str, ...] | None = None  # the default --methods of the quick profile; None: `methods`
    allow_unknown_methods: bool = False  # True: a method name not registered here gives failed cells, not an error
    telemetry_s: float | None = 0.05  # NVML sampling interval while a cell runs; None: no telemetry
    provenance: Callable[[Any], dict] | None = None  # session -> facts for the provenance file (e.g. copy bandwidth)
    # cell -> the group it shares a Ray worker with (kvbench/distributed.py); None: its method's cells
    group_key: Callable[[Cell], str] | None = None

    def default_methods(self, quick: bool) -> tuple[str, ...]:
        return self.quick_methods if quick and self.quick_methods is not None else self.methods

    # --- options -----------------------------------------------------------------------------------------------

    def option_fields(self) -> list[dataclasses.Field]:
        return list(dataclasses.fields(self.options))

    def check_options(self, values: dict[str, Any]) -> dict[str, Any]:
        """The given option values, parsed and checked (no torch, no device needed); raises KVBenchError naming the
        option. Unknown names are errors."""
        fields = {f.name: f for f in self.option_fields()}
        hints = typing.get_type_hints(self.options)
        for k in values:
            if k not in fields:
                raise KVBenchError(f"the {self.name} suite has no option '{k}'; its options: {', '.join(fields)} "
                                   f"(see `kvbench run {self.name} --help`)")
        return {k: check_value(fields[k], hints[k], v) for k, v in values.items()}

    def fill_options(self, given: dict[str, Any], gpu: bool, quick: bool) -> Any:
        """The options dataclass: what was given (checked), else the profile's default (checked the same way)."""
        hints = typing.get_type_hints(self.options)
        values = {}
        for f in self.option_fields():
            if given.get(f.name) is not None:
                values[f.name] = given[f.name]
            else:
                values[f.name] = check_value(f, hints[f.name], profile_default(f, gpu, quick))
        return self.options(**values)

    # --- a run, piece by piece ---------------------------------------------------------------------------------

    def plan(self, methods: Sequence[Any] | None = None, *, model: str | None = None, quick: bool = False,
             loaded: Any = None, check_device: bool = True, **options) -> Plan:
        """Check everything a run needs before it starts: options first (cheap), then methods, then the device.
        `loaded=(model, tokenizer)` reuses a model in memory (its device wins); `check_device=False` lets a driver
        without a GPU plan cells for GPU workers."""
        from kvbench.device import resolve_device

        given = self.check_options(options)
        ms = resolve_methods(list(methods) if methods else list(self.default_methods(quick)),
                             allow_unknown=self.allow_unknown_methods)
        dev = loaded[0].device if loaded is not None else resolve_device(given.get("device"), check=check_device)
        opts = self.fill_options(given, dev.type == "cuda", quick)
        return Plan(self.name, ms, model or self.model, quick, str(dev), opts, loaded)

    def start(self, plan: Plan) -> Any:
        """What this process builds once before measuring cells of `plan` (the suite's setup)."""
        if plan.loaded is None:
            from kvbench.device import resolve_device

            resolve_device(plan.device)  # a worker without the GPU the plan asks for fails here, before any cell
        return self.setup(plan) if self.setup is not None else plan

    def runner(self, session: Any) -> Callable[[Cell], dict]:
        """cell -> metrics in this process, with NVML telemetry around it when the suite samples it."""
        def run_one(c: Cell) -> dict:
            if isinstance(c.parsed, Unavailable):
                raise KVBenchError(c.parsed.reason)
            return self.measure(session, c)

        if self.telemetry_s is None:
            return run_one
        from kvbench.telemetry import with_telemetry

        return with_telemetry(run_one, interval_s=self.telemetry_s)

    def records(self, plan: Plan, cells: Sequence[Cell], session: Any = None) -> Iterator[dict]:
        """Measure `cells` of `plan` in this process and yield one record per cell (a failure is a record too); the
        caller writes them. `session` defaults to a fresh start(plan)."""
        run_one = self.runner(self.start(plan) if session is None else session)
        for c in cells:
            yield measure_cell(self.name, c, run_one)

    # --- a whole run -------------------------------------------------------------------------------------------

    def run(self, methods: Sequence[Any] | None, out: str | Path, *, model: str | None = None, quick: bool = False,
            rerun: bool = False, show_progress: bool = True, loaded: Any = None, **options) -> SweepResult:
        """Plan, list the cells, measure those `out/<name>.jsonl` does not have yet (all with rerun), append one record
        per cell, write the provenance, print the table."""
        plan = self.plan(methods, model=model, quick=quick, loaded=loaded, **options)
        cells = self.cells(plan)
        out = Path(out)
        writer = RecordWriter(out / f"{self.name}.jsonl")
        session = None
        if pending(self.name, cells, writer, rerun):
            session = self.start(plan)
            self.write_provenance(out, plan, session, rerun=rerun)
        runner = self.runner(session) if session is not None else None
        result = run_sweep(self.name, cells, runner, writer, description=self.name, rerun=rerun,
                           show_progress=show_progress)
        self.print_table(writer.path, cells, show=show_progress)
        return result

    def write_provenance(self, out: Path, plan: Plan, session: Any = None, **extra) -> None:
        """Append this run to `out/<name>.provenance.json`: the plan's methods and options, what the session measured
        once (the suite's `provenance`; none without a session, e.g. on a driver whose workers measured), `extra`."""
        from kvbench.telemetry import write_provenance

        options = dict(methods=[m.label() for m in plan.methods], model=plan.model, quick=plan.quick,
                       **dataclasses.asdict(plan.options), **extra)
        options["device"] = plan.device
        facts = self.provenance(session) if self.provenance is not None and session is not None else {}
        path = write_provenance(out, self.name, options, **facts)
        console.print(f"[dim]{self.name}: records in {out / (self.name + '.jsonl')}, provenance in {path}[/]")

    def print_table(self, path: Path, cells: Sequence[Cell], show: bool = True) -> None:
        """The table of this run's cells, from the latest record of each in `path` (earlier runs' included); a suite
        that declares `rows` (aggregates such as means with intervals) also writes them to `<name>.summary.json`."""
        from rich.table import Table

        keys = {cell_key(self.name, c.method, c.cell) for c in cells}
        recs, _ = read_records([path]) if Path(path).exists() else ([], [])
        latest = {k: r for r in recs if (k := cell_key(self.name, r["method"], r["cell"])) in keys}
        rows = self.rows(list(latest.values())) if self.rows is not None else list(latest.values())
        if self.rows is not None:
            summary = dict(suite=self.name, written_at=now_iso(), commit=git_commit(), records=len(latest), rows=rows)
            Path(path).with_name(f"{self.name}.summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if not show:
            return
        table = Table(title=self.name, title_justify="left")
        for col in self.columns:
            table.add_column(col.header, justify="left" if col.left else "right")
        for row in rows:
            table.add_row(*(_show(col.value(row), col.fmt) for col in self.columns))
        console.print(table)

    # --- the command line --------------------------------------------------------------------------------------

    def command(self) -> Callable[..., None]:
        """The typer command `kvbench run <name>`, generated from the declaration."""
        import typer

        from kvbench import distributed

        def command(**kw) -> None:
            specs = [s for m in (kw.pop("methods") or []) for s in m.split()]
            on_ray = distributed.take_cli_options(kw)
            if on_ray is not None:  # --ray: the same cells over a Ray cluster (kvbench/distributed.py)
                return distributed.run_suite_on_ray(self, specs or None, kw.pop("out"), model=kw.pop("model"),
                                                    quick=kw.pop("quick"), rerun=kw.pop("rerun"), on_ray=on_ray, **kw)
            result = self.run(specs or None, kw.pop("out"), model=kw.pop("model"), quick=kw.pop("quick"),
                              rerun=kw.pop("rerun"), **kw)
            console.print(f"{self.name}: {result.summary()}")

        P = inspect.Parameter
        params = [
            P("methods", P.KEYWORD_ONLY, annotation=Optional[list[str]], default=typer.Option(
                None, "--methods", "-m", help="Method specs, repeatable or space-separated: full, "
                "selfindex:budget=0.1, ... ('all': every registered method; default: " + " ".join(self.methods)
                + ("; --quick: " + " ".join(self.quick_methods) if self.quick_methods is not None else "") + ")."
            )),
            P("out", P.KEYWORD_ONLY, annotation=Path, default=typer.Option(
                Path("results"), "--out", "-o", help=f"Folder for {self.name}.jsonl and its provenance.")),
            P("model", P.KEYWORD_ONLY, annotation=str, default=typer.Option(self.model, help=self.model_help)),
            P("quick", P.KEYWORD_ONLY, annotation=bool, default=typer.Option(
                False, help="The quick profile: the 'quick' defaults below, for a fast check.")),
            P("rerun", P.KEYWORD_ONLY, annotation=bool, default=typer.Option(
                False, help=f"Measure cells again even if out/{self.name}.jsonl already has them.")),
        ]
        hints = typing.get_type_hints(self.options)
        inherited = {f.name for base in self.options.__mro__[1:] if dataclasses.is_dataclass(base)
                     for f in dataclasses.fields(base)}
        fields = sorted(self.option_fields(), key=lambda f: f.name in inherited)  # the suite's own options first
        params += [P(f.name, P.KEYWORD_ONLY, annotation=_cli_type(f, hints[f.name]), default=_cli_option(f))
                   for f in fields]
        params += [P(name, P.KEYWORD_ONLY, annotation=kind, default=opt)
                   for name, kind, opt in distributed.cli_options()]
        command.__signature__ = inspect.Signature(params)
        command.__doc__ = self.help
        command.__name__ = f"{self.name}_command"
        return command


def _cli_type(f: dataclasses.Field, hint: Any) -> Any:
    if f.metadata["parse"] is not None:
        return Optional[str]
    kind = _plain_type(hint)
    return kind if kind is bool else Optional[kind]


def _cli_option(f: dataclasses.Field) -> Any:
    import typer

    profiles = f.metadata["profiles"]
    fixed = set(profiles) <= {"default"}
    default = profiles.get("default") if fixed and f.metadata["parse"] is None else None
    help = f.metadata["help"]
    text = defaults_text(f)
    if text and not (fixed and default is not None):
        help = f"{help} ({text})"
    return typer.Option(default, help=help, min=f.metadata["min"])


def defaults_text(f: dataclasses.Field) -> str:
    """'default GPU 4K,32K, CPU 256; quick GPU 32K, CPU 256' (only what differs), '' without a default."""
    def show(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    parts = []
    for quick in (False, True):
        gpu, cpu = profile_default(f, True, quick), profile_default(f, False, quick)
        parts.append(None if gpu is None and cpu is None else show(gpu) if gpu == cpu
                     else f"GPU {show(gpu)}, CPU {show(cpu)}")
    if parts[0] is None:
        return ""
    return f"default {parts[0]}" + ("" if parts[1] == parts[0] else f"; quick {parts[1]}")


def _show(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, float)) and not isinstance(v, bool) and fmt:
        return format(v, fmt)
    return str(v)


def measure_group(plan: Plan, cells: Sequence[Cell]) -> list[dict]:
    """Measure `cells` of `plan` in this process (a worker: the plan and cells arrive pickled), its suite set up here;
    one record per cell, for the caller to write."""
    return list(get_suite(plan.suite).records(plan, cells))


# --------------------------------------------------------------------------------------------------------------------
# the registry


class SuiteMissing(KVBenchError):
    """A registered suite whose module this kvbench does not have."""


def get_suite(name: str) -> Suite:
    """The declaration of the suite `name`; KVBenchError naming the valid suites when there is none."""
    if name not in SUITES:
        raise KVBenchError(f"unknown suite '{name}'; valid suites: {', '.join(SUITES)}")
    try:
        mod = importlib.import_module(SUITES[name])
    except ModuleNotFoundError as e:
        if e.name == SUITES[name]:
            raise SuiteMissing(f"{SUITES[name]} does not exist in this kvbench yet") from None
        raise
    return mod.SUITE


def all_suites() -> dict[str, Suite]:
    """Every registered suite that this kvbench has, in registry order."""
    out = {}
    for name in SUITES:
        try:
            out[name] = get_suite(name)
        except SuiteMissing:
            continue
    return out
