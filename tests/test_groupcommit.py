"""Group commit (registry.groupcommit): batched updates are applied exactly once, or not at all, whoever dies when.

Queued requests are written here the way a waiting process writes them, with this test process's pid as the
waiter's (so the leader sees a live waiter); the leader is a real process, killed with ``os._exit`` at each point of
its write.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from typing import Any

import orjson
import pytest
from helpers_registry import crash_during, run_in_child, spawn

from registry import (
    CorruptRegistry,
    InvalidArgument,
    LockTimeout,
    Registry,
    TmuxSessions,
    UnknownAgent,
    check,
    global_violations,
    groupcommit,
    repair,
    task_violations,
)
from registry.groupcommit import queue_dir
from registry.store import io_stats

WORKERS = 10
UPDATES = 40


@pytest.fixture
def task(reg: Registry) -> str:
    return reg.create_task("group commit", max_agents=WORKERS + 2, max_concurrent=WORKERS + 2)


def _agents(reg: Registry, task: str, n: int) -> list[str]:
    return [reg.deploy(task, f"worker{i}")["id"] for i in range(n)]


def _queue(reg: Registry, task: str, payload: dict[str, Any], pid: int | None = None) -> str:
    """Leave a request in the task's queue as a waiting process would; return its token."""
    token = f"{os.getpid() if pid is None else pid}.{os.urandom(6).hex()}"
    queue = queue_dir(reg.task_file(task).path)
    queue.mkdir(exist_ok=True)
    (queue / f"{token}.req").write_bytes(orjson.dumps(payload))
    return token


def _update(agent: str, status: str | None = None, progress: int | None = None) -> dict[str, Any]:
    return {"agent_id": agent, "status": status, "message": None, "progress": progress}


def _outcome(reg: Registry, task: str, token: str) -> Any:
    """The outcome delivered to *token* (what its waiter would return or raise); AssertionError if there is none."""
    delivered = groupcommit._take(queue_dir(reg.task_file(task).path), token)
    assert delivered is not None, f"nothing was delivered to {token}"
    return groupcommit._unwrap(delivered)


def _agent(reg: Registry, task: str, agent: str) -> dict[str, Any]:
    return next(a for a in reg.read_task(task)["agents"] if a["id"] == agent)


# --------------------------------------------------------------------------------------------------------------------
# Batches


def test_the_lock_holder_applies_queued_updates_with_its_own_in_one_write_and_delivers_each_outcome(
        reg: Registry, task: str) -> None:
    a, b, c = _agents(reg, task, 3)
    mine = [_queue(reg, task, _update(a, progress=30)), _queue(reg, task, _update(b, "completed", 100)),
            _queue(reg, task, _update("no-such-agent", progress=1))]
    io_stats.reset()
    record = reg.update(task, c, progress=70)

    assert record["progress"] == 70
    assert io_stats.writes == 2  # one task write for all four, one global write for the status change
    assert _outcome(reg, task, mine[0])["progress"] == 30
    assert _outcome(reg, task, mine[1])["status"] == "completed"
    with pytest.raises(UnknownAgent, match="no agent no-such-agent"):
        _outcome(reg, task, mine[2])
    doc = reg.read_task(task)
    assert [(x["progress"], x["status"]) for x in doc["agents"]] == [(30, "running"), (100, "completed"),
                                                                      (70, "running")]
    assert doc["completed_count"] == 1
    assert doc["active_count"] == 2
    assert reg.read_global()["agents"][b]["status"] == "completed"
    assert task_violations(doc) == []
    assert list(queue_dir(reg.task_file(task).path).iterdir()) == []


def test_a_status_change_fails_with_the_global_registrys_error_while_progress_reports_in_its_batch_go_through(
        reg: Registry, task: str) -> None:
    a, b = _agents(reg, task, 2)
    reg.global_file.path.write_text("{ torn")
    status = _queue(reg, task, _update(a, "completed"))
    reg.update(task, b, progress=55)

    with pytest.raises(CorruptRegistry, match=r"GLOBAL_REGISTRY\.json is corrupt"):
        _outcome(reg, task, status)
    assert _agent(reg, task, a)["status"] == "running"
    assert _agent(reg, task, b)["progress"] == 55
    assert reg.global_file.path.read_text() == "{ torn"


def test_requests_of_dead_processes_and_malformed_ones_are_dropped_unapplied(reg: Registry, task: str) -> None:
    a, b = _agents(reg, task, 2)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = _queue(reg, task, _update(a, "completed"), pid=int(gone.stdout))
    queue = queue_dir(reg.task_file(task).path)
    (queue / f"{os.getpid()}.0badc0ffee00.req").write_bytes(b"[not, json")
    hostile = _queue(reg, task, {"agent_id": a, "status": "running", "progress": "all of it"})
    reg.update(task, b, progress=5)

    assert not (queue / f"{dead}.req").exists()
    assert not (queue / f"{dead}.res").exists()
    assert _agent(reg, task, a)["status"] == "running"
    with pytest.raises(InvalidArgument, match="progress must be a whole number"):
        _outcome(reg, task, hostile)
    assert _agent(reg, task, a)["progress"] == 0
    assert list(queue.iterdir()) == []


def _hold_lock(base: str, task: str, ready: Any, go: Any) -> None:
    reg = Registry(base, heal=False)
    with reg.task_file(task).locked():
        ready.set()
        go.wait(30)


