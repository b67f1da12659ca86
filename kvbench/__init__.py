"""kvbench: what a KV-cache compression method costs and saves, measured.

The names below load on first use (PEP 562), so `import kvbench.cli` does not pull in torch: `kvbench --help` and a
bad option answer at once."""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "KVBenchError": "kvbench.errors", "ParamError": "kvbench.errors", "UnknownMethodError": "kvbench.errors",
    "LayerCache": "kvbench.api", "LayerSpec": "kvbench.api", "Method": "kvbench.api", "budget_tokens": "kvbench.api",
    "param": "kvbench.api", "available_methods": "kvbench.registry", "get_method": "kvbench.registry",
    "parse_method": "kvbench.registry", "register": "kvbench.registry",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvbench' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
