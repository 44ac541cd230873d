"""Item 1 of issue 6: deploy latency, legacy (4 task loads) against the reference (1), by registry size.

Each round restores the same pre-populated workspace (outside the timing) and deploys one agent into it, so every
round sees a registry of exactly the stated size.  The headline runs real tmux on a private server (the agent runs
``sleep``); the time of each tmux ``start`` is recorded so that ``registry_median_ms`` (round minus tmux) separates
the registry's own cost.  A second group, clearly named ``registry-only``, stubs tmux out entirely.

Every deploy is of a sub-agent (its parent is the first agent of the task), the path on which the legacy code loads
the task registry four times; a deploy under the orchestrator skips the parent lookup (three loads), and its counts
are recorded too (``*_orchestrator_parent``).

Reads and bytes read per deploy come from one extra, untimed deploy: counted by an audit hook for both
implementations (``task_reads``, ``global_reads``), and by ``registry.store.io_stats`` for the reference.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import pytest

from registry import Registry, store
from registry.legacy import LegacyRegistry
from registry.sessions import TmuxSessions

from . import knobs
from .conftest import gate, median_s, round_times_s
from .iocount import count_reads
from .stats import median
from .workloads import NullSessions, TimedSessions
from .workspace import DEPLOY_TYPE, Workspace, build_task, write_workspace

SIZES = (10, 100, 1_000, 10_000)
ROUNDS = {10: 15, 100: 15, 1_000: 11, 10_000: 2}
IMPLS = ("legacy", "reference")


@functools.cache
def _task(size: int) -> dict[str, Any]:
    return build_task(size)


def _open(impl: str, ws: Workspace, sessions: TmuxSessions) -> Registry | LegacyRegistry:
    if impl == "legacy":
        return LegacyRegistry(ws.base, sessions=sessions)
    return Registry(ws.base, sessions=sessions)


def _deploy_benchmark(benchmark: Any, record: Any, tmp_path: Path, impl: str, size: int,
                      sessions: TmuxSessions, tmux: str) -> dict[str, Any]:
    ws = write_workspace(tmp_path / "ws", _task(size))
    reg = _open(impl, ws, sessions)
    parent = ws.agent_ids[0]

    def setup() -> None:
        ws.restore()
        if isinstance(sessions, TimedSessions):
            while sessions.started:
                with contextlib.suppress(Exception):
                    sessions.kill(sessions.started.pop())

    def deploy() -> None:
        reg.deploy(ws.task_id, DEPLOY_TYPE, "benchmark deploy", parent)
        knobs.delay()

    setup()
    deploy()  # warm-up, outside the measurement: imports, page cache, tmux server start
    setup()
    starts = sessions.start_times_ns if isinstance(sessions, TimedSessions) else []
    starts.clear()
    benchmark.pedantic(deploy, setup=setup, rounds=ROUNDS[size], iterations=1)
    rounds = round_times_s(benchmark)
    tmux_ms = [t / 1e6 for t in starts[-len(rounds):]] if starts and rounds else []

    setup()
    store.io_stats.reset()
    with count_reads(ws.task_path, ws.global_path) as counts:
        reg.deploy(ws.task_id, DEPLOY_TYPE, "benchmark deploy", parent)
    io_reads, io_bytes = store.io_stats.reads, store.io_stats.bytes_read
    setup()
    with count_reads(ws.task_path) as top_counts:
        reg.deploy(ws.task_id, DEPLOY_TYPE, "benchmark deploy")
    info: dict[str, Any] = {
        "bench": "deploy", "impl": impl, "agents": size, "tmux": tmux,
        "task_file_bytes": len(ws.task_bytes), "global_file_bytes": len(ws.global_bytes),
        "median_ms": round(median_s(benchmark) * 1e3, 3),
        "task_reads": counts[ws.task_path].reads, "task_bytes_read": counts[ws.task_path].bytes,
        "global_reads": counts[ws.global_path].reads, "global_bytes_read": counts[ws.global_path].bytes,
        "task_reads_orchestrator_parent": top_counts[ws.task_path].reads,
    }
    if impl == "reference":
        info.update(io_stats_reads=io_reads, io_stats_bytes_read=io_bytes)
    if tmux_ms:
        info["tmux_start_median_ms"] = round(median(tmux_ms), 3)
        info["registry_median_ms"] = round(median([r * 1e3 - t for r, t in zip(rounds, tmux_ms, strict=True)]), 3)
    setup()
    recorded: dict[str, Any] = record(**info)
    return recorded


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_deploy_latency(benchmark: Any, record: Any, tmux_server: Path, tmp_path: Path, impl: str, size: int) -> None:
    """Headline: a real tmux session per deploy, as users run it."""
    benchmark.group = f"deploy, {size:,} agents (real tmux)"
    info = _deploy_benchmark(benchmark, record, tmp_path, impl, size, TimedSessions(), "real")
    assert info["task_reads"] >= 1


@pytest.mark.parametrize("size", [pytest.param(s, marks=gate) if s <= 1_000 else s for s in SIZES])
@pytest.mark.parametrize("impl", IMPLS)
def test_deploy_latency_registry_only(benchmark: Any, record: Any, tmp_path: Path, impl: str, size: int) -> None:
    """Registry-only: tmux start stubbed out (NullSessions), to show the registry's own cost without tmux noise."""
    benchmark.group = f"deploy, {size:,} agents (registry-only: tmux stubbed)"
    info = _deploy_benchmark(benchmark, record, tmp_path, impl, size, NullSessions(), "stubbed")
    assert info["task_reads"] >= 1
