"""Bootstrap confidence intervals over cells: a mean with its interval, and the difference of two methods' means.

A cell (one task instance under one protocol) is the unit resampled: the accuracy suite's cells are drawn
independently (task, length, depth, seed), so resampling them with replacement estimates how far the mean would move
on another draw of cells (the percentile bootstrap, Efron & Tibshirani 1993, ch. 13). A difference between two methods
is paired when both were scored on the same cells: the same resampled cells enter both means, so what the cells
share (an instance every method finds hard) cancels and the interval is narrower than two separate ones suggest.

Seeded and deterministic: the same values and seed give the same interval in every process (numpy's PCG64).

    mean_interval([1, 0, 1, 1]) -> Interval(mean=0.75, lo=..., hi=..., n=4)
    difference(a, b) -> Interval of mean(a) - mean(b), paired cell by cell (a[i] and b[i] are one cell)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kvbench.errors import KVBenchError

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A statistic and its bootstrap interval [lo, hi] at `level`, over n cells."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = LEVEL

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def text(self, fmt: str = ".3f") -> str:
        """'0.722 [0.61, 0.83]'."""
        return f"{self.mean:{fmt}} [{self.lo:.2f}, {self.hi:.2f}]"

    def as_dict(self) -> dict:
        return dict(mean=self.mean, lo=self.lo, hi=self.hi, n=self.n, level=self.level)


def _values(xs: Sequence[float], what: str) -> np.ndarray:
    a = np.asarray([float(x) for x in xs], dtype=np.float64)
    if a.ndim != 1 or not np.all(np.isfinite(a)):
        raise KVBenchError(f"{what}: the values to bootstrap must be finite numbers, one per cell")
    return a


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise KVBenchError(f"interval level {level} must be in (0, 1), e.g. 0.95")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


def _resampled_means(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return a[idx].mean(axis=1)


def mean_interval(xs: Sequence[float], *, resamples: int = RESAMPLES, level: float = LEVEL,
                  seed: int = SEED) -> Interval | None:
    """The mean of xs with its percentile-bootstrap interval; None for no values (one value: a zero-width
    interval, since one cell says nothing about the spread)."""
    a = _values(xs, "mean_interval")
    if a.size == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    lo, hi = _percentiles(_resampled_means(a, idx), level)
    return Interval(float(a.mean()), lo, hi, int(a.size), level)


def difference(a: Sequence[float], b: Sequence[float], *, paired: bool = True, resamples: int = RESAMPLES,
               level: float = LEVEL, seed: int = SEED) -> Interval | None:
    """mean(a) - mean(b) with its bootstrap interval. paired: a[i] and b[i] were scored on the same cell, and one
    resample of cells enters both means (a and b must be equally long); unpaired: each side is resampled on its own.
    None when either side has no values."""
    x, y = _values(a, "difference"), _values(b, "difference")
    if x.size == 0 or y.size == 0:
        return None
    rng = np.random.default_rng(seed)
    if paired:
        if x.size != y.size:
            raise KVBenchError(f"a paired difference needs one value per cell on both sides, got {x.size} and "
                               f"{y.size}; pair the cells first (or pass paired=False)")
        stats = _resampled_means(x - y, rng.integers(0, x.size, size=(resamples, x.size)))
    else:
        stats = (_resampled_means(x, rng.integers(0, x.size, size=(resamples, x.size)))
                 - _resampled_means(y, rng.integers(0, y.size, size=(resamples, y.size))))
    lo, hi = _percentiles(stats, level)
    return Interval(float(x.mean() - y.mean()), lo, hi, int(min(x.size, y.size) if paired else x.size + y.size),
                    level)


def paired_against(scores: dict, reference: dict) -> Interval | None:
    """The paired difference of two methods over the cells both were scored on: dicts cell key -> score."""
    common = sorted(set(scores) & set(reference), key=repr)
    if not common:
        return None
    return difference([scores[k] for k in common], [reference[k] for k in common])
