"""A process that dies at any point of the write protocol leaves a registry that opens whole.

Each operation is first run once to list the crash points it passes, then run again in a forked child for each
point, dying by ``os._exit`` at exactly that point; the registry is then opened afresh and checked: every invariant,
every earlier ``ok`` operation present, the crashed operation applied fully or not at all, and ``orch-registry
check`` finding nothing new but the one session the crashed operation was handling.  The same check, given a naive
in-place writer, fails: that is what makes the passing runs mean something.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_orch.chaos import Chaos, CrashExploration, CrashSite
from pytest_orch.swarm import Worker
from registry import Registry
from registry.health import Finding
from registry.store import ARCHIVE_CRASH_POINTS, CRASH_POINTS, DIR_CRASH_POINTS, JsonFile, crash_point

LIMITS = {"max_agents": 10, "max_concurrent": 5, "max_depth": 3}


def _task_with(*types: str, zombie: str | None = None) -> Callable[[Worker], dict[str, Any]]:
    """A setup: one task, an agent of each type, and optionally one of them a zombie (its session killed)."""

    def setup(w: Worker) -> dict[str, Any]:
        task = w.registry.create_task("crash points", **LIMITS)
        assert task is not None, "creating the task failed"
        agents = {}
        for agent_type in types:
            agents[agent_type] = w.registry.deploy(task, agent_type)
            assert agents[agent_type] is not None, f"deploying {agent_type} failed"
        if zombie is not None:
            assert w.kill_session(f"agent_{agents[zombie]}")
        return {"task": task, "agents": agents}

    return setup


def _empty(w: Worker) -> dict[str, Any]:
    return {}


def _session_of_a_new(agent_type: str) -> Callable[[Finding, dict[str, Any]], bool]:
    """A crashed deploy may leave the session it started: a leak that check finds and repair --kill-leaks ends."""
    return lambda f, ctx: f.kind == "leak" and (f.path or "").startswith(f"agent_{agent_type}-")


def _session_killed_of(agent_type: str) -> Callable[[Finding, dict[str, Any]], bool]:
    """A crashed kill may have killed the session and not yet recorded it: a zombie that reconcile reaps."""
    return lambda f, ctx: f.kind == "zombie" and f.agent_id == ctx["agents"][agent_type]


def _still_running(agent_type: str) -> Callable[[Finding, dict[str, Any]], bool]:
    """The harness's agents run `sleep`: one marked completed keeps its session, a leak with or without a crash."""
    return lambda f, ctx: f.kind == "leak" and f.path == f"agent_{ctx['agents'][agent_type]}"


ALL_POINTS = set(CRASH_POINTS) - set(DIR_CRASH_POINTS) - set(ARCHIVE_CRASH_POINTS)
ONE_FILE_POINTS = ALL_POINTS - {"between_task_and_global"}
#: create_task also makes directories durable (issue 12): a crash between a mkdir and the fsync of its parent.
CREATE_POINTS = ALL_POINTS | set(DIR_CRASH_POINTS)

#: name -> (setup, the operation, what a crash may leave for check to find, the crash points it must pass)
OPERATIONS: dict[str, tuple[Any, Any, Any, set[str]]] = {
    "create_task": (_task_with("alpha"),
                    lambda w, ctx: w.registry.create_task("another", **LIMITS), None, CREATE_POINTS),
    "create_task in an empty workspace": (_empty,
                                          lambda w, ctx: w.registry.create_task("first", **LIMITS), None,
                                          CREATE_POINTS),
    "deploy": (_task_with("alpha"),
               lambda w, ctx: w.registry.deploy(ctx["task"], "beta"), _session_of_a_new("beta"), ALL_POINTS),
    "update with a status change": (_task_with("alpha", "beta"),
                                    lambda w, ctx: w.registry.update(ctx["task"], ctx["agents"]["alpha"], "completed",
                                                                     100), _still_running("alpha"), ALL_POINTS),
    "update of progress only": (_task_with("alpha", "beta"),
                                lambda w, ctx: w.registry.update(ctx["task"], ctx["agents"]["alpha"], "running", 40),
                                None, ONE_FILE_POINTS),
    "kill": (_task_with("alpha", "beta"),
             lambda w, ctx: w.registry.kill(ctx["task"], ctx["agents"]["alpha"]), _session_killed_of("alpha"),
             ALL_POINTS),
    "reconcile": (_task_with("alpha", "beta", zombie="alpha"),
                  lambda w, ctx: w.registry.reconcile(ctx["task"]), None, ALL_POINTS),
}

