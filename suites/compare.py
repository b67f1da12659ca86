"""compare: run the suites, methods, parameters and models one TOML file names, then build the HTML report.

    kvbench compare                               # the quick CPU comparison: comparisons/quick-cpu.toml
    kvbench compare comparisons/h100.toml --out results/h100 --include reports/data

The format is in comparisons/README.md. The file (tomllib on Python 3.11+, tomli on 3.10) is checked whole before
anything runs: a TOML syntax error, an unknown key or suite, an unknown method, a bad parameter, or an option the
suite does not declare or whose value its declaration refuses (kvbench/suite.py) fails at once with a message naming
the file, the key and the fix. Each suite writes `<out>/<suite>.jsonl`; the report is built from the record files in
`out` (provenance JSON beside them included) plus `include`. `--only NAME` runs one suite of the file and still
reports them all. A suite that fails while running is reported, the others still run and the report is still built,
and the command then exits non-zero.
"""

from __future__ import annotations

import itertools
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from kvbench.distributed import cli_options, take_cli_options
from kvbench.errors import KVBenchError
from kvbench.suite import SUITES, SuiteMissing, get_suite

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TOP_KEYS = {"title": str, "methods": list, "model": str, "models": list, "quick": bool, "include": list, "out": str,
            "suites": dict}
SUITE_KEYS = {"methods", "model", "models", "quick"}  # the contract's own arguments; the rest are options
DEFAULT_FILE = Path(__file__).resolve().parent.parent / "comparisons" / "quick-cpu.toml"


@dataclass
class SuitePlan:
    name: str
    methods: list[str]  # canonical labels, each parsed and validated
    models: list[str]
    quick: bool
    options: dict[str, Any]
    available: bool  # False: a known suite whose module this kvbench does not have yet
    missing_reason: str = ""


@dataclass
class Comparison:
    path: Path
    title: str
    suites: list[SuitePlan]
    include: list[Path] = field(default_factory=list)
    out: Path | None = None


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


def _fail(path: Path, key: str, problem: str, fix: str) -> KVBenchError:
    return KVBenchError(f"{_where(path, key)}: {problem}; fix: {fix}")


def expand_methods(path: Path, key: str, entries: Any) -> list[str]:
    """Method entries -> validated, de-duplicated method labels (what the suites' `methods` argument takes)."""
    from kvbench.registry import available_methods, check_specs, get_method, parse_method

    if not isinstance(entries, list) or not entries:
        raise _fail(path, key, "must be a non-empty list of method specs",
                    'write e.g. methods = ["full", "selfindex:budget=0.1"]')
    labels: list[str] = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        try:
            if i == 0:  # every text spec first, so a bad one fails before a good one imports the methods
                for j, later in enumerate(entries):
                    where = f"{key}[{j}]"
                    check_specs([later])
                where = f"{key}[{i}]"
            if isinstance(entry, str):
                if entry.strip() == "all":
                    labels += [cls().label() for cls in available_methods().values()]
                    continue
                specs = [entry]
            elif isinstance(entry, dict):
                name = entry.get("name")
                if not isinstance(name, str):
                    raise _fail(path, where, "an inline method table needs a string `name`",
                                'write e.g. {name = "selfindex", budget = [0.05, 0.1]}')
                cls = get_method(name)
                fields = {p.name for p in cls.describe()}
                params = {k: v for k, v in entry.items() if k != "name"}
                for k in params:
                    if k not in fields:
                        raise _fail(path, f"{where}.{k}", f"method '{name}' has no parameter '{k}'",
                                    f"use one of: {', '.join(sorted(fields)) or 'none'}")
                grid = [v if isinstance(v, list) else [v] for v in params.values()]
                specs = []
                for combo in itertools.product(*grid):
                    specs.append(cls(**dict(zip(params, combo))))
            else:
                raise _fail(path, where, f"a method must be a string or an inline table, not {type(entry).__name__}",
                            'write "name:key=value" or {name = "...", key = value}')
            labels += [parse_method(s).label() for s in specs]
        except KVBenchError as e:
            if str(e).startswith(str(path)):
                raise
            raise _fail(path, where, str(e), "see `kvbench methods` for valid names, parameters and ranges") from None
        except TypeError as e:  # a wrong value type reaching a dataclass
            raise _fail(path, where, str(e), "see `kvbench methods`") from None
    return list(dict.fromkeys(labels))


def _models(path: Path, key: str, table: dict, default: list[str]) -> list[str]:
    if "model" in table and "models" in table:
        raise _fail(path, key, "has both `model` and `models`", "keep one of them")
    if "model" in table:
        if not isinstance(table["model"], str):
            raise _fail(path, f"{key}model", "must be a string", 'write e.g. model = "embedded"')
        return [table["model"]]
    if "models" in table:
        ms = table["models"]
        if not isinstance(ms, list) or not ms or not all(isinstance(m, str) for m in ms):
            raise _fail(path, f"{key}models", "must be a non-empty list of strings",
                        'write e.g. models = ["embedded", "synthetic:llama-3.1-8b"]')
        return list(ms)
    return default


