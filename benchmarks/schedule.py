"""What controlled interleavings cost (issue 13): ``python -m benchmarks.schedule [SECONDS]``.

1. Per event: 2 workers each open a file in the workspace 200 times in one operation, scheduled (random) against
   free-running; the difference per event is the scheduler's cost (two FIFO messages and a context switch).
2. Per swarm: legacy, 4 processes x 3 deploys (real tmux), scheduled (pct) against free-running, 5 of each.
3. Schedules explored per minute: the 2-deploy legacy swarm under PCT with a new seed each time, for SECONDS (30).
   On a 2-core machine this is the rate at which a search (the check's ``ORCH_SCHEDULE_TRIES``) explores.
4. A suite run, side by side: the suite's tests of concurrent deploys and updates against the reference (4 processes
   x 10 ops), one seed, free-running and scheduled (pct) with one schedule per swarm (``ORCH_SCHEDULE_TRIES=1``, the
   same work), then scheduled as users run it (up to 10 schedules per passing swarm): pytest's session time, and
   events per second of it and of the time the scheduled swarms ran.  ``python -m benchmarks.schedule suite`` runs
   this part alone.

Each is one pytest process or swarm at a time, but the machine is not idle: print ``uptime`` with the numbers.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
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
    suite()


#: The suite tests of the side-by-side (as tests/test_schedule.py runs the correct registries).
SUITE_TESTS = "distinct_types or updates_of_distinct or racing_on_the_same or many_tasks"


def _suite_run(schedule: str | None, seed: int, tries: int, cwd: Path) -> tuple[float, int, float, str]:
    """One pytest run of SUITE_TESTS: its session seconds, events scheduled, the scheduler's seconds, the outcome."""
    args = [sys.executable, "-m", "pytest", "--pyargs", "pytest_orch.suite.test_registry_suite", "-k", SUITE_TESTS,
            "--orch-impl=reference", f"--orch-seed={seed}", "--orch-concurrency=4", "--orch-ops=10",
            "-p", "no:cacheprovider", "-p", "no:randomly", "-q"]
    if schedule:
        args.append(f"--orch-schedule={schedule}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env["ORCH_SCHEDULE_TRIES"] = str(tries)
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    note = r"note: schedule \S+ \(seed [^)]*\): (\d+) events.*? in ([\d.]+) s.*?; (\d+) schedule\(s\) tried"
    notes = re.findall(note, proc.stdout)
    lines = proc.stdout.strip().splitlines()
    outcome = lines[-1].strip("= ") if lines else f"exit {proc.returncode}"
    session = re.search(r" in ([\d.]+)s", outcome)
    # A note shows the last schedule tried of each swarm: with more tries, its events stand for each of them.
    return (float(session.group(1)) if session else float("nan"), sum(int(e) * int(n) for e, _, n in notes),
            sum(float(s) * int(n) for _, s, n in notes), outcome)


def suite(seed: int = 3) -> None:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "pytest.ini").write_text("[pytest]\n")  # not this repository's options
        free = _suite_run(None, seed, 1, Path(d))
        once = _suite_run("pct", seed, 1, Path(d))
        tries = _suite_run("pct", seed, 10, Path(d))
    print(f"4. a suite run (reference, tests '{SUITE_TESTS}', 4 x 10 ops, seed {seed}), pytest's session time:")
    print(f"   {'free-running':<24} {free[0]:6.1f} s  ({free[3]})")
    for label, (took, events, busy, outcome) in (("pct, 1 schedule a swarm", once), ("pct, up to 10 a swarm", tries)):
        rate = f"{events / took:.0f} events/s, {events / busy:.0f} a second while the swarms ran" if busy else ""
        print(f"   {label:<24} {took:6.1f} s  ({outcome}): {events} events, {rate}")
    print(f"   load average: {' '.join(Path('/proc/loadavg').read_text().split()[:3])} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["suite"]:
        suite()
    else:
        main(float(sys.argv[1]) if len(sys.argv) > 1 else 30.0)
