"""The checkout's `kernels/` folder must not stand in for Hugging Face's `kernels` package (a transformers dependency
from 5.25) when the checkout's root is on sys.path, as it is under `python -m pytest` run from it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_kvbench_from_the_checkout_root_unshadows_kernels():
    code = (
        "import importlib.util, kvbench\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else None)\n"
    )
    # `python -c` puts the working directory first on sys.path, like `python -m pytest`
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    assert origin != str(ROOT / "kernels" / "__init__.py"), origin


def test_kvbench_kernels_still_imports_from_the_checkout():
    out = subprocess.run(
        [sys.executable, "-c", "import kvbench.kernels as k; print(k.__file__)"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    assert Path(out.stdout.strip()).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
