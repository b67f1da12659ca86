"""kvbench: what a KV-cache compression method costs and saves, measured.

The names below load on first use (PEP 562), so `import kvbench.cli` does not pull in torch: `kvbench --help` and a
bad option answer at once."""

import importlib
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

_LAZY = {
    "KVBenchError": "kvbench.errors", "ParamError": "kvbench.errors", "UnknownMethodError": "kvbench.errors",
    "LayerCache": "kvbench.api", "LayerSpec": "kvbench.api", "Method": "kvbench.api", "budget_tokens": "kvbench.api",
    "param": "kvbench.api", "available_methods": "kvbench.registry", "get_method": "kvbench.registry",
    "parse_method": "kvbench.registry", "register": "kvbench.registry",
}

__all__ = [*_LAZY, "__version__"]


def _unshadow_hf_kernels() -> None:
    """Keep the checkout's `kernels/` (installed as `kvbench.kernels`) from standing in for Hugging Face's `kernels`.

    transformers depends on that package from 5.25 and imports it with its models. Where the checkout's root is on
    sys.path (`python -m pytest` or `python -m kvbench` run from it), `import kernels` would find this repository's
    folder instead and every model import would fail. kvbench itself is found through its install, so the root entry
    is not needed: drop it."""
    root = Path(__file__).resolve().parent.parent
    ours = root / "kernels" / "__init__.py"
    spec = importlib.util.find_spec("kernels")  # an imported one: its __spec__
    if spec is None or spec.origin is None or Path(spec.origin).resolve() != ours:
        return
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    sys.modules.pop("kernels", None)
    importlib.invalidate_caches()


_unshadow_hf_kernels()


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvbench' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
