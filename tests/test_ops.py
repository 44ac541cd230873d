"""The operations, one at a time, on real files and a private real tmux server."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers_registry import count_opens, fake_tmux, run_in_child, snapshot, tmux_cli

import registry
from registry import (
    CorruptRegistry,
    DuplicateAgent,
    InvalidArgument,
    InvalidName,
    InvalidTransition,
    LimitExceeded,
    Registry,
    RegistryError,
    RegistryMissing,
    SessionError,
    TmuxSessions,
    UnknownAgent,
    UnknownTask,
    WriteFailed,
    global_violations,
    task_violations,
)
from registry import ops as ops_module
from registry.model import GLOBAL_DIR, GLOBAL_FILE, TASK_FILE
from registry.store import io_stats, set_crash_hook


@pytest.fixture
def task(reg: Registry) -> str:
    return reg.create_task("the task under test", priority="P0", max_agents=6, max_depth=3, max_concurrent=4)


@pytest.fixture
def no_crash_hook() -> Any:
    yield
    set_crash_hook(None)


def assert_consistent(reg: Registry) -> None:
    tasks = {t: reg.read_task(t) for t in reg.task_ids()}
    broken = [str(v) for t in tasks.values() for v in task_violations(t)]
    broken += [str(v) for v in global_violations(reg.read_global(), tasks)]
    assert broken == []


def agent_of(reg: Registry, task_id: str, agent_id: str) -> dict[str, Any]:
    return next(a for a in reg.read_task(task_id)["agents"] if a["id"] == agent_id)


def agent_sessions(tmux: TmuxSessions) -> set[str]:
    return {s for s in tmux.alive() if s.startswith("agent_")}


# --------------------------------------------------------------------------------------------------------------------
# create_task and deploy


def test_create_task_writes_the_task_registry_and_registers_it_globally(reg: Registry, base: Path) -> None:
    task_id = reg.create_task("describe it", priority="P2", max_agents=7, max_depth=2, max_concurrent=3)
    assert re.fullmatch(r"TASK-\d{8}-\d{6}-[0-9a-f]{8}", task_id)
    doc = json.loads((base / task_id / TASK_FILE).read_text())
    assert doc["task_id"] == task_id
    assert doc["task_description"] == "describe it"
    assert doc["priority"] == "P2"
    assert (doc["max_agents"], doc["max_depth"], doc["max_concurrent"]) == (7, 2, 3)
    assert (doc["total_spawned"], doc["active_count"], doc["completed_count"]) == (0, 0, 0)
    assert doc["agents"] == []
    assert doc["agent_hierarchy"] == {"orchestrator": []}
    assert doc["workspace"] == str(base / task_id)
    glob = json.loads((base / GLOBAL_DIR / GLOBAL_FILE).read_text())
    assert glob["tasks"][task_id]["description"] == "describe it"
    assert (glob["total_tasks"], glob["active_tasks"]) == (1, 1)


def test_create_task_uses_the_documented_defaults(reg: Registry) -> None:
    doc = reg.read_task(reg.create_task("defaults"))
    assert (doc["max_agents"], doc["max_depth"], doc["max_concurrent"]) == (45, 5, 20)


@pytest.mark.parametrize("limits", [{"max_agents": 0}, {"max_depth": -1}, {"max_concurrent": True},
                                    {"max_agents": "3"}])
def test_create_task_refuses_a_limit_that_is_not_a_whole_number_of_at_least_one(
        reg: Registry, base: Path, limits: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        reg.create_task("bad limits", **limits)
    assert list(base.iterdir()) == []


def test_create_task_refuses_an_existing_task_id(reg: Registry, task: str) -> None:
    before = reg.read_task(task)
    with pytest.raises(InvalidArgument, match="already exists"):
        reg.create_task("again", task_id=task)
    assert reg.read_task(task) == before


def test_deploy_registers_a_running_agent_and_starts_its_session(reg: Registry, task: str,
                                                                 tmux: TmuxSessions) -> None:
    agent = reg.deploy(task, "investigator", "look into it")
    assert re.fullmatch(r"investigator-\d{6}-[0-9a-f]{6}", agent["id"])
    assert agent["tmux_session"] == f"agent_{agent['id']}"
    assert (agent["status"], agent["parent"], agent["depth"], agent["progress"]) == ("running", "orchestrator", 1, 0)
    assert agent["prompt"] == "look into it"
    assert agent_of(reg, task, agent["id"]) == agent
    assert agent_sessions(tmux) == {agent["tmux_session"]}
    doc = reg.read_task(task)
    assert (doc["total_spawned"], doc["active_count"]) == (1, 1)
    assert doc["agent_hierarchy"]["orchestrator"] == [agent["id"]]
    view = reg.read_global()["agents"][agent["id"]]
    assert (view["task_id"], view["type"], view["status"]) == (task, "investigator", "running")
    assert_consistent(reg)


def test_the_session_runs_the_agent_command_in_the_workspace(base: Path, tmux: TmuxSessions) -> None:
    out = base.parent / "ran"
    reg = Registry(base, agent_command=f"sh -c 'echo {{task_id}} {{agent_id}} $ORCH_WORKSPACE > {out}; sleep 60'")
    task_id = reg.create_task("command")
    agent = reg.deploy(task_id, "runner")
    deadline = time.monotonic() + 10
    while not (out.exists() and out.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert out.read_text().split() == [task_id, agent["id"], str(base)]


def test_deploy_refuses_a_second_active_agent_of_the_same_type(reg: Registry, task: str,
                                                                tmux: TmuxSessions) -> None:
    first = reg.deploy(task, "tester")
    before = snapshot(reg.base)
    with pytest.raises(DuplicateAgent) as raised:
        reg.deploy(task, "tester")
    assert first["id"] in str(raised.value)
    assert raised.value.existing == first["id"]
    assert isinstance(raised.value, LimitExceeded)
    assert snapshot(reg.base) == before
    assert agent_sessions(tmux) == {first["tmux_session"]}
    reg.update(task, first["id"], "completed")
    second = reg.deploy(task, "tester")  # a finished agent does not block its type
    assert second["id"] != first["id"]


def test_deploy_refuses_more_than_max_agents_even_when_earlier_ones_finished(reg: Registry, tmux: TmuxSessions) -> None:
    task_id = reg.create_task("two at most", max_agents=2)
    for kind in ("a", "b"):
        reg.update(task_id, reg.deploy(task_id, kind)["id"], "completed")
    before = snapshot(reg.base)
    with pytest.raises(LimitExceeded, match="max_agents is 2") as raised:
        reg.deploy(task_id, "c")
    assert raised.value.limit == "max_agents"
    assert snapshot(reg.base) == before
    assert agent_sessions(tmux) == {f"agent_{a['id']}" for a in reg.read_task(task_id)["agents"]}


def test_deploy_refuses_more_than_max_concurrent_active_agents(reg: Registry, tmux: TmuxSessions) -> None:
    task_id = reg.create_task("two at once", max_concurrent=2)
    first, _ = reg.deploy(task_id, "a"), reg.deploy(task_id, "b")
    with pytest.raises(LimitExceeded) as raised:
        reg.deploy(task_id, "c")
    assert raised.value.limit == "max_concurrent"
    assert len(agent_sessions(tmux)) == 2
    reg.kill(task_id, first["id"])
    assert reg.deploy(task_id, "c")["status"] == "running"


def test_deploy_computes_depth_from_the_parent_and_refuses_beyond_max_depth(reg: Registry, task: str) -> None:
    top = reg.deploy(task, "lead")
    child = reg.deploy(task, "helper", parent=top["id"])
    grandchild = reg.deploy(task, "subhelper", parent=child["id"])
    assert [top["depth"], child["depth"], grandchild["depth"]] == [1, 2, 3]
    doc = reg.read_task(task)
    assert doc["agent_hierarchy"][top["id"]] == [child["id"]]
    assert doc["agent_hierarchy"][child["id"]] == [grandchild["id"]]
    with pytest.raises(LimitExceeded, match="depth 4") as raised:
        reg.deploy(task, "too-deep", parent=grandchild["id"])
    assert raised.value.limit == "max_depth"
    assert reg.read_global()["agents"][child["id"]]["parent"] == top["id"]
    assert_consistent(reg)


def test_deploy_refuses_a_parent_that_is_not_an_agent_of_the_task(reg: Registry, task: str) -> None:
    with pytest.raises(UnknownAgent, match="ghost-000000-aaaaaa"):
        reg.deploy(task, "orphan", parent="ghost-000000-aaaaaa")
    assert reg.read_task(task)["agents"] == []


class _RepeatingHex:
    """The random part of new ids, forced to collide: each value is given twice before the next."""

    def __init__(self, values: list[str]) -> None:
        self.values = values

    def token_hex(self, n: int) -> str:
        return self.values.pop(0) if self.values else os.urandom(n).hex()


def test_deploy_generates_an_id_unique_in_the_task_and_the_global_registry(
        reg: Registry, task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    other = reg.create_task("another task")
    taken = reg.deploy(other, "dup", "")["id"]
    reg.update(other, taken, "completed")
    stamp = taken.split("-")[1]
    # Ids of this second and the next few, all with the random part the next deploy will draw first.
    monkeypatch.setattr(ops_module, "secrets", _RepeatingHex(["aaaaaa"] * 4 + ["bbbbbb"]))
    doc = reg.read_global()
    seconds = int(stamp[:2]) * 3600 + int(stamp[2:4]) * 60 + int(stamp[4:])
    for s in range(seconds, seconds + 120):
        fake = f"dup-{s // 3600 % 24:02d}{s // 60 % 60:02d}{s % 60:02d}-aaaaaa"
        doc["agents"][fake] = {"task_id": "TASK-elsewhere", "type": "dup", "status": "completed"}
    (reg.base / GLOBAL_DIR / GLOBAL_FILE).write_text(json.dumps(doc))
    agent = reg.deploy(task, "dup")
    assert agent["id"].endswith("-bbbbbb"), "the id was not checked against the global registry"


# --------------------------------------------------------------------------------------------------------------------
# The load optimization


def test_deploy_reads_the_task_registry_once_and_the_global_registry_once(reg: Registry, task: str) -> None:
    reg.deploy(task, "warmup")
    task_path = reg.base / task / TASK_FILE
    global_path = reg.base / GLOBAL_DIR / GLOBAL_FILE
    io_stats.reset()
    with count_opens(task=task_path, glob=global_path) as counts:
        agent = reg.deploy(task, "counted")
    assert counts.reads == {"task": 1, "glob": 1}
    assert counts.writes == {"task": 0, "glob": 0}, "writes go to a temp file that replaces the registry"
    assert io_stats.reads == 2  # the store's own counter agrees with the independent one
    assert agent_of(reg, task, agent["id"])["status"] == "running"


def test_a_deploy_under_a_parent_still_reads_each_registry_once(reg: Registry, task: str) -> None:
    parent = reg.deploy(task, "lead")
    with count_opens(task=reg.base / task / TASK_FILE, glob=reg.base / GLOBAL_DIR / GLOBAL_FILE) as counts:
        reg.deploy(task, "helper", parent=parent["id"])
    assert counts.reads == {"task": 1, "glob": 1}


# --------------------------------------------------------------------------------------------------------------------
# update


def test_update_records_progress_message_and_status(reg: Registry, task: str) -> None:
    agent = reg.deploy(task, "worker")
    record = reg.update(task, agent["id"], "working", "half way", 50)
    assert (record["status"], record["progress"], record["last_message"]) == ("working", 50, "half way")
    assert agent_of(reg, task, agent["id"]) == record
    assert reg.read_global()["agents"][agent["id"]]["status"] == "working"
    assert reg.read_task(task)["active_count"] == 1
    assert_consistent(reg)


def test_a_progress_report_writes_the_task_registry_only(reg: Registry, task: str) -> None:
    agent = reg.deploy(task, "worker")
    global_before = snapshot(reg.base / GLOBAL_DIR)
    reg.update(task, agent["id"], progress=40)
    reg.update(task, agent["id"], "running", "same status", 45)
    assert snapshot(reg.base / GLOBAL_DIR) == global_before
    assert agent_of(reg, task, agent["id"])["progress"] == 45


def test_completing_decrements_active_and_increments_completed_exactly_once(reg: Registry, task: str) -> None:
    one, two = reg.deploy(task, "one"), reg.deploy(task, "two")
    reg.update(task, one["id"], "working")
    done = reg.update(task, one["id"], "completed", "all done", 100)
    assert "completed_at" in done
    assert "termination_reason" not in done
    doc = reg.read_task(task)
    assert (doc["active_count"], doc["completed_count"], doc["total_spawned"]) == (1, 1, 2)
    for status in ("failed", "completed", "running"):
        with pytest.raises(InvalidTransition, match="terminal"):
            reg.update(task, one["id"], status)
    with pytest.raises(InvalidTransition):
        reg.update(task, one["id"], progress=10)
    with pytest.raises(InvalidTransition):
        reg.kill(task, one["id"])
    failed = reg.update(task, two["id"], "failed", "it broke")
    assert failed["termination_reason"] == "it broke"
    assert "terminated_at" in failed
    doc = reg.read_task(task)
    assert (doc["active_count"], doc["completed_count"]) == (0, 1)
    glob = reg.read_global()
    assert (glob["active_agents"], glob["total_agents_spawned"]) == (0, 2)
    assert_consistent(reg)


@pytest.mark.parametrize("status", ["completed", "terminated", "error", "failed"])
def test_every_terminal_status_is_final(reg: Registry, task: str, status: str) -> None:
    agent = reg.deploy(task, "worker")
    reg.update(task, agent["id"], status)
    before = snapshot(reg.base)
    for later in ("running", "working", "blocked", status):
        with pytest.raises(InvalidTransition):
            reg.update(task, agent["id"], later)
    assert snapshot(reg.base) == before
    assert reg.read_task(task)["active_count"] == 0


def test_update_refuses_an_unknown_status_agent_or_progress_and_writes_nothing(reg: Registry, task: str) -> None:
    agent = reg.deploy(task, "worker")
    before = snapshot(reg.base)
    with pytest.raises(InvalidTransition, match="unknown status 'done'"):
        reg.update(task, agent["id"], "done")
    with pytest.raises(UnknownAgent, match="nobody-000000-000000"):
        reg.update(task, "nobody-000000-000000", "working")
    for progress in (-1, 101, 50.5, True):
        with pytest.raises(InvalidArgument):
            reg.update(task, agent["id"], progress=progress)  # type: ignore[arg-type]
    assert snapshot(reg.base) == before


# --------------------------------------------------------------------------------------------------------------------
# kill and reconcile


def test_kill_kills_the_session_and_marks_the_agent_terminated_with_the_reason(
        reg: Registry, task: str, tmux: TmuxSessions) -> None:
    keep, victim = reg.deploy(task, "keep"), reg.deploy(task, "victim")
    record = reg.kill(task, victim["id"], "no longer needed")
    assert agent_sessions(tmux) == {keep["tmux_session"]}
    assert (record["status"], record["termination_reason"]) == ("terminated", "no longer needed")
    assert "terminated_at" in record
    doc = reg.read_task(task)
    assert (doc["active_count"], doc["completed_count"]) == (1, 0)
    assert reg.read_global()["agents"][victim["id"]]["termination_reason"] == "no longer needed"
    with pytest.raises(InvalidTransition, match="already terminated"):
        reg.kill(task, victim["id"])
    assert reg.read_task(task)["active_count"] == 1
    assert_consistent(reg)


def test_kill_marks_the_agent_terminated_when_its_session_is_already_gone(reg: Registry, task: str) -> None:
    agent = reg.deploy(task, "gone")
    assert tmux_cli("kill-session", "-t", agent["tmux_session"]).returncode == 0
    assert reg.kill(task, agent["id"])["status"] == "terminated"


def test_kill_refuses_an_unknown_agent(reg: Registry, task: str) -> None:
    with pytest.raises(UnknownAgent):
        reg.kill(task, "nobody-000000-000000")


def test_reconcile_reaps_exactly_the_agents_whose_sessions_were_killed_behind_its_back(
        reg: Registry, task: str, tmux: TmuxSessions) -> None:
    agents = [reg.deploy(task, kind) for kind in ("a", "b", "c", "d")]
    done = reg.update(task, agents[3]["id"], "completed")
    for agent in (agents[0], agents[2], agents[3]):  # the finished one's session may go: it is not active
        assert tmux_cli("kill-session", "-t", agent["tmux_session"]).returncode == 0
    reaped = reg.reconcile(task)
    assert sorted(reaped) == sorted([agents[0]["id"], agents[2]["id"]])
    for agent in (agents[0], agents[2]):
        record = agent_of(reg, task, agent["id"])
        assert (record["status"], record["termination_reason"]) == ("terminated", "session_not_found")
    assert agent_of(reg, task, agents[1]["id"])["status"] == "running"
    assert agent_of(reg, task, agents[3]["id"]) == done
    assert reg.read_task(task)["active_count"] == 1
    assert reg.reconcile(task) == []
    assert_consistent(reg)


def test_reconcile_reaps_every_active_agent_when_the_tmux_server_is_gone(reg: Registry, task: str,
                                                                        tmux: TmuxSessions) -> None:
    agents = [reg.deploy(task, kind) for kind in ("a", "b")]
    tmux.kill_server()
    deadline = time.monotonic() + 10  # "server exited unexpectedly" while it shuts down is a failed query
    while "no server running" not in tmux_cli("list-sessions").stderr and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(reg.reconcile(task)) == sorted(a["id"] for a in agents)


@pytest.mark.parametrize("failure", ["missing binary", "failing binary"])
def test_reconcile_reaps_nothing_when_the_tmux_query_fails(reg: Registry, task: str, tmp_path: Path,
                                                          failure: str) -> None:
    agents = [reg.deploy(task, kind) for kind in ("a", "b")]
    tmux_cli("kill-session", "-t", agents[0]["tmux_session"])
    binary = tmp_path / "no-such-tmux" if failure == "missing binary" else fake_tmux(
        tmp_path, stderr="server exited unexpectedly", code=1)
    blind = Registry(reg.base, sessions=TmuxSessions(tmux_bin=binary))
    before = snapshot(reg.base)
    with pytest.raises(SessionError) as raised:
        blind.reconcile(task)
    assert raised.value.applied is False
    assert snapshot(reg.base) == before
    assert reg.reconcile(task) == [agents[0]["id"]]  # a working tmux finds the zombie


# --------------------------------------------------------------------------------------------------------------------
# Session and registration failures


def test_a_session_that_cannot_start_leaves_nothing_registered(reg: Registry, task: str, tmp_path: Path) -> None:
    broken = Registry(reg.base, sessions=TmuxSessions(tmux_bin=fake_tmux(tmp_path, stderr="boom", code=1)))
    before = snapshot(reg.base)
    with pytest.raises(SessionError, match="could not start"):
        broken.deploy(task, "unlucky")
    assert snapshot(reg.base) == before


def test_a_registration_that_fails_kills_the_session_it_started(reg: Registry, task: str, tmux: TmuxSessions,
                                                                 no_crash_hook: None) -> None:
    kept = reg.deploy(task, "kept")
    before = snapshot(reg.base, skip_locks=True)

    def disk_full(point: str, path: Path) -> None:
        if point == "before_temp_write" and path.name == TASK_FILE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    set_crash_hook(disk_full)
    with pytest.raises(WriteFailed) as raised:
        reg.deploy(task, "unlucky")
    set_crash_hook(None)
    assert raised.value.applied is False
    assert snapshot(reg.base, skip_locks=True) == before
    assert agent_sessions(tmux) == {kept["tmux_session"]}


def test_a_global_write_that_fails_after_the_task_write_says_the_deploy_may_be_applied(
        reg: Registry, task: str, tmux: TmuxSessions, no_crash_hook: None) -> None:
    def global_disk_full(point: str, path: Path) -> None:
        if point == "before_temp_write" and path.name == GLOBAL_FILE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    set_crash_hook(global_disk_full)
    with pytest.raises(WriteFailed) as raised:
        reg.deploy(task, "half")
    set_crash_hook(None)
    assert raised.value.applied is not False, "the agent is in the task registry, the source of truth"
    (agent,) = reg.read_task(task)["agents"]
    assert agent_sessions(tmux) == {agent["tmux_session"]}, "a registered agent's session was killed"
    assert Registry(reg.base).read_global()["agents"][agent["id"]]["status"] == "running"  # healed on open
    assert_consistent(reg)


def test_a_lock_held_elsewhere_makes_deploy_time_out_without_starting_a_session(
        reg: Registry, task: str, tmux: TmuxSessions, tmp_path: Path) -> None:
    from helpers_registry import LockHolder

    impatient = Registry(reg.base, lock_timeout=0.1)
    before = snapshot(reg.base)
    with LockHolder(reg.global_file.lock_path, tmp_path / "released"), pytest.raises(registry.LockTimeout):
        impatient.deploy(task, "waiting")
    assert snapshot(reg.base) == before
    assert agent_sessions(tmux) == set()


# --------------------------------------------------------------------------------------------------------------------
# Reading never writes


def test_read_only_calls_never_write(reg: Registry, task: str, base: Path) -> None:
    reg.update(task, reg.deploy(task, "reader")["id"], "working")
    before = snapshot(base)
    Registry(base)  # opening heals only what disagrees, and nothing does
    assert reg.read_task(task)["task_id"] == task
    assert task in reg.read_global()["tasks"]
    assert reg.task_ids() == [task]
    assert registry.check(base).healthy
    registry.repair(base, dry_run=True)
    assert snapshot(base) == before


def test_reading_an_empty_or_missing_workspace_creates_nothing(tmp_path: Path, tmux: TmuxSessions) -> None:
    missing = tmp_path / "nowhere"
    reg = Registry(missing)
    assert reg.read_global()["agents"] == {}
    assert reg.task_ids() == []
    with pytest.raises(UnknownTask):
        reg.read_task("TASK-1")
    assert not missing.exists()


# --------------------------------------------------------------------------------------------------------------------
# Bad input

BAD_NAMES = ["../x", "/", "a b", "a:b", ".", "..", "", "x" * 65, "-x", "a/b", "tab\there", "new\nline", "é"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_a_task_id_that_could_escape_the_workspace_or_break_tmux_is_refused_and_nothing_is_written(
        reg: Registry, task: str, tmp_path: Path, name: str) -> None:
    agent = reg.deploy(task, "target")
    before = snapshot(tmp_path, skip_locks=False)
    calls: list[Callable[[], object]] = [lambda: reg.create_task("evil", task_id=name), lambda: reg.deploy(name, "x"),
             lambda: reg.update(name, agent["id"], "working"), lambda: reg.kill(name, agent["id"]),
             lambda: reg.reconcile(name), lambda: reg.read_task(name)]
    for call in calls:
        with pytest.raises(InvalidName) as raised:
            call()
        assert isinstance(raised.value, RegistryError)
        assert isinstance(raised.value, ValueError)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_an_agent_type_or_parent_that_could_break_tmux_is_refused_and_nothing_is_written(
        reg: Registry, task: str, tmp_path: Path, tmux: TmuxSessions, name: str) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(InvalidName):
        reg.deploy(task, name)
    with pytest.raises((InvalidName, UnknownAgent)):
        reg.deploy(task, "child", parent=name)
    assert snapshot(tmp_path) == before
    assert agent_sessions(tmux) == set()


def test_a_name_of_exactly_64_safe_characters_is_accepted(reg: Registry) -> None:
    task_id = reg.create_task("long", task_id="T" * 64)
    assert reg.read_task(task_id)["task_id"] == task_id


def test_operations_on_an_unknown_task_raise_unknown_task_and_create_nothing(reg: Registry, task: str,
                                                                             tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    for call in (lambda: reg.deploy("TASK-nope", "x"), lambda: reg.update("TASK-nope", "a", "working"),
                 lambda: reg.kill("TASK-nope", "a"), lambda: reg.reconcile("TASK-nope"),
                 lambda: reg.read_task("TASK-nope")):
        with pytest.raises(UnknownTask, match="TASK-nope"):
            call()
    assert snapshot(tmp_path) == before
    assert not (reg.base / "TASK-nope").exists()


def test_a_missing_global_registry_is_refused_not_silently_replaced(reg: Registry, task: str) -> None:
    (reg.base / GLOBAL_DIR / GLOBAL_FILE).unlink()
    before = snapshot(reg.base)
    with pytest.raises(RegistryMissing, match="orch-registry repair"):
        reg.deploy(task, "x")
    with pytest.raises(RegistryMissing):
        reg.create_task("another")
    assert snapshot(reg.base) == before


def test_a_corrupt_task_registry_is_refused_by_every_operation_and_left_byte_identical(
        reg: Registry, task: str, tmux: TmuxSessions) -> None:
    agent = reg.deploy(task, "worker")
    path = reg.base / task / TASK_FILE
    bad = path.read_bytes()[:-40]
    path.write_bytes(bad)
    before = snapshot(reg.base)
    for call in (lambda: reg.deploy(task, "other"), lambda: reg.update(task, agent["id"], "working"),
                 lambda: reg.kill(task, agent["id"]), lambda: reg.reconcile(task), lambda: reg.read_task(task)):
        with pytest.raises(CorruptRegistry) as raised:
            call()
        assert str(path) in str(raised.value)
        assert raised.value.backup == str(path) + ".bak"
    assert snapshot(reg.base) == before
    assert agent_sessions(tmux) == {agent["tmux_session"]}


# --------------------------------------------------------------------------------------------------------------------
# Errors cross process boundaries


def _every_error() -> list[RegistryError]:
    return [cls(f"{cls.__name__} happened", task_id="T", path="/p", applied=None if cls is registry.WriteFailed
                else False) for cls in (getattr(registry, name) for name in registry.__all__)
            if isinstance(cls, type) and issubclass(cls, RegistryError)]


def test_every_error_class_pickles_with_its_message_and_details() -> None:
    errors = _every_error()
    assert len(errors) == 14  # UnsafePath joined them (issue 12)
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert (str(copy), copy.details, copy.applied) == (str(error), error.details, error.applied)
        assert copy.details["task_id"] == getattr(copy, "task_id", None) == "T"


def _raise_duplicate(base: str, task_id: str) -> None:
    Registry(base).deploy(task_id, "tester")


def test_an_error_raised_in_another_process_arrives_whole(reg: Registry, task: str) -> None:
    first = reg.deploy(task, "tester")
    code, outcome = run_in_child(_raise_duplicate, str(reg.base), task)
    assert code == 0
    kind, error = outcome
    assert kind == "raised"
    assert type(error) is DuplicateAgent
    assert error.existing == first["id"]
    assert first["id"] in str(error)
    assert error.applied is False


def test_errors_raised_by_the_operations_pickle(reg: Registry, task: str) -> None:
    raised = []
    calls: list[Callable[[], object]] = [lambda: reg.deploy("TASK-nope", "x"), lambda: reg.update(task, "a", "x"),
                                         lambda: reg.deploy(task, "a b"), lambda: reg.kill(task, "nobody")]
    for call in calls:
        with pytest.raises(RegistryError) as info:
            call()
        raised.append(info.value)
    for error in raised:
        copy = pickle.loads(pickle.dumps(error))
        assert (type(copy), str(copy), copy.details) == (type(error), str(error), error.details)


# --------------------------------------------------------------------------------------------------------------------
# The real registry files

SAMPLE_EMPTY = "TASK-20251018-220858-1d09b188"
SAMPLE_BUSY = "TASK-20251017-215604-df6a3cbd"
SAMPLE_ZOMBIE = "jsonl_architecture_planner-215640-c3f469"
COUNTERS = {"agents", "agent_hierarchy", "total_spawned", "active_count", "completed_count"}


def test_opening_the_samples_writes_nothing(samples: Path, tmux: TmuxSessions) -> None:
    before = snapshot(samples)
    reg = Registry(samples)
    assert reg.heal() == []
    assert snapshot(samples) == before


def test_deploy_and_update_on_the_samples_keep_every_key_they_do_not_own(samples: Path, tmux: TmuxSessions) -> None:
    def load(path: Path) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(path.read_bytes())
        return doc

    paths = {t: samples / t / TASK_FILE for t in (SAMPLE_EMPTY, SAMPLE_BUSY)}
    global_path = samples / GLOBAL_DIR / GLOBAL_FILE
    before = {t: load(p) for t, p in paths.items()}
    global_before = load(global_path)
    touched = (SAMPLE_EMPTY, SAMPLE_BUSY, GLOBAL_DIR)
    untouched = {k: v for k, v in snapshot(samples).items() if not k.startswith(touched)}
    reg = Registry(samples)

    fresh = reg.deploy(SAMPLE_EMPTY, "line_truncator", "truncate long lines")
    other = reg.deploy(SAMPLE_BUSY, "jsonl_reviewer", "review it")
    finished = reg.update(SAMPLE_BUSY, SAMPLE_ZOMBIE, "completed", "done at last", 100)

    after = {t: load(p) for t, p in paths.items()}
    for task_id in paths:
        assert {k: v for k, v in after[task_id].items() if k not in COUNTERS} == {
            k: v for k, v in before[task_id].items() if k not in COUNTERS}
        assert after[task_id]["workspace"].startswith("${workspaceFolder}/")
        assert "orchestration_guidance" in after[task_id]
        assert "spiral_checks" in after[task_id]
    assert after[SAMPLE_EMPTY]["agents"] == [fresh]
    old_agents = {a["id"]: a for a in before[SAMPLE_BUSY]["agents"]}
    new_agents = {a["id"]: a for a in after[SAMPLE_BUSY]["agents"]}
    assert list(new_agents) == [*old_agents, other["id"]]
    for agent_id, agent in old_agents.items():
        if agent_id != SAMPLE_ZOMBIE:
            assert new_agents[agent_id] == agent  # completion_validation and all
    changed = {k for k in new_agents[SAMPLE_ZOMBIE] if new_agents[SAMPLE_ZOMBIE][k] != old_agents[SAMPLE_ZOMBIE].get(k)}
    assert changed == {"status", "progress", "last_update", "last_message", "completed_at"}
    assert finished["prompt"] == old_agents[SAMPLE_ZOMBIE]["prompt"]
    assert (after[SAMPLE_BUSY]["active_count"], after[SAMPLE_BUSY]["completed_count"]) == (
        before[SAMPLE_BUSY]["active_count"], before[SAMPLE_BUSY]["completed_count"] + 1)

    glob = load(global_path)
    totals = ("agents", "total_agents_spawned", "active_agents")
    assert {k: v for k, v in glob.items() if k not in totals} == {
        k: v for k, v in global_before.items() if k not in totals}
    for agent_id, entry in global_before["agents"].items():
        if agent_id != SAMPLE_ZOMBIE:
            assert glob["agents"][agent_id] == entry, f"the global entry of untouched agent {agent_id} changed"
    assert glob["agents"][SAMPLE_ZOMBIE]["status"] == "completed"
    assert (glob["total_agents_spawned"], glob["active_agents"]) == (29, 2)
    assert {k: v for k, v in snapshot(samples).items() if k in untouched} == untouched
    assert_consistent(reg)


# --------------------------------------------------------------------------------------------------------------------
# A crash between the task write and the global write


def _prepare(reg: Registry, operation: str) -> tuple[str, tuple[Any, ...]]:
    """A workspace ready for *operation*; return the task it concerns and the operation's arguments."""
    if operation == "create_task (the first)":
        return "TASK-first", ("the very first task", "P1", 45, 5, 20)
    task_id = reg.create_task("crash target")
    if operation == "create_task":
        return "TASK-second", ("a second task", "P1", 45, 5, 20)
    if operation == "deploy":
        return task_id, (task_id, "doomed", "crash while registering me")
    agent = reg.deploy(task_id, "victim")
    reg.deploy(task_id, "bystander")
    if operation == "update to completed":
        return task_id, (task_id, agent["id"], "completed", "done", 100)
    if operation == "update to working":
        return task_id, (task_id, agent["id"], "working", "busy", 10)
    if operation == "kill":
        return task_id, (task_id, agent["id"], "stop")
    assert tmux_cli("kill-session", "-t", agent["tmux_session"]).returncode == 0
    return task_id, (task_id,)