def _timed_update(base: str, task: str, agent: str) -> Any:
    return Registry(base, heal=False, lock_timeout=0.3).update(task, agent, progress=99)


def test_a_waiter_that_times_out_withdraws_its_request_and_nothing_is_applied_later(reg: Registry,
                                                                                    task: str) -> None:
    (agent,) = _agents(reg, task, 1)
    ctx = spawn()
    ready, go = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(reg.base), task, ready, go))
    holder.start()
    try:
        assert ready.wait(30)
        code, outcome = run_in_child(_timed_update, str(reg.base), task, agent)
    finally:
        go.set()
        holder.join(30)
    assert code == 0
    assert outcome is not None
    assert outcome[0] == "raised"
    assert isinstance(outcome[1], LockTimeout)
    assert outcome[1].applied is False
    reg.update(task, agent, status="working")  # the next leader: it must find nothing to apply
    assert _agent(reg, task, agent)["progress"] == 0
    assert list(queue_dir(reg.task_file(task).path).iterdir()) == []


def test_a_waiter_whose_request_was_taken_says_its_outcome_is_unknown_when_it_times_out(
        reg: Registry, task: str) -> None:
    (agent,) = _agents(reg, task, 1)
    token = _queue(reg, task, _update(agent, progress=1))
    queue = queue_dir(reg.task_file(task).path)
    (queue / f"{token}.req").rename(queue / f"{token}.claimed")  # a leader took it and is at work
    timeout = LockTimeout("could not lock it within 0.3 s.", path="p", timeout=0.3)
    with pytest.raises(LockTimeout, match="may or may not have applied it") as raised:
        groupcommit._withdraw(queue, groupcommit.Request(token, {}), timeout)  # in a waiter whose wait ran out
    assert raised.value.applied is None


# --------------------------------------------------------------------------------------------------------------------
# A leader that dies part way


@pytest.mark.parametrize(("point", "committed"), [("holding_lock", False), ("before_temp_write", False),
                                                  ("after_temp_write", False), ("after_fsync", False),
                                                  ("after_rename", True), ("between_task_and_global", True)])
def test_the_next_holder_of_the_lock_finishes_or_undoes_the_batch_of_a_leader_that_died(
        reg: Registry, task: str, point: str, committed: bool) -> None:
    a, b, c = _agents(reg, task, 3)
    token = _queue(reg, task, _update(a, "completed", 100))  # applying it twice would fail: it is terminal then
    code, outcome = run_in_child(crash_during, str(reg.base), "update", (task, b, "failed"), point,
                                 "AGENT_REGISTRY.json")
    assert (code, outcome) == (17, None)
    queue = queue_dir(reg.task_file(task).path)

    reg.update(task, c, progress=10)  # the next holder of the lock

    if committed:
        assert _outcome(reg, task, token)["status"] == "completed"
        assert _agent(reg, task, b)["status"] == "failed"
    else:  # the request went back to the queue, and the next leader applied it
        assert _outcome(reg, task, token)["status"] == "completed"
        assert _agent(reg, task, b)["status"] == "running"
    doc = reg.read_task(task)
    assert _agent(reg, task, a)["status"] == "completed"
    assert doc["completed_count"] == 1
    assert task_violations(doc) == []
    assert list(queue.iterdir()) == []
    healed = Registry(reg.base)  # heal brings the global registry up to date after a crash between the writes
    assert global_violations(healed.read_global(), {task: healed.read_task(task)}) == []


def test_check_reports_and_repair_removes_what_dead_processes_left_in_the_queue(reg: Registry, task: str) -> None:
    _agents(reg, task, 1)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    queue = queue_dir(reg.task_file(task).path)
    queue.mkdir(exist_ok=True)
    litter = queue / f"{int(gone.stdout)}.0123456789ab.res"
    litter.write_bytes(b'{"ok": null}')
    report = check(reg.base)
    assert [(f.kind, f.path) for f in report.findings] == [("stale_temp", str(litter))]
    assert not repair(reg.base).refused
    assert litter.exists()  # a dry run, the default
    repair(reg.base, dry_run=False)
    assert not litter.exists()
    assert check(reg.base).healthy


# --------------------------------------------------------------------------------------------------------------------
# Many real processes


def _report_progress(base: str, task: str, agent: str, barrier: Any, count: int, results: Any) -> None:
    reg = Registry(base, heal=False, sessions=TmuxSessions())
    barrier.wait(30)
    io_stats.reset()
    returned = [reg.update(task, agent, progress=seq)["progress"] for seq in range(1, count + 1)]
    results.put((agent, returned, io_stats.writes))


def test_ten_processes_reporting_progress_lose_nothing_and_share_writes(reg: Registry, task: str) -> None:
    agents = _agents(reg, task, WORKERS)
    ctx = spawn()
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_report_progress, args=(str(reg.base), task, a, barrier, UPDATES, results))
             for a in agents]
    for p in procs:
        p.start()
    reports = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)

    for agent, returned, _ in reports:
        assert returned == list(range(1, UPDATES + 1)), f"{agent} got back someone else's record"
        assert _agent(reg, task, agent)["progress"] == UPDATES
    writes = sum(w for _, _, w in reports)
    # Each process made its own write only when no one else's batch took its update: far fewer writes than updates.
    assert writes < WORKERS * UPDATES, "no update was ever batched with another"
    assert task_violations(reg.read_task(task)) == []
    assert list(queue_dir(reg.task_file(task).path).iterdir()) == []
    assert multiprocessing.active_children() == []
