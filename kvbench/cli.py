"""kvbench's command line. Every command's --help says what it does; errors a user can fix print one line, no
traceback, and exit with code 2."""

from __future__ import annotations

import functools
import sys
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from kvbench.errors import KVBenchError
from kvbench.reports.cli import command as report_command
from kvbench.suite import all_suites
from kvbench.suites.compare import command as compare_command
from kvbench.console import make_console

# rich_markup_mode=None: click's plain help, which wraps the help text and never cuts an option name (rich's option
# table truncates names such as --prefill-max-tokens at 80 columns)
app = typer.Typer(help="Measure what KV-cache compression methods cost and save: accuracy, memory, kernel time and "
                       "decode throughput, into HTML reports.", no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False, rich_markup_mode=None)
run_app = typer.Typer(help="Run one suite over methods x parameters x cells, appending JSONL records.",
                      no_args_is_help=True, rich_markup_mode=None)
app.add_typer(run_app, name="run")
console = make_console()  # not a terminal (CI, | tee): wide, so tables are not cut to 80 columns
err_console = make_console(stderr=True)


INTERRUPTED = ("interrupted (Ctrl-C): the cells that finished are kept in the records; run the same command again "
               "to resume")


def friendly(fn):
    """Turn user-fixable errors into one clear line and exit code 2, and Ctrl-C into a word and exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KVBenchError as e:
            # soft_wrap: one line however long; escape: a message may hold [brackets] that are not markup
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print(f"[yellow]{INTERRUPTED}[/]", soft_wrap=True)
            raise typer.Exit(130) from None

    return wrapper


@app.command("methods")
@friendly
def methods_cmd():
    """List every registered method with its parameters, defaults and valid ranges."""
    from kvbench.registry import _load, available_methods, plugin_errors

    _load(quiet=True)  # the failures are listed below, once
    for name, cls in available_methods().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        title = doc[0] if doc else ""
        table = Table(title=f"[bold]{name}[/] - {title}", title_justify="left", show_lines=False)
        for col in ("parameter", "type", "default", "valid", "meaning"):
            table.add_column(col)
        for p in cls.describe():
            table.add_row(p.name, p.type, repr(p.default), p.valid, p.help)
        if not cls.describe():
            table.add_row("-", "-", "-", "-", "no parameters")
        console.print(table)
    for name, err in plugin_errors.items():
        err_console.print(f"[yellow]method plugin '{escape(name)}' failed to load:[/] {escape(err)}; fix or reinstall "
                          "the package that provides it", soft_wrap=True)


@app.command("env")
@friendly
def env_cmd():
    """Show Python, torch, CUDA, GPU, driver, NVML, flash-attn and the attention backend `full` will use."""
    import torch

    from kvbench.attention import planned_backend
    from kvbench.models import default_device
    from kvbench.records import environment

    env = environment()
    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    table = Table(show_header=False)
    rows = [("python", env["python"]), ("platform", env["platform"]), ("torch", env["torch"]),
            ("transformers", env["transformers"]), ("CUDA (torch build)", env["cuda"] or "none (CPU build)"),
            ("GPU", env["gpu"] or "none"), ("driver", env["driver"] or "n/a"), ("NVML", _nvml_status()),
            ("flash-attn", env["flash_attn"] or "not installed (PyTorch SDPA is used)"),
            ("full's attention backend", f"{planned_backend(device, dtype)} on {device.type} ({dtype})"),
            ("kvbench commit", env["commit"] or "unknown (not a git checkout)")]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)


def _nvml_status() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        return f"available, {pynvml.nvmlDeviceGetCount()} device(s)"
    except Exception as e:  # noqa: BLE001 - any NVML failure just means no telemetry
        return f"unavailable ({type(e).__name__}: {str(e) or 'no driver'})"


@app.command("generate")
@friendly
def generate_cmd(
    prompt: str = typer.Argument(..., help="The user message (wrapped in the chat template unless --raw)."),
    method: str = typer.Option("full", "--method", "-m", help="Method spec: name or name:key=value,key=value."),
    model: str = typer.Option("embedded", "--model", help="'embedded', a Hugging Face id, a local path, or "
                                                           "synthetic:<arch>."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Tokens to generate."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when present)."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32."),
    raw: bool = typer.Option(False, help="Feed the prompt as is, without the chat template."),
    graph: bool = typer.Option(True, "--graph/--no-graph", help="On a CUDA device, replay the decode steps from a "
                               "CUDA graph when the method is capture-safe (else eager); --no-graph: transformers' "
                               "generate."),
):
    """Generate text greedily with one method's cache, then print the text, speed and cache size."""
    from kvbench.registry import parse_method

    m = parse_method(method)  # validates before any model loads
    from kvbench.models import check_model_name

    check_model_name(model)
    import torch

    from kvbench.bridge import attach
    from kvbench.decoding import eos_ids
    from kvbench.graph_decode import generate_greedy
    from kvbench.models import load_model

    with err_console.status(f"loading {model} ..."):
        mdl, tok = load_model(model, device=device, dtype=dtype)
    if tok is None:
        raise KVBenchError(f"{model} has random weights and no tokenizer; generate needs a real model")
    if raw or not getattr(tok, "chat_template", None):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    else:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    m.check_context(ids.shape[1])  # e.g. a capacity below the observation window: refused before the model runs
    ids = ids.to(mdl.device)
    cache = attach(mdl, m)
    with torch.inference_mode():
        out, facts = generate_greedy(mdl, cache, ids, max_new_tokens, stop=eos_ids(mdl, tok), graph=graph)
    new = out[0]
    console.print(tok.decode(new, skip_special_tokens=True))
    mode = facts["decode_mode"] + (f" ({facts['graph_fallback']})" if facts.get("graph_fallback") else "")
    err_console.print(f"[dim]{escape(m.label())} on {mdl.device} | {ids.shape[1]} prompt + {len(new)} new tokens in "
                      f"{facts['seconds']:.2f} s | decode {escape(mode)} | {escape(cache_line(cache))}[/]",
                      soft_wrap=True)


def cache_line(cache) -> str:
    """The cache's live bytes per token (what holds the tokens seen) apart from the bytes it has reserved
    (preallocated headroom included), and what its first layer says about itself."""
    layers = cache.layer_caches()
    live, reserved, n = sum(c.live_nbytes() for c in layers), cache.nbytes(), cache.get_seq_length()
    info = layers[0].info() if layers else {}
    return (f"cache {live / max(n, 1):,.0f} B/token live ({live / 2**20:.2f} MiB for {n} tokens), "
            f"{reserved / 2**20:.2f} MiB reserved" + (" (headroom included)" if reserved > live else "")
            + (f" | {', '.join(f'{k}={v}' for k, v in info.items())}" if info else ""))


for _suite in all_suites().values():  # `kvbench run <suite>`, each generated from its declaration (kvbench/suite.py)
    run_app.command(_suite.name, help=_suite.help)(friendly(_suite.command()))
app.command("report")(friendly(report_command))
app.command("compare")(friendly(compare_command))


def main() -> None:  # pragma: no cover
    try:
        sys.exit(app())
    except KeyboardInterrupt:  # before a command started (e.g. while importing)
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
