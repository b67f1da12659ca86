"""`kvbench report RESULTS... -o report.html`: one offline HTML page from record files, folders and benchmark JSON."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from kvbench.errors import KVBenchError
from kvbench.console import make_console

console = make_console(stderr=True)


def command(
    results: list[Path] = typer.Argument(..., help="JSONL record files and/or folders (read recursively; provenance "
                                                   "JSON beside them is read too), and pytest-benchmark JSON files."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML file to write."),
    title: str = typer.Option("kvbench report", "--title", help="The page title."),
):
    """Build one self-contained HTML report (plotly inlined, works offline) from any mix of suites and machines."""
    try:
        from kvbench.reports.build import build_report
    except ImportError as e:
        raise KVBenchError(f"kvbench report needs plotly ({e}): pip install plotly") from None

    missing = [str(p) for p in results if not p.exists()]
    if len(missing) == len(results):
        raise KVBenchError(f"none of the inputs exist ({', '.join(missing)}); pass record files or folders, "
                           "e.g. `kvbench report results/`")
    path, inp = build_report(results, out, title, require_records=True)
    for p in inp.problems[:10]:
        console.print(f"[yellow]problem[/] {escape(f'{p.file}:{p.line}: {p.reason}')}", highlight=False)
    if len(inp.problems) > 10:
        console.print(f"[yellow]... and {len(inp.problems) - 10} more problems (listed in the report)[/]")
    console.print(f"{len(inp.records)} records from {len(inp.files)} file(s), {len(inp.problems)} problem(s)")
    print(path)
