"""Issue 4: checking a burst of 8 operations for linearizability costs a small fraction of running the burst.

The burst is real and is the state machine's own: 8 processes of the burst pool (:mod:`pytest_orch.burst`), released
on a barrier, run a mix on one task: updates of four agents (two writers on one of them), a kill, a deploy, a reconcile
and a tmux session killed behind the registry's back.  The check is exactly what :class:`RegistryMachine` runs on it
(:meth:`RegistryMachine.search`): the search for an order of the 8 operations, over the full registry model, that
leaves the documents as they are.  Against the reference the search finds its witness on the first path; against
legacy, whose bursts lose updates, it rules orders out until it can say none fits (or, when a torn write left a
document that does not parse, at once).  The worst case is measured too: the same calls against documents that no
order explains and nothing prunes early, so that every order real time allows is tried.  Times are recorded in
``extra_info`` (``burst_ms``, ``check_ms``, ``check_fraction_of_burst``, ``worst_case_*``), never asserted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_orch.burst import shared_pool
from pytest_orch.stateful import Command, RegistryMachine

BURST = 8


@pytest.fixture(params=["reference", "legacy"])
def machine(request: pytest.FixtureRequest) -> Iterator[RegistryMachine]:
    """A state machine (outside Hypothesis) on a fresh workspace and the private tmux server, with 4 agents."""
    machine = type(f"Bench{request.param.title()}", (RegistryMachine,), {"impl": request.param})()
    try:
        task = machine.first_task()
        machine.first_agents()
        machine.deploy(task, "fixer")
        machine.deploy(task, "tester")
        yield machine
    finally:
        machine.teardown()


def test_checking_a_burst_of_8_takes_a_fraction_of_the_time_the_burst_takes(benchmark: Any,
                                                                            machine: RegistryMachine) -> None:
    a0, a1, a2, a3 = machine.handles["t0"]
    commands = [Command("update", "t0", a0, status="working", progress=10),
                Command("update", "t0", a0, status="blocked", progress=20),
                Command("update", "t0", a1, status="completed", progress=100),
                Command("update", "t0", a2, status="working", progress=30),
                Command("kill", "t0", a3),
                Command("deploy", "t0", "a4", "investigator"),
                Command("reconcile", "t0"),
                Command("lose_session", "t0", a2)]
    docs = machine.snapshot().tasks
    ops = [machine._op(cmd, docs) for cmd in commands]
    pool = shared_pool(BURST)
    pool.run(machine.impl_spec, machine.workspace, [ops[6]] * 2)  # start the workers: not what is timed
    started = time.perf_counter()
    records = pool.run(machine.impl_spec, machine.workspace, ops)
    burst_s = time.perf_counter() - started
    verdict = machine.judge(commands, records)

    known = frozenset(verdict.ids)

    def fresh() -> None:  # the specification caches its steps: every round searches from nothing
        machine.spec._cache.clear()

    search = benchmark.pedantic(machine.search, (verdict.calls, verdict.observed, known, verdict.opts), setup=fresh,
                                rounds=100, warmup_rounds=1)
    assert search.ok == verdict.search.ok
    if machine.impl_spec == "reference":
        assert search.ok, machine._failure(verdict)
    # The worst case for the same calls: documents no order explains, and nothing prunes early (only a counter is
    # off), so that every order the real-time constraints allow is tried.
    tasks, glob = verdict.observed
    impossible = (((tasks[0][0], tasks[0][1], (-1, *tasks[0][2][1:]), *tasks[0][3:]), *tasks[1:]), glob)
    fresh()
    started = time.perf_counter()
    worst = machine.search(verdict.calls, impossible, known, verdict.opts)
    worst_s = time.perf_counter() - started
    assert not worst.ok

    check_s = float(benchmark.stats.stats.median)
    ops_ms = [(r.complete - r.invoke) / 1e6 for r in records if r.complete is not None]
    benchmark.extra_info.update(
        impl=machine.impl_spec, burst_ms=round(burst_s * 1e3, 3), op_median_ms=round(statistics.median(ops_ms), 3),
        outcomes="".join(r.outcome[0] for r in records), linearizable=search.ok, states_explored=search.explored,
        check_ms=round(check_s * 1e3, 3), check_fraction_of_burst=round(check_s / burst_s, 4),
        worst_case_check_ms=round(worst_s * 1e3, 3), worst_case_states_explored=worst.explored,
        worst_case_fraction_of_burst=round(worst_s / burst_s, 4))
