"""Item 5 of issue 6: the harness's own cost.

* ``swarm-start``: ``run_swarm`` of 10 processes on the reference registry with an empty workload.  The timed round
  is the whole call (fork, open the adapter in each worker, barrier, reap, merge the history); ``median_s``, the
  figure the target is judged on, is from the call to the moment the barrier released every worker.
* ``record-op``: one operation through the recorded registry a workload uses (``worker.registry.update``) with an
  adapter that does nothing, so what is timed is the recording: two appended JSON lines.
* ``check-history``: what ``orch_swarm.check`` does after a real 10 x 50 swarm (deploys, progress reports,
  completions and kills on the reference registry, real tmux): reopen the adapter, read the final documents, and
  run every check, linearizability included.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from pytest_orch.adapter import load_factory
from pytest_orch.checks import check_history, read_final
from pytest_orch.history import History, Recorder
from pytest_orch.swarm import SwarmHandle, Worker, run_swarm

from . import knobs
from .conftest import gate, median_s
from .stats import median

CONCURRENCY = 10
OPS = 50


def test_swarm_start(benchmark: Any, record: Any, tmux_server: Path, tmp_path: Path) -> None:
    benchmark.group = "harness"
    workspace = tmp_path / "ws"
    workspace.mkdir()
    starts: list[float] = []

    def nothing(worker: Worker) -> None:
        return None

    def swarm() -> None:
        t0 = time.monotonic_ns()
        released: list[int] = []

        def during(handle: SwarmHandle) -> None:
            released.append(handle.start_ns)

        run_swarm("reference", workspace, nothing, concurrency=CONCURRENCY, ops=1, seed=0, timeout=60,
                  during=during)
        starts.append((released[0] - t0) / 1e9)
        knobs.delay()

    swarm()  # warm-up
    starts.clear()
    benchmark.pedantic(swarm, rounds=5, iterations=1)
    record(bench="harness", what="swarm-start", concurrency=CONCURRENCY, median_s=round(median(starts), 4),
           start_max_s=round(max(starts), 4), whole_call_median_s=round(median_s(benchmark), 4))


class _NullAdapter:
    def update(self, task_id: str, agent_id: str, status: str, progress: int) -> None:
        return None


@gate
def test_record_one_operation(benchmark: Any, record: Any, tmp_path: Path) -> None:
    benchmark.group = "harness"
    recorder = Recorder(tmp_path / "worker-0.jsonl", 0)
    worker = Worker(0, OPS, "0", tmp_path, _NullAdapter(), recorder, {})
    registry = worker.registry

    def one() -> None:
        registry.update("TASK-20251101-120000-b3c4d5e6", "investigator-120000-abcdef", "working", 42)
        knobs.delay()

    benchmark(one)
    recorder.close()
    record(bench="harness", what="record-op", median_s=median_s(benchmark),
           median_us=round(median_s(benchmark) * 1e6, 2))


def _mixed_workload(task: str) -> Any:
    def work(w: Worker) -> None:
        agent = None
        for i in range(w.ops):
            if agent is None:
                agent = w.registry.deploy(task, f"p{w.process}-t{i}")
                continue
            roll = w.rng.random()
            if roll < 0.8:
                w.registry.update(task, agent, "working", i % 101)
            elif roll < 0.9:
                w.registry.update(task, agent, "completed", 100)
                agent = None
            else:
                w.registry.kill(task, agent)
                agent = None

    return work


@pytest.fixture
def swarm_history(tmux_server: Path, tmp_path: Path) -> tuple[Path, History]:
    """A real 10 x 50 history on the reference registry (made once, outside the timing)."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    adapter = load_factory("reference")(workspace)
    n = CONCURRENCY * OPS
    task = adapter.create_task("harness benchmark", max_agents=n, max_concurrent=n, max_depth=5)
    history = run_swarm("reference", workspace, _mixed_workload(task), concurrency=CONCURRENCY, ops=OPS, seed=0,
                        timeout=300, initial={task: adapter.read_task(task)})
    return workspace, history


@gate
def test_check_history(benchmark: Any, record: Any, swarm_history: tuple[Path, History]) -> None:
    benchmark.group = "harness"
    workspace, history = swarm_history
    reports = []

    def check() -> None:
        final = read_final(load_factory("reference")(workspace), history.task_ids())
        reports.append(check_history(history, final))
        knobs.delay()

    benchmark.pedantic(check, rounds=5, iterations=1, warmup_rounds=1)
    report = reports[-1]
    record(bench="harness", what="check-history", processes=history.concurrency, ops=len(history.calls),
           ok=history.count("ok"), fail=history.count("fail"), info=history.count("info"),
           problems=len(report.problems), median_s=round(median_s(benchmark), 4))
    assert report.ok, report.render()
