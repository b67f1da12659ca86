import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kvbench.cli import app

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