def _suite(name: str):
    """The suite's declaration, or None with the reason when this kvbench does not have its module."""
    try:
        return get_suite(name), ""
    except SuiteMissing as e:
        return None, str(e)


def _check_options(path: Path, key: str, suite, options: dict) -> None:
    """Every option of a [suites.<name>] table against the suite's declaration: its name, type and value."""
    names = [f.name for f in suite.option_fields()]
    for k, v in options.items():
        if k not in names:
            raise _fail(path, f"{key}.{k}", f"the {suite.name} suite has no option '{k}'",
                        f"its options: {', '.join(names) or 'none'} (see `kvbench run {suite.name} --help`; "
                        "TOML keys use underscores)")
        try:
            suite.check_options({k: v})
        except KVBenchError as e:
            raise _fail(path, f"{key}.{k}", str(e), f"see `kvbench run {suite.name} --help`") from None


def load_comparison(path: str | Path) -> Comparison:
    """Parse and check a comparison file; raises KVBenchError naming the file, the key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise KVBenchError(f"comparison file {path} does not exist; pass a TOML file (see comparisons/README.md) or "
                           "no file for the quick CPU comparison")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise KVBenchError(f"{path}: TOML syntax error: {e}; fix the line it names (strings need quotes, tables "
                           "are [suites.name])") from None
    except UnicodeDecodeError as e:
        raise KVBenchError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8") from None
    for k, v in data.items():
        if k not in TOP_KEYS:
            raise _fail(path, k, "unknown key", f"valid top-level keys: {', '.join(TOP_KEYS)}; suite options go in "
                                                f"a [suites.<name>] table")
        if not isinstance(v, TOP_KEYS[k]):
            raise _fail(path, k, f"must be a {TOP_KEYS[k].__name__}, not {type(v).__name__}",
                        "see the format in comparisons/README.md")
    suites = data.get("suites")
    if not suites:
        raise _fail(path, "suites", "no suite to run",
                    f"add a table such as [suites.accuracy]; valid suites: {', '.join(SUITES)}")
    default_methods = expand_methods(path, "methods", data["methods"]) if "methods" in data else None
    default_models = _models(path, "", data, ["embedded"])
    default_quick = data.get("quick", False)
    plans = []
    for name, table in suites.items():
        key = f"suites.{name}"
        if not isinstance(table, dict):
            raise _fail(path, key, "must be a table", f"write [suites.{name}] followed by its keys")
        if name not in SUITES:
            raise _fail(path, key, f"unknown suite '{name}'", f"valid suites: {', '.join(SUITES)}")
        suite, why = _suite(name)
        if "methods" in table:
            methods = expand_methods(path, f"{key}.methods", table["methods"])
        elif default_methods is not None:
            methods = default_methods
        else:
            raise _fail(path, f"{key}.methods", "no methods for this suite",
                        "add methods = [...] at the top of the file or in this table")
        quick = table.get("quick", default_quick)
        if not isinstance(quick, bool):
            raise _fail(path, f"{key}.quick", "must be true or false", "write quick = true")
        options = {k: v for k, v in table.items() if k not in SUITE_KEYS}
        if suite is not None:
            _check_options(path, key, suite, options)
        plans.append(SuitePlan(name, methods, _models(path, f"{key}.", table, default_models), quick, options,
                               suite is not None, why))
    if not all(isinstance(p, (str, Path)) for p in data.get("include", [])):
        raise _fail(path, "include", "must be a list of paths", 'write include = ["reports/data"]')
    # relative to the comparison file, so a file means the same wherever it is run from
    include = [p if p.is_absolute() else path.parent / p for p in map(Path, data.get("include", []))]
    return Comparison(path, data.get("title") or f"kvbench comparison: {path.stem}", plans, include,
                      Path(data["out"]) if "out" in data else None)


def run_comparison(comp: Comparison, out: Path, *, report: Path | None = None, include: list[Path] = (),
                   rerun: bool = False, ray: dict | None = None) -> tuple[Path, list[str]]:
    """Run every suite of the comparison into `out`, then build the report. Returns (report path or None when plotly
    is missing here, errors). `ray`: run on a Ray cluster instead (kvbench.distributed.run_plans_on_ray's options)."""
    from kvbench.sweep import console

    errors: list[str] = []
    if ray is not None:
        from kvbench.distributed import run_plans_on_ray

        errors = run_plans_on_ray(comp.suites, out, rerun=rerun, **ray)
    for plan in comp.suites if ray is None else []:
        if not plan.available:
            console.print(f"[yellow]compare: suite '{plan.name}' skipped: {escape(plan.missing_reason)}[/]")
            continue
        suite = get_suite(plan.name)
        for model in plan.models:
            console.rule(f"[bold]{plan.name}[/] · {escape(model)} · {len(plan.methods)} method(s)"
                         + (" · quick" if plan.quick else ""))
            try:
                result = suite.run(list(plan.methods), out, model=model, quick=plan.quick, rerun=rerun, **plan.options)
                console.print(f"compare: {plan.name} on {escape(model)}: {result.summary()}")
            except KVBenchError as e:
                errors.append(f"{plan.name} on {model}: {e}")
                console.print(f"[red]compare: {plan.name} on {escape(model)} stopped: {escape(str(e))}[/]")
            except Exception as e:  # noqa: BLE001 - one broken suite must not cost the others' results
                errors.append(f"{plan.name} on {model}: {type(e).__name__}: {e}")
                console.print(f"[red]compare: {plan.name} on {escape(model)} crashed:[/]\n" + escape("".join(
                    traceback.format_exception(e)[-6:])))
    # every suite's records in `out`, this run's and earlier ones (e.g. other suites run with --only)
    written = sorted(out.glob("*.jsonl")) if out.is_dir() else []
    inputs = written + [p for p in [*comp.include, *include] if p.exists()]
    for p in [*comp.include, *include]:
        if not p.exists():
            console.print(f"[yellow]compare: include {escape(str(p))} does not exist; left out of the report[/]")
    try:
        from kvbench.reports.build import build_report
    except ImportError as e:  # e.g. a GPU machine without plotly: the records are what matters there
        console.print(f"[yellow]compare: no report built here ({escape(str(e))}); the records are in {escape(str(out))}"
                      f"; build it where plotly is installed: kvbench report {escape(str(out))} -o report.html[/]")
        return None, errors
    path, inp = build_report(inputs, report or out / "report.html", comp.title)
    console.print(f"compare: report from {len(inp.records)} records, {len(inp.problems)} problem(s)")
    return path, errors


_RAY = {name: option for name, _, option in cli_options()}  # --ray and its options, as `kvbench run` has them


def command(
    file: Optional[Path] = typer.Argument(None, help="Comparison TOML file (format: comparisons/README.md). Default: "
                                                     "the quick CPU comparison, comparisons/quick-cpu.toml."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the records (default: the file's `out`, "
                                                                 "else results/)."),
    report: Optional[Path] = typer.Option(None, "--report", help="The HTML report to write (default "
                                                                 "<out>/report.html)."),
    include: list[Path] = typer.Option([], "--include", help="More record files or folders for the report, "
                                                             "repeatable (e.g. reports/data)."),
    rerun: bool = typer.Option(False, help="Measure cells again even if the records already have them."),
    check: bool = typer.Option(False, help="Only check the file and print the plan; run nothing."),
    only: list[str] = typer.Option([], "--only", help="Run only these suites of the file, repeatable (e.g. --only "
                                                      "kernels); the report still includes every record in --out."),
    ray: bool = _RAY["ray"],
    ray_address: Optional[str] = _RAY["ray_address"],
    workers: Optional[int] = _RAY["workers"],
    cell_timeout: float = _RAY["cell_timeout"],
):
    """Run several suites over methods, parameters and models from one TOML file, then build the HTML report."""
    from kvbench.sweep import console

    comp = load_comparison(file or DEFAULT_FILE)
    unknown = [n for n in only if n not in {p.name for p in comp.suites}]
    if unknown:
        raise KVBenchError(f"--only {', '.join(unknown)}: not a suite of {comp.path}; its suites: "
                           f"{', '.join(p.name for p in comp.suites)}")
    if only:
        comp.suites = [p for p in comp.suites if p.name in only]
    out = out or comp.out or Path("results")
    from kvbench.registry import parse_method

    for plan in comp.suites:
        state = "" if plan.available else f"  [yellow](skipped: {escape(plan.missing_reason)})[/]"
        opts = ", ".join(f"{k}={v!r}" for k, v in plan.options.items())
        methods = ", ".join(parse_method(m).spec() for m in plan.methods)  # every parameter, defaults included
        console.print(f"[bold]{plan.name}[/]: " + escape(f"{methods} on {', '.join(plan.models)}"
                      + (" (quick)" if plan.quick else "") + (f"; {opts}" if opts else "")) + state)
    if check:
        return
    on_ray = take_cli_options(dict(ray=ray, ray_address=ray_address, workers=workers, cell_timeout=cell_timeout))
    path, errors = run_comparison(comp, out, report=report, include=include, rerun=rerun, ray=on_ray)
    if errors:
        raise KVBenchError(f"{len(errors)} suite run(s) failed: {' | '.join(errors)}; the report was still built: "
                           f"{path}")
    print(path or out)