def _explore(chaos: Chaos, root: Path, name: str, writer: Any = None,
             where: Callable[[CrashSite], bool] | None = None) -> CrashExploration:
    setup, op, tolerate, _points = OPERATIONS[name]
    return chaos.crash_points(root, name, setup, op, tolerate=tolerate, writer=writer, where=where)


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_a_crash_at_any_point_of_the_write_protocol_leaves_a_registry_that_opens_whole(
        orch_workspace: Path, orch_chaos: Chaos, tmp_path: Path, operation: str) -> None:
    exploration = _explore(orch_chaos, tmp_path / "crashes", operation)
    report = exploration.render()
    assert exploration.points == OPERATIONS[operation][3], report
    assert len(exploration.runs) == len(exploration.sites) >= len(exploration.points), report
    assert not exploration.failures, report
    # A crash before the task registry is renamed into place loses the operation; from then on a process that
    # opens the registry finishes it (the global registry is rebuilt from the task's).  Both must have happened.
    assert {run.applied for run in exploration.runs} == {"not at all", "fully"}, report


#: Operations that move terminal agents to the global registry's archive (issue 14): run with Registry.archive_after 0,
#: so that the write of the global registry that records a terminal agent first appends it to the archive.
ARCHIVING: dict[str, tuple[Any, Any, Any]] = {
    "update with a status change that archives": (
        _task_with("alpha", "beta"),
        lambda w, ctx: w.registry.update(ctx["task"], ctx["agents"]["alpha"], "completed", 100),
        _still_running("alpha")),
    "kill that archives": (_task_with("alpha", "beta"),
                           lambda w, ctx: w.registry.kill(ctx["task"], ctx["agents"]["alpha"]),
                           _session_killed_of("alpha")),
    "reconcile that archives": (_task_with("alpha", "beta", zombie="alpha"),
                                lambda w, ctx: w.registry.reconcile(ctx["task"]), None),
}


@pytest.mark.parametrize("operation", list(ARCHIVING))
def test_a_crash_at_any_point_of_a_write_that_archives_leaves_a_registry_that_opens_whole(
        orch_workspace: Path, orch_chaos: Chaos, tmp_path: Path, operation: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Registry, "archive_after", 0)  # the forked children inherit it
    setup, op, tolerate = ARCHIVING[operation]
    exploration = orch_chaos.crash_points(tmp_path / "crashes", operation, setup, op, tolerate=tolerate)
    report = exploration.render()
    assert exploration.points == ALL_POINTS | set(ARCHIVE_CRASH_POINTS), report
    assert not exploration.failures, report
    assert {run.applied for run in exploration.runs} == {"not at all", "fully"}, report


def test_deploy_passes_every_crash_point_of_the_protocol_in_order(orch_workspace: Path, orch_chaos: Chaos,
                                                                  tmp_path: Path) -> None:
    setup, op, _tolerate, _points = OPERATIONS["deploy"]
    exploration = orch_chaos.crash_points(tmp_path / "crashes", "deploy", setup, op,
                                          tolerate=_session_of_a_new("beta"))
    write = ["before_temp_write", "after_temp_write", "after_fsync", "after_rename"]
    assert [(s.point, s.file) for s in exploration.sites] == [
        ("holding_lock", "task registry"), ("holding_lock", "global registry"),
        *((p, "task registry") for p in write), ("between_task_and_global", "task registry"),
        *((p, "global registry") for p in write)], exploration.render()


def naive_write_bytes(self: JsonFile, data: bytes) -> None:
    """The old protocol: open the registry itself with 'wb' and write it in place, in two halves."""
    crash_point("before_temp_write", self.path)
    with open(self.path, "wb") as fh:
        half = len(data) // 2
        fh.write(data[:half])
        fh.flush()
        crash_point("after_temp_write", self.path)
        fh.write(data[half:])
        fh.flush()
        os.fsync(fh.fileno())
    crash_point("after_fsync", self.path)


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_the_same_crash_check_fails_a_registry_that_writes_in_place(orch_workspace: Path, orch_chaos: Chaos,
                                                                    tmp_path: Path, operation: str) -> None:
    # The in-place writer passes before_temp_write, after_temp_write (half the bytes written) and after_fsync; a
    # crash at the middle one is the torn file.  Crashing there is enough to show the check catches it.
    exploration = _explore(orch_chaos, tmp_path / "crashes", operation, writer=naive_write_bytes,
                           where=lambda site: site.point == "after_temp_write")
    report = exploration.render()
    assert exploration.runs, report
    assert exploration.failures, "a crash mid-write went unnoticed with an in-place writer:\n" + report
    for run in exploration.runs:
        assert run.applied == "unreadable", report
        assert any(problem.startswith("[corruption]") and " is corrupt: " in problem for problem in run.problems), \
            report
    assert "the report of the first broken run" in report
    assert "faults injected, in time order, and the operations they hit:" in report
    assert re.search(r"crash of p\d+ at after_temp_write \((task|global) registry\): cut short \w+\(", report), report
