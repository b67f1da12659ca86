"""Run a script under Triton's interpreter in a subprocess: TRITON_INTERPRET must be set before triton is imported,
so a test cannot switch it on in its own process. The tests folder is on the script's path (oracles, ...)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_interpreted(script: str, timeout: int = 900) -> subprocess.CompletedProcess:
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' on Linux)")
    tests = str(Path(__file__).parent)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
