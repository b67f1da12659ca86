"""kvbench.intervals: the percentile bootstrap over cells, a mean's interval and a paired difference."""

import numpy as np
import pytest

from kvbench.errors import KVBenchError
from kvbench.intervals import difference, mean_interval, paired_against


def test_coverage_on_a_known_distribution():
    """Bernoulli(0.7) samples of 100 cells: the 95% interval holds the true mean in about 95% of 300 draws."""
    rng = np.random.default_rng(123)
    hits = 0
    for i in range(300):
        iv = mean_interval(rng.random(100) < 0.7, resamples=1000, seed=i)
        hits += iv.lo <= 0.7 <= iv.hi
    assert 0.90 <= hits / 300 <= 0.985


def test_interval_width_follows_the_standard_error():
    """The half-width of a mean of n 0/1 cells is about 1.96 sqrt(p(1-p)/n)."""
    xs = [1] * 70 + [0] * 30
    iv = mean_interval(xs)
    assert iv.mean == pytest.approx(0.7)
    assert iv.half_width == pytest.approx(1.96 * (0.7 * 0.3 / 100) ** 0.5, rel=0.15)
    assert iv.lo < 0.7 < iv.hi and iv.n == 100


def test_deterministic_and_seeded():
    xs = np.random.default_rng(5).random(50)
    assert mean_interval(xs) == mean_interval(list(xs))
    assert mean_interval(xs, seed=1) != mean_interval(xs, seed=2)


def test_degenerate_inputs():
    assert mean_interval([]) is None
    one = mean_interval([0.5])
    assert (one.mean, one.lo, one.hi) == (0.5, 0.5, 0.5)
    same = mean_interval([1.0] * 20)
    assert same.lo == same.hi == 1.0
    with pytest.raises(KVBenchError, match="finite"):
        mean_interval([0.1, float("nan")])
    with pytest.raises(KVBenchError, match="level"):
        mean_interval([0.1, 0.2], level=1.5)


def test_paired_difference_is_narrower_than_unpaired_on_shared_cells():
    """Two methods that share the hard cells: pairing cancels what the cells share."""
    rng = np.random.default_rng(7)
    hard = rng.random(120)  # how hard each cell is, shared by both methods
    a = (hard > 0.3).astype(float)
    b = a.copy()
    b[rng.choice(120, 10, replace=False)] = 0.0  # b loses a few of a's cells
    paired, unpaired = difference(a, b), difference(a, b, paired=False)
    assert paired.mean == pytest.approx(unpaired.mean)
    assert paired.half_width < 0.5 * unpaired.half_width
    assert paired.lo > 0  # the loss is outside the paired interval, while the unpaired one straddles 0
    assert unpaired.lo < 0


def test_paired_needs_equal_lengths_and_pairs_by_key():
    with pytest.raises(KVBenchError, match="paired"):
        difference([1, 0], [1])
    a = {("c", 1): 1.0, ("c", 2): 0.0, ("c", 3): 1.0}
    ref = {("c", 2): 1.0, ("c", 3): 1.0, ("c", 4): 0.0}
    iv = paired_against(a, ref)
    assert iv.n == 2 and iv.mean == pytest.approx(-0.5)
    assert paired_against(a, {}) is None
