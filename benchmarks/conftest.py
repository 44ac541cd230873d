"""Fixtures shared by the benchmarks, and the terminal summary that prints percentiles and the issue's targets."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_orch.tmux import QUIET_AGENT_COMMAND, private_server

from . import knobs, targets

_RESULTS = pytest.StashKey[dict[str, dict[str, Any]]]()

#: The extra_info keys the terminal summary prints, in order, when a benchmark recorded them.
_SHOWN = ("ops_per_s", "op_p50_ms", "op_p95_ms", "op_p99_ms", "lock_wait_p50_ms", "lock_wait_p95_ms",
          "lock_wait_p99_ms", "median_ms", "registry_median_ms", "tmux_start_median_ms", "median_us", "task_reads",
          "task_bytes_read", "global_reads", "error_rate", "mb_per_s", "median_s", "whole_call_median_s", "ops", "ok",
          "fail", "info", "problems", "loadavg_1m")


#: Benchmarks stable enough for a median gate in CI: one process, no tmux.  ``pytest benchmarks -m gate``.
gate = pytest.mark.gate


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = {}
    config.addinivalue_line("markers", "gate: a benchmark stable enough for the CI regression gate (one process, no"
                                       " tmux); see benchmarks/README.md")


def median_s(benchmark: Any) -> float:
    """The median round time pytest-benchmark measured, in seconds (nan when benchmarks are disabled)."""
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None)
    return float(inner.median) if inner is not None else math.nan


def round_times_s(benchmark: Any) -> list[float]:
    inner = getattr(getattr(benchmark, "stats", None), "stats", None)
    return list(inner.data) if inner is not None else []


@pytest.fixture
def record(request: pytest.FixtureRequest, benchmark: Any) -> Callable[..., dict[str, Any]]:
    """``record(**info)``: add *info* to the benchmark's extra_info and to the summary printed at the end."""

    def record(**info: Any) -> dict[str, Any]:
        if knobs.slowdown():
            info["slowdown_s"] = knobs.slowdown()
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)  # the machine is shared: how busy it was, to judge noise
        benchmark.extra_info.update(info)
        request.config.stash[_RESULTS][request.node.nodeid] = dict(benchmark.extra_info)
        return dict(benchmark.extra_info)

    return record


@pytest.fixture(scope="session")
def tmux_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private tmux server for the whole run; agents' sessions run ``sleep`` (they cost nothing).

    A keep-alive session holds the server up: tmux exits with its last session, and a deploy racing a dying server
    fails, or pays for starting a new server, which an orchestrator with agents running never does.
    """
    from registry.sessions import TmuxSessions

    saved = os.environ.get("ORCH_AGENT_COMMAND")
    os.environ["ORCH_AGENT_COMMAND"] = QUIET_AGENT_COMMAND
    try:
        with private_server(tmp_path_factory.mktemp("tmux")) as tmux_dir:
            TmuxSessions().start("bench_keepalive", QUIET_AGENT_COMMAND)
            yield tmux_dir
    finally:
        if saved is None:
            os.environ.pop("ORCH_AGENT_COMMAND", None)
        else:
            os.environ["ORCH_AGENT_COMMAND"] = saved


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    return str(value)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(_RESULTS, {})
    if not results:
        return
    tr = terminalreporter
    tr.section("orch benchmarks: percentiles and counts (extra_info)")
    for nodeid, info in results.items():
        shown = [f"{k}={_fmt(info[k])}" for k in _SHOWN if k in info]
        if info.get("errors"):
            shown.append(f"errors={info['errors']}")
        tr.write_line(f"{nodeid.split('::', 1)[-1]}: " + " ".join(shown))
    rows = targets.evaluate(results.values())
    if any(t.met is not None for t in rows):
        tr.section("orch benchmarks: targets of issue 6 (reported, not asserted)")
        for line in targets.render(rows):
            tr.write_line(line)
