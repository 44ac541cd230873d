"""What controlled interleavings cost (issue 13): ``python -m benchmarks.schedule [SECONDS]``.

1. Per event: 2 workers each open a file in the workspace 200 times in one operation, scheduled (random) against
   free-running; the difference per event is the scheduler's cost (two FIFO messages and a context switch).
2. Per swarm: legacy, 4 processes x 3 deploys (real tmux), scheduled (pct) against free-running, 5 of each.
3. Schedules explored per minute: the 2-deploy legacy swarm under PCT with a new seed each time, for SECONDS (30).
   On a 2-core machine this is the rate at which a search (the check's ``ORCH_SCHEDULE_TRIES``) explores.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pytest_orch.adapter import load_factory
from pytest_orch.schedule import Schedule
from pytest_orch.swarm import Worker, run_swarm
from pytest_orch.tmux import QUIET_AGENT_COMMAND, private_server


def _opens(w: Worker) -> None:
    path = w.workspace / f"f{w.process}"
    path.write_text("x")

    def many() -> None:
        for _ in range(200):
            with open(path) as fh:
                fh.read()

    w.call("read_task", many, task_id="t")


def _deploys(task: str):  # type: ignore[no-untyped-def]
    def work(w: Worker) -> None:
        for k in range(w.ops):
            w.registry.deploy(task, f"a{w.process}x{k}")

    return work


def main(seconds: float = 30.0) -> None:
    os.environ.setdefault("ORCH_AGENT_COMMAND", QUIET_AGENT_COMMAND)
    with tempfile.TemporaryDirectory() as d, private_server(Path(d) / "tmux"):
        n = 0

        def fresh() -> Path:
            nonlocal n
            n += 1
            ws = Path(d) / f"ws{n}"
            ws.mkdir()
            return ws

        # 1. per event
        free, sched, events = [], [], 0
        for i in range(5):
            t = time.perf_counter()
            run_swarm("reference", fresh(), _opens, concurrency=2, ops=1, seed=i, timeout=120)
            free.append(time.perf_counter() - t)
            t = time.perf_counter()
            h = run_swarm("reference", fresh(), _opens, concurrency=2, ops=1, seed=i, timeout=120,
                          schedule=Schedule("random", str(i)))
            sched.append(time.perf_counter() - t)
            events = h.schedule.events
        per_event = (statistics.median(sched) - statistics.median(free)) / events
        print(f"1. per event: {events} events a swarm, {statistics.median(free) * 1e3:.0f} ms free-running,"
              f" {statistics.median(sched) * 1e3:.0f} ms scheduled: {per_event * 1e6:.0f} us an event,"
              f" {1 / per_event:.0f} events/s")

        # 2. per swarm
        def legacy_swarm(concurrency: int, ops: int, schedule: Schedule | None, seed: int) -> tuple[float, int]:
            ws = fresh()
            task = load_factory("legacy")(ws).create_task("t", max_agents=100, max_concurrent=100, max_depth=3)
            t = time.perf_counter()
            h = run_swarm("legacy", ws, _deploys(task), concurrency=concurrency, ops=ops, seed=seed, timeout=120,
                          schedule=schedule)
            return time.perf_counter() - t, h.schedule.events if h.schedule else 0

        free = [legacy_swarm(4, 3, None, i)[0] for i in range(5)]
        runs = [legacy_swarm(4, 3, Schedule("pct", str(i)), i) for i in range(5)]
        print(f"2. per swarm (legacy, 4 x 3 deploys): {statistics.median(free) * 1e3:.0f} ms free-running,"
              f" {statistics.median(r[0] for r in runs) * 1e3:.0f} ms scheduled ({runs[0][1]} events)")

        # 3. schedules per minute
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            legacy_swarm(2, 1, Schedule("pct", f"explore:{count}"), count)
            count += 1
        rate = count / (time.perf_counter() - start) * 60
        print(f"3. schedules explored: {count} in {seconds:g} s = {rate:.0f} a minute (legacy, 2 deploys, pct,"
              f" {os.cpu_count()} cores)")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 30.0)
