"""Knobs read by the benchmarks' own code paths, never by ``registry/``.

``ORCH_BENCH_SLOWDOWN`` (seconds, default 0) adds a busy wait to every timed operation of every benchmark.  It exists
to show the CI gate failing on a deliberately slowed build (``tests/test_bench_gate.py``); leave it unset otherwise.
"""

from __future__ import annotations

import os
import time

SLOWDOWN_ENV = "ORCH_BENCH_SLOWDOWN"


def _read() -> float:
    raw = os.environ.get(SLOWDOWN_ENV, "").strip()
    try:
        value = float(raw) if raw else 0.0
    except ValueError as exc:
        raise ValueError(f"{SLOWDOWN_ENV}={raw!r} is not a number of seconds") from exc
    return max(value, 0.0)


_SLOWDOWN = _read()


def slowdown() -> float:
    """The configured added delay per timed operation, in seconds."""
    return _SLOWDOWN


def delay() -> None:
    """Busy-wait for the configured slowdown (a sleep is too coarse for microsecond operations)."""
    if _SLOWDOWN:
        end = time.perf_counter() + _SLOWDOWN
        while time.perf_counter() < end:
            pass
