"""A check that transformers says nothing about its cache keyword: `past_key_values` is deprecated in favour of
`cache` (5.24 warns, 5.40 drops it), through `warnings` (deprecate_kwarg's FutureWarning) or its logger
(`warning_once`)."""

import contextlib
import logging
import re
import warnings

import pytest

CACHE_DEPRECATION = re.compile(r"past_key_values|cache_params|`cache`")


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def no_cache_deprecation():
    """Fails the test if the code inside makes transformers warn about the cache keyword."""
    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):
        once.cache_clear()  # else an earlier test's warning, printed once per process, would hide this one's
    keep, logger = _Keep(), logging.getLogger("transformers")
    logger.addHandler(keep)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(keep)
    said = [str(w.message) for w in caught] + keep.messages
    bad = [m for m in said if CACHE_DEPRECATION.search(m)]
    if bad:
        pytest.fail(f"transformers warned about the cache keyword: {bad[0]}")