def _crash_create_task(base: str, task_id: str, args: tuple[Any, ...]) -> None:
    from helpers_registry import crash_at

    reg = Registry(base)
    crash_at("between_task_and_global", TASK_FILE, 17)
    reg.create_task(*args, task_id=task_id)


@pytest.mark.parametrize("operation", ["create_task (the first)", "create_task", "deploy", "update to completed",
                                       "update to working", "kill", "reconcile"])
def test_a_crash_between_the_task_write_and_the_global_write_heals_when_the_registry_is_reopened(
        base: Path, tmux: TmuxSessions, operation: str) -> None:
    from helpers_registry import crash_during

    reg = Registry(base)
    task_id, args = _prepare(reg, operation)
    if operation.startswith("create_task"):
        code, outcome = run_in_child(_crash_create_task, str(base), task_id, args)
    else:
        method = operation.split()[0]
        code, outcome = run_in_child(crash_during, str(base), method, args, "between_task_and_global", TASK_FILE)
    assert (code, outcome) == (17, None), "the child did not die at the crash point"

    stale = Registry(base, heal=False)
    tasks = {t: stale.read_task(t) for t in stale.task_ids()}
    assert task_id in tasks, "the task registry was not written before the crash"
    assert global_violations(stale.read_global(), tasks) != [], "the crash left nothing to heal"

    healed = Registry(base)
    assert_consistent(healed)
    glob = healed.read_global()
    for agent in healed.read_task(task_id)["agents"]:
        assert glob["agents"][agent["id"]]["status"] == agent["status"]
    assert task_id in glob["tasks"]
    if operation == "deploy":
        (doomed,) = [a for a in healed.read_task(task_id)["agents"] if a["type"] == "doomed"]
        assert doomed["tmux_session"] in agent_sessions(tmux), "a registered agent lost its session"
    healed.deploy(task_id, "after-the-crash")  # and the workspace works on
    assert_consistent(healed)


