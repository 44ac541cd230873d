"""A pool of forked processes that run rounds of operations together, for throughput and contention benchmarks.

The processes are forked once and then released together by a barrier for each round, so what a round times is the
operations, not process start-up.  Each operation reports its latency and, when it knows it, how long it waited for
a lock; the pool pools them over rounds for percentiles.

    with Workers(10, factory, ops_per_proc=100) as pool:
        benchmark.pedantic(pool.round, rounds=3)
        pool.summary()

*factory(index)* runs in the child and returns ``op(seq) -> lock_wait_ns | None``; it may close over anything the
parent had (the pool forks).  An exception from *op* is counted by type, not raised: the legacy registry's torn reads
are data here.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from . import knobs
from .stats import summary_ms

Op = Callable[[int], "int | None"]
Factory = Callable[[int], Op]

#: How long a round may take before the pool gives up on its workers.
ROUND_TIMEOUT = 300.0


@dataclass
class RoundResult:
    index: int
    latencies_ns: list[int]
    waits_ns: list[int]
    errors: dict[str, int]
    start: float
    end: float


@dataclass
class Totals:
    """Everything the pool measured over the rounds it ran."""

    procs: int
    ops_per_proc: int
    rounds: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    waits_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    spans: list[float] = field(default_factory=list)  # first op start to last op end, per round


def _serve(index: int, factory: Factory, ops: int, barrier: Any, results: Any, stop: Any) -> None:
    try:
        op: Op | None = factory(index)
        failure = ""
    except BaseException:
        op, failure = None, traceback.format_exc()
    seq = 0
    delay = knobs.delay
    clock = time.perf_counter_ns
    while True:
        barrier.wait(ROUND_TIMEOUT)
        if stop.is_set():
            return
        if op is None:
            results.put(("setup failed", index, failure))
            continue
        latencies, waits, errors = [], [], Counter[str]()
        start = time.perf_counter()
        for _ in range(ops):
            t0 = clock()
            try:
                wait = op(seq)
                delay()
            except Exception as exc:  # counted: a failing operation is a result, not a crash of the benchmark
                errors[type(exc).__name__] += 1
                wait = None
            latencies.append(clock() - t0)
            if wait is not None:
                waits.append(wait)
            seq += 1
        end = time.perf_counter()
        results.put(("ok", index, RoundResult(index, latencies, waits, dict(errors), start, end)))


class Workers:
    """*n* forked processes, each running *ops_per_proc* operations per round.  A context manager."""

    def __init__(self, n: int, factory: Factory, ops_per_proc: int) -> None:
        ctx = mp.get_context("fork")
        self.n = n
        self.totals = Totals(procs=n, ops_per_proc=ops_per_proc)
        self._barrier = ctx.Barrier(n + 1)
        self._results = ctx.Queue()
        self._stop = ctx.Event()
        self._procs = [ctx.Process(target=_serve, args=(i, factory, ops_per_proc, self._barrier, self._results,
                                                        self._stop), daemon=True, name=f"bench-worker-{i}")
                       for i in range(n)]
        for proc in self._procs:
            proc.start()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def round(self) -> list[RoundResult]:
        """Release every worker for one round and wait for all of them; RuntimeError if one failed to set up."""
        self._barrier.wait(ROUND_TIMEOUT)
        out = []
        for _ in range(self.n):
            status, index, payload = self._results.get(timeout=ROUND_TIMEOUT)
            if status != "ok":
                raise RuntimeError(f"benchmark worker {index} failed to set up:\n{payload}")
            out.append(payload)
        self._account(out)
        return out

    def _account(self, results: list[RoundResult]) -> None:
        t = self.totals
        t.rounds += 1
        for r in results:
            t.latencies_ns.extend(r.latencies_ns)
            t.waits_ns.extend(r.waits_ns)
            t.errors.update(r.errors)
        t.spans.append(max(r.end for r in results) - min(r.start for r in results))

    def reset(self) -> None:
        """Forget what was measured so far (after a warm-up round)."""
        self.totals = Totals(procs=self.totals.procs, ops_per_proc=self.totals.ops_per_proc)

    def close(self) -> None:
        if any(p.is_alive() for p in self._procs):
            self._stop.set()
            with contextlib.suppress(Exception):  # a worker died: the barrier is broken, terminate below
                self._barrier.wait(10)
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self._results.close()
        self._results.join_thread()

    def summary(self, median_round_s: float | None = None) -> dict[str, Any]:
        """ops/s (from the median round time if given, else from the median span), latency and wait percentiles."""
        t = self.totals
        ops = t.procs * t.ops_per_proc
        spans = sorted(t.spans)
        span = spans[len(spans) // 2] if spans else math.nan
        if median_round_s is None or math.isnan(median_round_s):  # benchmarks disabled: no round statistics
            median_round_s = span
        info: dict[str, Any] = {"procs": t.procs, "ops_per_round": ops, "rounds": t.rounds,
                                "ops_per_s": round(ops / median_round_s, 1),
                                "ops_per_s_span": round(ops / span, 1)}
        info.update(summary_ms(t.latencies_ns, "op"))
        if t.waits_ns:
            info.update(summary_ms(t.waits_ns, "lock_wait"))
        info["errors"] = dict(t.errors)
        info["error_rate"] = round(sum(t.errors.values()) / max(1, len(t.latencies_ns)), 4)
        info["ok_ops_per_s"] = round(info["ops_per_s"] * (1 - info["error_rate"]), 1)
        return info
