"""The targets of issues 6 and 14, judged from the benchmarks' ``extra_info``: reported, never asserted in a timed test.

Every benchmark records a dict with a ``bench`` key (``deploy``, ``lock-contention``, ``throughput``, ``harness``...)
and its parameters; :func:`evaluate` finds the figures each target needs among them.  The terminal summary of
``pytest benchmarks/`` and ``python -m benchmarks.report`` both print the result.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Info = Mapping[str, Any]


@dataclass(frozen=True)
class Target:
    name: str
    want: str
    measured: str
    met: bool | None  # None: not measured in this run

    @property
    def verdict(self) -> str:
        return {True: "met", False: "MISSED", None: "not measured"}[self.met]


def _find(infos: Iterable[Info], **match: Any) -> Info | None:
    for info in infos:
        if all(info.get(k) == v for k, v in match.items()):
            return info
    return None


def _num(info: Info | None, key: str) -> float:
    value = info.get(key) if info is not None else None
    return float(value) if isinstance(value, int | float) else math.nan


def _judge(value: float, ok: bool) -> bool | None:
    return None if math.isnan(value) else ok


def _shown(text: str, *values: float) -> str:
    """*text*, or "-" when a figure it needs was not measured."""
    return "-" if any(math.isnan(v) for v in values) else text


def evaluate(infos: Iterable[Info]) -> list[Target]:
    infos = list(infos)
    out: list[Target] = []

    one = _find(infos, bench="throughput", workload="reference-update", procs=1)
    ten = _find(infos, bench="throughput", workload="reference-update", procs=10)
    ops10, ops1 = _num(ten, "ops_per_s"), _num(one, "ops_per_s")
    out.append(Target("reference update throughput, 10 processes", ">= 1,500 ops/s",
                      _shown(f"{ops10:,.0f} ops/s", ops10), _judge(ops10, ops10 >= 1500)))
    ratio = ops10 / ops1 if ops1 else math.nan
    out.append(Target("reference update throughput, 10 vs 1 process", ">= 85 %",
                      _shown(f"{ratio:.0%} ({ops10:,.0f} / {ops1:,.0f} ops/s)", ratio), _judge(ratio, ratio >= 0.85)))

    store = _find(infos, bench="lock-contention", lock="store", procs=10)
    flock = _find(infos, bench="lock-contention", lock="flock", procs=10)
    p99s, p99f = _num(store, "lock_wait_p99_ms"), _num(flock, "lock_wait_p99_ms")
    lock_ratio = p99s / p99f if p99f else math.nan
    out.append(Target("lock-wait p99, 10 processes, store lock vs blocking flock", "<= 2x",
                      _shown(f"{lock_ratio:.2f}x ({p99s:.1f} ms vs {p99f:.1f} ms)", lock_ratio),
                      _judge(lock_ratio, lock_ratio <= 2)))

    legacy = _find(infos, bench="deploy", impl="legacy", agents=1000, tmux="real")
    ref = _find(infos, bench="deploy", impl="reference", agents=1000, tmux="real")
    ml, mr = _num(legacy, "median_ms"), _num(ref, "median_ms")
    speedup = ml / mr if mr else math.nan
    out.append(Target("deploy at 1,000 agents, legacy / reference (real tmux)", ">= 4x",
                      _shown(f"{speedup:.2f}x ({ml:.1f} ms vs {mr:.1f} ms)", speedup), _judge(speedup, speedup >= 4)))
    reads = _num(ref, "task_reads")
    out.append(Target("reference deploy reads the task registry", "once",
                      _shown(f"{reads:.0f} read(s) (legacy: {_num(legacy, 'task_reads'):.0f})", reads),
                      _judge(reads, reads == 1)))

    for op, what in (("deploy", "a deploy (real tmux)"), ("status", "a status change")):
        small = _find(infos, bench="history", op=op, variant="reference", agents=100)
        large = _find(infos, bench="history", op=op, variant="reference", agents=50_000)
        before = _find(infos, bench="history", op=op, variant="before: no archive", agents=50_000)
        before_small = _find(infos, bench="history", op=op, variant="before: no archive", agents=100)
        ms, ml = _num(small, "median_ms"), _num(large, "median_ms")
        growth = ml / ms if ms else math.nan
        was = _num(before, "median_ms") / _num(before_small, "median_ms") if before_small else math.nan
        was_text = f"; without the archive in this run: {was:.1f}x" if not math.isnan(was) else ""
        out.append(Target(f"flat: {what} at 50,000 agents in the history vs 100 (issue 14)", "<= 2x",
                          _shown(f"{growth:.2f}x ({ml:.1f} ms vs {ms:.1f} ms{was_text})", growth),
                          _judge(growth, growth <= 2)))

    sqlite1 = _find(infos, bench="throughput", workload="sqlite-wal-full", procs=1)
    sqlite10 = _find(infos, bench="throughput", workload="sqlite-wal-full", procs=10)
    for procs, ref, lite, want in ((1, one, sqlite1, 0.5), (10, ten, sqlite10, 1.0)):
        r, q = _num(ref, "ops_per_s"), _num(lite, "ops_per_s")
        rel = r / q if q else math.nan
        out.append(Target(f"durable update, {procs} process{'es' if procs > 1 else ''}, reference vs SQLite WAL"
                          " FULL (issue 14)", f">= {want:g}x",
                          _shown(f"{rel:.2f}x ({r:,.0f} vs {q:,.0f} ops/s)", rel), _judge(rel, rel >= want)))

    for what, name, limit, unit, scale in (("record-op", "harness: record one operation", 20e-6, "µs", 1e6),
                                           ("swarm-start", "harness: start a 10-process swarm", 1.0, "s", 1),
                                           ("check-history", "harness: check a 10 x 50 history", 1.0, "s", 1)):
        info = _find(infos, bench="harness", what=what)
        value = _num(info, "median_s")
        shown = f"{value * scale:,.3g} {unit}" if not math.isnan(value) else "-"
        out.append(Target(name, f"< {limit * scale:g} {unit}", shown, _judge(value, value < limit)))
    return out


def render(targets: Iterable[Target]) -> list[str]:
    """A markdown table of *targets*."""
    lines = ["| target | wanted | measured | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {t.name} | {t.want} | {t.measured} | {t.verdict} |" for t in targets]
    return lines
