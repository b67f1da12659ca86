"""kvbench: what a KV-cache compression method costs and saves, measured."""

from kvbench.api import (
    KVBenchError,
    LayerCache,
    LayerSpec,
    Method,
    ParamError,
    UnknownMethodError,
    budget_tokens,
    param,
)
from kvbench.registry import available_methods, get_method, parse_method, register

__version__ = "0.1.0"

__all__ = [
    "KVBenchError", "LayerCache", "LayerSpec", "Method", "ParamError", "UnknownMethodError", "budget_tokens",
    "param", "available_methods", "get_method", "parse_method", "register", "__version__",
]
