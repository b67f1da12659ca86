import io
import os
import subprocess
import sys
import threading
import time

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from kvbench.api import KVBenchError
from kvbench.cli import app, friendly

runner = CliRunner()


def test_methods_lists_full_with_its_parameters():
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0, r.output
    assert "full" in r.output and "grow" in r.output and ">= 1" in r.output


def test_env_names_the_attention_backend():
    r = runner.invoke(app, ["env"])
    assert r.exit_code == 0, r.output
    assert "attention backend" in r.output and "torch" in r.output


@pytest.mark.parametrize("args, needle", [
    (["generate", "--method", "nosuch", "hi"], "valid names: adakv, doublesparse, full,"),
    (["generate", "--method", "full:grow=0", "hi"], "'grow' = 0"),
    (["generate", "--method", "full:grow=x", "hi"], "grow"),
])
def test_bad_input_fails_cleanly_before_loading_a_model(args, needle):
    # a subprocess, to see exactly what a user sees: one line on stderr, exit code 2, no traceback
    r = subprocess.run([sys.executable, "-m", "kvbench.cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert "Loading" not in r.stderr


@pytest.mark.slow
def test_generate_prints_sensible_text():
    r = runner.invoke(app, ["generate", "--method", "full", "--device", "cpu", "-n", "12",
                            "What is the capital of France?"])
    assert r.exit_code == 0, r.output
    assert "Paris" in r.output


def cli(*args, env=None, timeout=180):
    """kvbench as a user runs it, output not on a terminal (as in CI or `| tee`)."""
    return subprocess.run([sys.executable, "-m", "kvbench.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_help_option_names_are_whole_at_80_columns():
    r = cli("generate", "--help", env={**os.environ, "COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    assert "--max-new-tokens" in r.stdout and "…" not in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80


def test_tables_are_not_cut_off_a_terminal():
    r = cli("methods", env={**os.environ, "COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    assert "tokens attended per step incl. the full-precision set" in r.stdout  # one line, not wrapped at 80


def test_progress_off_a_terminal_is_a_plain_line_with_done_left_estimate_and_current_cell():
    from kvbench.console import PlainProgress

    out = io.StringIO()
    now = [100.0]
    p = PlainProgress(Console(file=out, width=240), clock=lambda: now[0])
    p.description, p.total = "accuracy", 40
    assert p.line() == "accuracy: 0/40 cells done, 40 left, estimate after the first cell (0s so far)"
    for _ in range(12):
        p.advance(0)
    p.update(0, now="selfindex task=passkey context=1024")
    now[0] += 362
    assert p.line() == ("accuracy: 12/40 cells done, 28 left, about 14m 05s left (6m 02s so far); now: selfindex "
                        "task=passkey context=1024")


def test_a_sweep_off_a_terminal_prints_progress_while_a_long_cell_runs(tmp_path, monkeypatch):
    from kvbench import sweep
    from kvbench.records import RecordWriter

    out = io.StringIO()
    monkeypatch.setattr(sweep, "console", Console(file=out, width=240))
    monkeypatch.setattr("kvbench.console.EVERY_S", 0.01)
    printed = threading.Event()

    def runner(c):
        if c.cell["i"] == 1:  # a long cell: it ends only once the periodic line has named it
            deadline = time.monotonic() + 30
            while "now: m i=1" not in out.getvalue() and time.monotonic() < deadline:
                time.sleep(0.01)
            printed.set()
        return {"x": 1.0}

    cells = [sweep.Cell("m", {}, {"i": i}) for i in range(3)]
    sweep.run_sweep("toy", cells, runner, RecordWriter(tmp_path / "toy.jsonl"))
    text = out.getvalue()
    assert printed.is_set() and "now: m i=1" in text
    assert "toy: 0/3 cells done, 3 left" in text and "toy: 3/3 cells done, 0 left, finished" in text


def test_ctrl_c_exits_130_with_a_word():
    mini = typer.Typer()

    @mini.command()
    @friendly
    def slow():
        raise KeyboardInterrupt

    r = CliRunner().invoke(mini, [])
    assert r.exit_code == 130 and "interrupted (Ctrl-C)" in r.output and "resume" in r.output


def test_a_missing_model_path_says_so_and_leaves_no_folder(tmp_path):
    r = cli("generate", "--model", str(tmp_path / "nonexistent" / "path"), "hi")
    assert r.returncode == 2 and "no such path" in r.stderr and "Traceback" not in r.stderr
    out = tmp_path / "out"
    r = cli("run", "accuracy", "--quick", "--tasks", "passkey", "--model", "./nonexistent/path", "-o", str(out))
    assert r.returncode == 2 and "no such path" in r.stderr
    assert not out.exists()


def test_snapkv_capacity_below_its_window_is_refused_for_a_short_prompt():
    from kvbench.registry import parse_method

    with pytest.raises(KVBenchError, match="keeps 5 of this prompt's 44 tokens, no more than its 32-token observation"):
        parse_method("snapkv:capacity=0.1").check_context(44)
    parse_method("snapkv:capacity=0.1").check_context(4096)  # 410 tokens kept: votes choose 378 of them
    parse_method("snapkv:capacity=8").check_context(8)  # the whole prompt fits: nothing is evicted


def test_generate_refuses_it_before_the_model_runs():
    r = cli("generate", "-m", "snapkv:capacity=0.1", "--device", "cpu", "What is the capital of France?")
    assert r.returncode == 2, r.stderr
    assert "observation window" in r.stderr and "Traceback" not in r.stderr and r.stdout == ""


def test_cache_line_shows_live_bytes_per_token_apart_from_reserved():
    import torch

    from kvbench.api import LayerSpec
    from kvbench.cli import cache_line
    from kvbench.registry import parse_method

    spec = LayerSpec(0, 1, 4, 2, 8, torch.float32, torch.device("cpu"))
    layer = parse_method("full:grow=256").make_layer(spec)
    kv = torch.randn(1, 2, 44, 8)
    layer.prefill(torch.randn(1, 4, 44, 8), kv, kv)
    layer.extend(torch.randn(1, 4, 1, 8), kv[:, :, :1], kv[:, :, :1])  # outgrows the prompt: 256 tokens of headroom
    per_token = 2 * 2 * 8 * 4  # k and v, 2 heads, 8 dims, fp32
    assert layer.live_nbytes() == 45 * per_token and layer.nbytes() == (45 + 255) * per_token

    class Cache:
        def layer_caches(self):
            return [layer]

        def nbytes(self):
            return layer.nbytes()

        def get_seq_length(self):
            return 45

    line = cache_line(Cache())
    assert line.startswith(f"cache {per_token} B/token live (0.01 MiB for 45 tokens), 0.04 MiB reserved (headroom")


BROKEN_PLUGIN = """[kvbench.methods]
brokenplugin = kvbench_no_such_module:Thing
"""


def test_a_broken_plugin_is_reported_once_and_named_when_asked_for(tmp_path):
    dist = tmp_path / "site" / "kvbench_broken-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvbench-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(BROKEN_PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    r = cli("methods", env=env)
    assert r.returncode == 0 and "full" in r.stdout
    assert r.stderr.count("failed to load") == 1 and "UserWarning" not in r.stderr
    assert "brokenplugin" in r.stderr and "ModuleNotFoundError" in r.stderr
    r = cli("generate", "-m", "brokenplugin", "hi", env=env)
    assert r.returncode == 2 and "unknown method" not in r.stderr
    assert "method 'brokenplugin' is a plugin that failed to load" in r.stderr and "kvbench_no_such_module" in r.stderr
    assert r.stderr.count("failed to load") == 2  # the one-line notice, then the error that names it
