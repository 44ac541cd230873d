"""Issue 14: a deploy and a status change as the workspace's history grows (100, 1,000, 10,000, 50,000 agents).

The workspaces are :mod:`benchmarks.history`'s: old task registries of terminal agents, every one of them in the
global registry as an upgraded workspace has it, settled by one status change of the registry under test (the
reference moves them to its archive then).  Each round restores those bytes (outside the timing) and runs one
operation in the current task:

* ``deploy``: one agent, real tmux on a private server (``registry_median_ms`` subtracts the tmux start);
* ``status``: one agent working -> blocked, which writes the task registry and the global registry.

Variants: ``reference`` (as it is) and ``before: no archive`` (the reference with its archive turned off: the global
registry keeps every agent, as before issue 14), measured in the same run.  The target: at 50,000 agents each costs
at most 2x what it costs at 100 (``flat`` in the targets table).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import pytest

from . import history, knobs
from .conftest import median_s, round_times_s
from .stats import median
from .workloads import TimedSessions

ROUNDS = {100: 15, 1_000: 15, 10_000: 11, 50_000: 9}
ROUNDS_BEFORE = {100: 15, 1_000: 11, 10_000: 5, 50_000: 3}


@functools.cache
def _workspace(root: Path, size: int, variant: str) -> history.HistoryWorkspace:
    ws = history.build(root / f"{size}-{variant.split(':')[0]}", size)
    history.settle(ws, TimedSessions(), variant)
    return ws


@pytest.fixture(scope="session")
def history_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("history")


@pytest.mark.parametrize("size", history.SIZES)
@pytest.mark.parametrize("variant", list(history.VARIANTS))
@pytest.mark.parametrize("op", ["deploy", "status"])
def test_history(benchmark: Any, record: Any, tmux_server: Path, history_root: Path, op: str, variant: str,
                 size: int) -> None:
    benchmark.group = f"history: {op} ({variant})"
    ws = _workspace(history_root, size, variant)
    sessions = TimedSessions()
    reg = ws.registry(sessions, variant)
    seq = [0]

    def setup() -> None:
        ws.restore()
        while sessions.started:
            with contextlib.suppress(Exception):
                sessions.kill(sessions.started.pop())

    def run() -> None:
        if op == "deploy":
            history.deploy(reg, ws)
        else:
            history.status_change(reg, ws, seq[0])
            seq[0] += 1
        knobs.delay()

    setup()
    run()  # warm-up: page cache, the tmux server
    sessions.start_times_ns.clear()
    rounds = (ROUNDS if variant == "reference" else ROUNDS_BEFORE)[size]
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    setup()
    info: dict[str, Any] = {"bench": "history", "op": op, "variant": variant, "agents": size,
                            "median_ms": round(median_s(benchmark) * 1e3, 3), **history.file_sizes(ws)}
    times = round_times_s(benchmark)
    starts = sessions.start_times_ns[-len(times):]
    if op == "deploy" and starts and len(starts) == len(times):
        info["tmux_start_median_ms"] = round(median([t / 1e6 for t in starts]), 3)
        info["registry_median_ms"] = round(median([r * 1e3 - t / 1e6 for r, t in zip(times, starts, strict=True)]),
                                           3)
    record(**info)
