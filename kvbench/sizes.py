"""Sizes as people write them ('32K' tokens, '40G' bytes) and the search for the largest size that still fits."""

from __future__ import annotations

import re
from typing import Callable, Sequence

from kvbench.errors import KVBenchError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")


def parse_size(text: str | int, what: str, *, unit: int = 1024) -> int:
    """'32K' -> 32768, '1M' -> 1048576, '4096' -> 4096 (token counts use 1024 as K, like 128K contexts)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise KVBenchError(f"{what}: '{text}' is not a size; use e.g. 4096, 32K, 1M")
    mult = {"": 1, "k": unit, "m": unit**2, "g": unit**3, "t": unit**4}[m.group(2).lower()]
    value = float(m.group(1)) * mult
    if value < 1 or not float(value).is_integer():
        raise KVBenchError(f"{what}: '{text}' must be a whole number >= 1")
    return int(value)


def parse_sizes(text: str | int | Sequence[int | str], what: str) -> list[int]:
    """'4K,32K,128K', 256 or [4096, 32768] -> sorted unique ints."""
    if isinstance(text, int):
        return [parse_size(text, what)]
    if not isinstance(text, str):
        return sorted({parse_size(x, what) for x in text})
    items = [s for s in text.replace(" ", "").split(",") if s]
    if not items:
        raise KVBenchError(f"{what}: give at least one value, e.g. 4K,32K")
    return sorted({parse_size(s, what) for s in items})


def parse_bytes(text: str | int | None, what: str = "--budget") -> int | None:
    """'40G', '512M', '8GiB' or a byte count; None, 'free' and 'auto' stay None (use the free memory)."""
    if text is None or (isinstance(text, str) and text.lower() in ("", "free", "auto")):
        return None
    return parse_size(text, what)


def search_max(fits: Callable[[int], tuple[bool, dict]], start: int, limit: int, step: int = 1, rel: float = 0.0
               ) -> tuple[int, list[dict]]:
    """Largest n in [start, limit], a multiple of `step`, with fits(n) true, assuming fitting is monotone: double from
    `start` until a probe fails or `limit` is reached, then bisect until the bracket is `step` wide (or, with rel > 0,
    rel * n wide: the true answer is then below n * (1 + rel), for fewer probes). Returns (n, probe trail); n is 0
    when even `start` does not fit. `fits(n)` returns (ok, facts about the probe)."""
    if start < 1 or step < 1 or limit < start:
        raise ValueError(f"search_max: need 1 <= start <= limit and step >= 1, got {start}, {limit}, {step}")
    trail: list[dict] = []

    def probe(n: int) -> bool:
        ok, facts = fits(n)
        trail.append({"n": n, "fits": bool(ok), **facts})
        return ok

    if not probe(start):
        return 0, trail
    lo, hi = start, None
    while lo < limit:
        n = min(2 * lo, limit)
        if probe(n):
            lo = n
        else:
            hi = n
            break
    if hi is None:
        return lo, trail
    while hi - lo > max(step, int(rel * lo)):
        mid = lo + max(step, (hi - lo) // 2 // step * step)
        if mid >= hi:
            break
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, trail