def _hold_locks_and_die(base: str, task_id: str) -> None:
    from helpers_registry import crash_at

    crash_at("holding_lock", "GLOBAL_REGISTRY.json", 17)
    Registry(base).deploy(task_id, "dies-holding-both-locks")


def test_a_process_that_dies_holding_the_locks_does_not_wedge_the_registry(reg: Registry, task: str) -> None:
    code, _ = run_in_child(_hold_locks_and_die, str(reg.base), task)
    assert code == 17
    quick = Registry(reg.base, lock_timeout=0)
    assert quick.deploy(task, "next")["status"] == "running"
    assert_consistent(quick)


# --------------------------------------------------------------------------------------------------------------------
# One critical section over both registries


def _deploy_and_pause_between_the_writes(base: str, task_id: str, paused: str, resume: str) -> str:
    def pause(point: str, path: Path) -> None:
        if point == "between_task_and_global":
            Path(paused).touch()
            deadline = time.monotonic() + 30
            while not Path(resume).exists() and time.monotonic() < deadline:
                time.sleep(0.01)

    set_crash_hook(pause)
    agent: dict[str, Any] = Registry(base).deploy(task_id, "paused")
    return str(agent["id"])


def test_deploy_holds_the_task_and_the_global_lock_across_both_writes(reg: Registry, task: str,
                                                                      tmp_path: Path) -> None:
    from helpers_registry import spawn

    paused, resume = tmp_path / "paused", tmp_path / "resume"
    with spawn().Pool(1) as pool:
        pending = pool.apply_async(_deploy_and_pause_between_the_writes,
                                   (str(reg.base), task, str(paused), str(resume)))
        try:
            deadline = time.monotonic() + 30
            while not paused.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert paused.exists(), "the deploy never reached the point between its two writes"
            for file in (reg.task_file(task), reg.global_file):
                with pytest.raises(registry.LockTimeout), file.locked(timeout=0):
                    pass
            with pytest.raises(registry.LockTimeout):  # a create_task needs the global lock too
                Registry(reg.base, lock_timeout=0.2, heal=False).create_task("another task")
        finally:
            resume.touch()
        agent_id = pending.get(timeout=60)
    assert agent_of(reg, task, agent_id)["status"] == "running"
    assert_consistent(reg)


