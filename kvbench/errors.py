"""Errors a user can fix. Kept free of torch so the CLI can print them before any heavy import."""

from __future__ import annotations

from typing import Any


class KVBenchError(Exception):
    """An error a user can fix: the CLI prints its message, without a traceback, and exits non-zero."""


class ParamError(KVBenchError, ValueError):
    def __init__(self, method: str, name: str, value: Any, valid: str):
        self.method, self.name, self.value, self.valid = method, name, value, valid
        super().__init__(f"method '{method}': parameter '{name}' = {value!r} is invalid; valid: {valid}")


class UnknownMethodError(KVBenchError, KeyError):
    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        super().__init__(name)

    def __str__(self) -> str:
        return f"unknown method '{self.name}'; valid names: {', '.join(self.known)}"
