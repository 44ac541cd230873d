"""Percentiles and summaries of latency samples (pytest-benchmark's own stats have no percentiles)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """The *q*-th percentile (0-100) of *samples*, linearly interpolated like numpy's default; nan if empty."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(samples_ns: Sequence[int | float], prefix: str) -> dict[str, float]:
    """``{prefix}_p50_ms``, ``_p95_ms``, ``_p99_ms``, ``_max_ms`` and ``_n`` of nanosecond samples, rounded."""
    out: dict[str, float] = {f"{prefix}_n": len(samples_ns)}
    for q in (50, 95, 99):
        out[f"{prefix}_p{q}_ms"] = round(percentile(samples_ns, q) / 1e6, 4)
    out[f"{prefix}_max_ms"] = round(max(samples_ns) / 1e6, 4) if samples_ns else math.nan
    return out


def median(samples: Sequence[float]) -> float:
    return percentile(samples, 50)
