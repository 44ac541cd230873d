"""Item 3 of issue 6: throughput of the reference operations under contention at 1, 2, 4 and 10 processes.

Every workload runs on the 20 KB sample task registry with ten active agents; process *i* works on agent *i*, so
the processes contend for the file, never for an agent.  A round is ``OPS_PER_ROUND`` operations split over the
processes, released together by a barrier; the timed value is the round, ``ops_per_s`` is the round's operations
over its median time, and per-operation percentiles are in extra_info.  Before each round the registry is restored
(outside the timing), so every round starts from the same bytes.

Workloads (see :mod:`benchmarks.workloads`):

* ``reference-update``: ``Registry.update`` progress reports (the throughput target).
* ``reference-mixed``: 2 progress reports, 1 status change (task + global registries), 1 status read per 4 ops.
* ``legacy-update``: the unlocked legacy registry; torn reads count as errors (``ok_ops_per_s`` excludes them).
* ``flock-json-rmw``: baseline, blocking flock + ``json.dumps(indent=2)`` + durable replace.
* ``sqlite-wal-full``: baseline, SQLite WAL ``synchronous=FULL``, one ``UPDATE`` per op.

``test_update_throughput_alternatives`` measures ``reference-update`` with what-if store variants and with the store's
previous lock (benchmark-only subclasses; ``registry/`` is unchanged), as evidence for changes to the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .conftest import gate, median_s
from .workers import Factory, Workers
from .workloads import (
    flock_json_rmw,
    legacy_update,
    reference_mixed,
    reference_update,
    sqlite_setup,
    sqlite_wal,
)
from .workspace import Workspace, sample_task, with_active, write_workspace

PROCS = (1, 2, 4, 10)
OPS_PER_ROUND = 500
ROUNDS = 3
WORKLOADS = ("reference-update", "reference-mixed", "legacy-update", "flock-json-rmw", "sqlite-wal-full")


@pytest.fixture
def sample_ws(tmp_path: Path) -> Workspace:
    return write_workspace(tmp_path / "ws", with_active(sample_task(), 10))


def _factory(workload: str, ws: Workspace, tmp_path: Path) -> Factory:
    if workload == "sqlite-wal-full":
        db = tmp_path / "registry.sqlite"
        sqlite_setup(ws, db)
        return sqlite_wal(ws, db)
    return {"reference-update": reference_update, "reference-mixed": reference_mixed,
            "legacy-update": legacy_update, "flock-json-rmw": flock_json_rmw}[workload](ws)


def _run(benchmark: Any, ws: Workspace, factory: Factory, procs: int) -> dict[str, Any]:
    with Workers(procs, factory, OPS_PER_ROUND // procs) as pool:
        ws.restore()
        pool.round()  # warm-up: imports, page cache, the first fsyncs
        pool.reset()
        benchmark.pedantic(pool.round, setup=ws.restore, rounds=ROUNDS, iterations=1)
        return pool.summary(median_s(benchmark))


@pytest.mark.parametrize(("workload", "procs"), [pytest.param(w, n, marks=gate) if n == 1 and w.startswith("reference")
                                                  else (w, n) for w in WORKLOADS for n in PROCS])
def test_throughput(benchmark: Any, record: Any, sample_ws: Workspace, tmp_path: Path, workload: str,
                    procs: int) -> None:
    benchmark.group = f"throughput, {procs} process{'es' if procs > 1 else ''} ({OPS_PER_ROUND} ops per round)"
    summary = _run(benchmark, sample_ws, _factory(workload, sample_ws, tmp_path), procs)
    record(bench="throughput", workload=workload, registry_bytes=len(sample_ws.task_bytes), **summary)


ALTERNATIVES: dict[str, dict[str, Any]] = {
    "before: filelock 0.5 ms poll": {"variant": "filelock"},
    "what-if flock": {"variant": "flock"},
    "what-if no-bak": {"variant": "no-bak"},
    "what-if flock+no-bak": {"variant": "flock+no-bak"},
    "what-if link-bak": {"variant": "link-bak"},
    "what-if flock+link-bak": {"variant": "flock+link-bak"},
    "what-if itimer": {"variant": "itimer"},
    "what-if itimer+link-bak": {"variant": "itimer+link-bak"},
}


@pytest.mark.parametrize("procs", [1, 10])
@pytest.mark.parametrize("alternative", list(ALTERNATIVES))
def test_update_throughput_alternatives(benchmark: Any, record: Any, sample_ws: Workspace, alternative: str,
                                        procs: int) -> None:
    """reference-update with a what-if store variant, or the store's previous lock (filelock)."""
    options = ALTERNATIVES[alternative]
    benchmark.group = f"reference-update alternatives, {procs} process{'es' if procs > 1 else ''}"
    summary = _run(benchmark, sample_ws, reference_update(sample_ws, **options), procs)
    record(bench="throughput-alternative", workload="reference-update", alternative=alternative,
           registry_bytes=len(sample_ws.task_bytes), **summary)