def test_a_write_passes_every_point_of_the_protocol_in_order(reg: Registry, task: str,
                                                             no_crash_hook: None) -> None:
    seen: list[tuple[str, str]] = []
    set_crash_hook(lambda point, path: seen.append((point, path.name)))
    Registry(reg.base, lock_timeout=0.5).deploy(task, "observed")
    assert seen == [("holding_lock", TASK_FILE), ("holding_lock", GLOBAL_FILE),
                    ("before_temp_write", TASK_FILE), ("after_temp_write", TASK_FILE), ("after_fsync", TASK_FILE),
                    ("after_rename", TASK_FILE), ("between_task_and_global", TASK_FILE),
                    ("before_temp_write", GLOBAL_FILE), ("after_temp_write", GLOBAL_FILE),
                    ("after_fsync", GLOBAL_FILE), ("after_rename", GLOBAL_FILE)]


def test_the_directory_is_opened_after_the_rename_to_be_fsynced(reg: Registry, task: str) -> None:
    with count_opens(directory=reg.base / task) as counts:
        reg.update(task, reg.deploy(task, "synced")["id"], progress=5)
    assert counts.reads["directory"] == 2  # one directory fsync per task write: the deploy and the update


def test_the_workspace_is_orch_workspace_else_dot_agent_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  tmux: TmuxSessions) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ORCH_WORKSPACE", raising=False)
    assert registry.default_base() == Path(".agent-workspace")
    assert Registry().base == tmp_path / ".agent-workspace"
    monkeypatch.setenv("ORCH_WORKSPACE", str(tmp_path / "elsewhere"))
    task_id = Registry().create_task("from the environment")
    assert (tmp_path / "elsewhere" / task_id / TASK_FILE).is_file()


def test_an_agent_leaving_a_status_the_registry_does_not_know_is_counted_once_active(reg: Registry,
                                                                                      task: str) -> None:
    agent = reg.deploy(task, "odd")
    path = reg.base / task / TASK_FILE
    doc = json.loads(path.read_bytes())
    doc["agents"][0]["status"] = "pending"  # hand-edited by someone
    doc["active_count"] = 0
    path.write_text(json.dumps(doc))
    reg.update(task, agent["id"], progress=10)
    assert reg.read_task(task)["active_count"] == 0
    reg.update(task, agent["id"], "working")
    assert reg.read_task(task)["active_count"] == 1
    assert task_violations(reg.read_task(task)) == []


def test_a_kill_whose_write_fails_after_the_session_died_says_it_may_be_applied(
        reg: Registry, task: str, tmux: TmuxSessions, no_crash_hook: None) -> None:
    agent = reg.deploy(task, "doomed")

    def disk_full(point: str, path: Path) -> None:
        if point == "before_temp_write" and path.name == TASK_FILE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    set_crash_hook(disk_full)
    with pytest.raises(WriteFailed) as raised:
        reg.kill(task, agent["id"])
    set_crash_hook(None)
    assert raised.value.applied is None, "the session is gone: the kill is not 'certainly not applied'"
    assert "zombie" in str(raised.value)
    assert agent["tmux_session"] not in tmux.alive()
    assert agent_of(reg, task, agent["id"])["status"] == "running"
    assert reg.reconcile(task) == [agent["id"]]
    assert_consistent(reg)
