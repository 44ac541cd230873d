"""The fixture registries of correct_registries.py and buggy_registries.py do what their docstrings say.

Sequential, in one process, on real files and the test's private tmux server.  The concurrency bugs are shown by
forcing the interleaving that exposes them (holding a lock, or running a step between two of the registry's).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import buggy_registries as buggy
import correct_registries as correct
import multiprocess  # type: ignore[import-untyped]
import pytest
from correct_registries import kill_session, live_sessions, locked

from pytest_orch.adapter import Rejected
from pytest_orch.spec import Rules, rules_of, spec_of

BIG = {"max_agents": 20, "max_concurrent": 20, "max_depth": 3}


@pytest.fixture
def ws(base: Path, tmux: Any) -> Path:
    """A workspace, with the test's private tmux server running the quiet agent command."""
    return base


def agent_of(reg: Any, task: str, agent_id: str) -> dict[str, Any]:
    doc = reg.read_task(task)
    return next(a for a in doc["agents"] if a["id"] == agent_id)


def status(reg: Any, task: str, agent_id: str) -> str:
    return str(agent_of(reg, task, agent_id)["status"])


def no_violations(reg: Any, task: str) -> None:
    """The harness's own invariants hold on the document, under the rules the adapter declares."""
    assert spec_of(reg).task_violations(task, reg.read_task(task)) == []


def in_background(fn: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    time.sleep(0.3)  # long enough for fn to get as far as a lock it waits on
    return thread


# -- the rules each adapter declares ----------------------------------------------------------------------------------

DECLARED = {
    "plain": Rules(),
    "idempotent_kill": Rules(kill_of_terminal="ignored"),
    "reap_running_to_completed": Rules(reaped=frozenset({"running"}), reaped_to="completed"),
    "terminal_not_final": Rules(terminal_is_final=False),
    "no_max_depth": Rules(),
    "with_global": Rules(),
}


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_declared_rules(name: str, ws: Path) -> None:
    assert rules_of(getattr(correct, name)(ws)) == DECLARED[name]
    lost = getattr(buggy, f"{name}_lost_write", None)
    if lost is not None:
        assert rules_of(lost(ws)) == DECLARED[name]


@pytest.mark.parametrize("name", ["idempotent_kill", "reap_running_to_completed", "terminal_not_final"])
def test_undeclared_twins_declare_nothing(name: str, ws: Path) -> None:
    adapter = getattr(correct, f"{name}_undeclared")(ws)
    assert not hasattr(adapter, "rules")
    assert not hasattr(adapter, "promises")
    assert rules_of(adapter) == Rules()


def test_promises(ws: Path) -> None:
    assert correct.no_max_depth(ws).promises == frozenset({"unique_type", "max_agents", "max_concurrent"})
    assert correct.projects(ws).promises == frozenset()
    assert not hasattr(correct.plain(ws), "promises")


# -- the task registries: what every variant shares -------------------------------------------------------------------

def test_plain_documents(ws: Path) -> None:
    reg = correct.plain(ws)
    task = reg.create_task("t", **BIG)
    a = reg.deploy(task, "builder")
    b = reg.deploy(task, "tester", parent=a)
    reg.update(task, b, "completed", 100)
    doc = reg.read_task(task)
    assert doc["task_id"] == task
    assert doc["max_agents"] == 20
    assert [x["id"] for x in doc["agents"]] == [a, b]
    assert agent_of(reg, task, a) == {"id": a, "type": "builder", "parent": "orchestrator", "depth": 1,
                                      "status": "running", "progress": 0, "tmux_session": f"agent_{a}"}
    assert agent_of(reg, task, b)["depth"] == 2
    assert agent_of(reg, task, b)["progress"] == 100
    assert doc["agent_hierarchy"] == {"orchestrator": [a], a: [b]}
    assert (doc["total_spawned"], doc["active_count"], doc["completed_count"]) == (2, 1, 1)
    assert {f"agent_{a}", f"agent_{b}"} <= live_sessions()  # an update to completed leaves the session alone
    assert reg.read_global() is None
    assert not (ws / "registry").exists()
    no_violations(reg, task)
    for path in ws.rglob("*.tmp"):
        pytest.fail(f"a temp file was left behind: {path}")


@pytest.mark.parametrize("name", ["plain", "idempotent_kill", "reap_running_to_completed", "terminal_not_final"])
def test_deploy_refusals(name: str, ws: Path) -> None:
    reg = getattr(correct, name)(ws)
    task = reg.create_task("t", max_agents=4, max_concurrent=2, max_depth=2)
    a = reg.deploy(task, "builder")
    before = live_sessions()
    with pytest.raises(Rejected):
        reg.deploy(task, "builder")  # a builder is active
    with pytest.raises(Rejected):
        reg.deploy(task, "tester", parent="nobody-123")
    b = reg.deploy(task, "tester", parent=a)
    with pytest.raises(Rejected):
        reg.deploy(task, "fixer")  # max_concurrent 2
    reg.kill(task, b)
    with pytest.raises(Rejected):
        reg.deploy(task, "fixer", parent=b)  # depth 3 > max_depth 2 (a terminal parent is still a parent)
    reg.deploy(task, "tester")  # the tester before it is terminated: no longer a duplicate
    reg.kill(task, a)
    reg.deploy(task, "builder")
    with pytest.raises(Rejected):
        reg.deploy(task, "fixer")  # max_agents 4: terminated agents count
    assert len(reg.read_task(task)["agents"]) == 4
    assert live_sessions() - before == {f"agent_{x['id']}" for x in reg.read_task(task)["agents"][2:]}
    no_violations(reg, task)


@pytest.mark.parametrize("name", ["plain", "idempotent_kill", "reap_running_to_completed", "terminal_not_final"])
def test_update_and_kill_refusals(name: str, ws: Path) -> None:
    reg = getattr(correct, name)(ws)
    task = reg.create_task("t", **BIG)
    a = reg.deploy(task, "builder")
    with pytest.raises(Rejected):
        reg.update(task, a, "paused", 5)
    with pytest.raises(Rejected):
        reg.update(task, "ghost-000000", "working", 5)
    with pytest.raises(Rejected):
        reg.kill(task, "ghost-000000")
    with pytest.raises(Rejected):
        reg.deploy("task-nothere", "builder")
    for s in ("working", "blocked", "running"):
        reg.update(task, a, s, 7)
        assert status(reg, task, a) == s
    reg.kill(task, a)
    assert status(reg, task, a) == "terminated"
    assert f"agent_{a}" not in live_sessions()
    no_violations(reg, task)


def test_plain_terminal_is_final_and_kill_refused(ws: Path) -> None:
    reg = correct.plain(ws)
    task = reg.create_task("t", **BIG)
    a = reg.deploy(task, "builder")
    reg.update(task, a, "failed", 3)
    for s in ("running", "completed"):
        with pytest.raises(Rejected):
            reg.update(task, a, s, 4)
    with pytest.raises(Rejected):
        reg.kill(task, a)
    assert agent_of(reg, task, a)["status"] == "failed"
    assert agent_of(reg, task, a)["progress"] == 3


def test_plain_reconcile_reaps_every_active_status_to_terminated(ws: Path) -> None:
    reg = correct.plain(ws)
    task = reg.create_task("t", **BIG)
    other = reg.create_task("other", **BIG)
    agents = {s: reg.deploy(task, s) for s in ("running", "working", "blocked", "completed", "alive")}
    elsewhere = reg.deploy(other, "builder")
    for s, agent_id in agents.items():
        if s in ("working", "blocked", "completed"):
            reg.update(task, agent_id, s, 1)
        if s != "alive":
            kill_session(f"agent_{agent_id}")
    kill_session(f"agent_{elsewhere}")
    reg.reconcile(task)
    assert {s: status(reg, task, x) for s, x in agents.items()} == {
        "running": "terminated", "working": "terminated", "blocked": "terminated", "completed": "completed",
        "alive": "running"}
    assert status(reg, other, elsewhere) == "running"  # reconcile is per task
    no_violations(reg, task)


def test_reconcile_with_no_tmux_server(ws: Path) -> None:
    reg = correct.plain(ws)
    task = reg.create_task("t", **BIG)
    a = reg.deploy(task, "builder")
    correct.tmux("kill-server")
    deadline = time.monotonic() + 5
    while correct.tmux("list-sessions").returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    reg.reconcile(task)
    assert status(reg, task, a) == "terminated"


# -- the variants -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory", [correct.idempotent_kill, correct.idempotent_kill_undeclared])
def test_idempotent_kill(factory: Callable[[Path], Any], ws: Path) -> None:
    reg = factory(ws)
    task = reg.create_task("t", **BIG)
    a = reg.deploy(task, "builder")
    b = reg.deploy(task, "tester")
    reg.kill(task, a)
    doc = reg.read_task(task)
    reg.kill(task, a)  # ok twice...
    assert reg.read_task(task) == doc  # ...and the second changes nothing
    reg.update(task, b, "completed", 100)
    reg.kill(task, b)  # a completed agent stays completed, its session untouched
    assert status(reg, task, b) == "completed"
    assert f"agent_{b}" in live_sessions()
    with pytest.raises(Rejected):
        reg.update(task, a, "running", 0)  # terminal is still final
    no_violations(reg, task)


@pytest.mark.parametrize("factory", [correct.reap_running_to_completed, correct.reap_running_to_completed_undeclared])
def test_reap_running_to_completed(factory: Callable[[Path], Any], ws: Path) -> None:
    reg = factory(ws)
    task = reg.create_task("t", **BIG)
    agents = {s: reg.deploy(task, s) for s in ("running", "working", "blocked", "alive")}
    for s, agent_id in agents.items():
        if s in ("working", "blocked"):
            reg.update(task, agent_id, s, 1)
        if s != "alive":
            kill_session(f"agent_{agent_id}")
    reg.reconcile(task)
    assert {s: status(reg, task, x) for s, x in agents.items()} == {
        "running": "completed", "working": "working", "blocked": "blocked", "alive": "running"}
    doc = reg.read_task(task)
    assert (doc["active_count"], doc["completed_count"]) == (3, 1)
    reg.kill(task, agents["working"])  # a kill still terminates
    assert status(reg, task, agents["working"]) == "terminated"
    no_violations(reg, task)


@pytest.mark.parametrize("factory", [correct.terminal_not_final, correct.terminal_not_final_undeclared])
def test_terminal_not_final(factory: Callable[[Path], Any], ws: Path) -> None:
    reg = factory(ws)
    task = reg.create_task("t", **BIG)
    a = reg.deploy(task, "builder")
    reg.kill(task, a)
    reg.update(task, a, "working", 50)  # a terminated agent comes back
    assert agent_of(reg, task, a)["status"] == "working"
    assert agent_of(reg, task, a)["progress"] == 50
    reg.update(task, a, "completed", 100)
    reg.update(task, a, "error", 100)
    doc = reg.read_task(task)
    assert (doc["active_count"], doc["completed_count"]) == (0, 0)
    with pytest.raises(Rejected):
        reg.kill(task, a)  # a kill of a terminal agent is still refused
    with pytest.raises(Rejected):
        reg.update(task, a, "paused", 1)
    no_violations(reg, task)


def test_no_max_depth(ws: Path) -> None:
    reg = correct.no_max_depth(ws)
    task = reg.create_task("t", max_agents=5, max_concurrent=5, max_depth=1)
    parent = "orchestrator"
    for i in range(4):
        parent = reg.deploy(task, f"t{i}", parent=parent)
    assert agent_of(reg, task, parent)["depth"] == 4
    with pytest.raises(Rejected):
        reg.deploy(task, "t0")  # the promised rules still hold
    no_violations(reg, task)


def test_with_global(ws: Path) -> None:
    reg = correct.with_global(ws)
    t1 = reg.create_task("t1", **BIG)
    t2 = reg.create_task("t2", **BIG)
    a = reg.deploy(t1, "builder")
    b = reg.deploy(t1, "tester", parent=a)
    c = reg.deploy(t2, "builder")
    reg.update(t1, b, "completed", 100)
    reg.kill(t2, c)
    kill_session(f"agent_{a}")
    reg.reconcile(t1)
    glob = reg.read_global()
    assert glob is not None
    assert glob == json.loads((ws / "registry" / "GLOBAL_REGISTRY.json").read_text())
    assert glob["tasks"] == {t1: {"status": "active"}, t2: {"status": "active"}}
    assert glob["agents"] == {a: {"task_id": t1, "type": "builder", "parent": "orchestrator", "status": "terminated"},
                              b: {"task_id": t1, "type": "tester", "parent": a, "status": "completed"},
                              c: {"task_id": t2, "type": "builder", "parent": "orchestrator", "status": "terminated"}}
    assert (glob["total_tasks"], glob["total_agents_spawned"], glob["active_agents"]) == (2, 3, 0)
    tasks = {t: reg.read_task(t) for t in (t1, t2)}
    assert spec_of(reg).global_violations(glob, tasks) == []


# -- issue 17's projects ----------------------------------------------------------------------------------------------

def test_projects_rules_construct() -> None:
    rules = correct.Projects.rules
    assert rules.update_statuses == {"completed", "abandoned"}
    assert rules.commanded == {"completed", "abandoned", "active", "deleted"}


def test_projects(ws: Path) -> None:
    reg = correct.projects(ws)
    p1 = reg.create_task("p1", **BIG)
    p2 = reg.create_task("p2", max_agents=1, max_concurrent=1, max_depth=1)
    assert list(ws.iterdir()) == []  # a project is only a name
    a = reg.deploy(p1, "builder")
    with pytest.raises(Rejected):
        reg.deploy(p1, "tester", parent=a)
    b = reg.deploy(p1, "builder")  # no deduplication...
    c = reg.deploy(p2, "builder")
    d = reg.deploy(p2, "tester")  # ...and no limits
    stored = agent_of(reg, p1, a)
    assert set(stored) == {"id", "project", "type", "status", "session", "created_at"}
    assert (stored["project"], stored["status"], stored["session"]) == (p1, "active", f"{p1}_{a}")
    assert {x["session"] for p in (p1, p2) for x in reg.read_task(p)["agents"]} <= live_sessions()
    assert [x["id"] for x in reg.read_task(p1)["agents"]] == [a, b]
    assert [x["id"] for x in reg.read_task(p2)["agents"]] == [c, d]
    assert reg.read_task("proj-none") == {"agents": []}
    assert reg.read_global() is None

    for s in ("completed", "abandoned", "completed", "abandoned"):  # in any status, even the same
        reg.update(p1, a, s, 42)
        assert agent_of(reg, p1, a) == {**stored, "status": s}  # progress ignored
    for s in ("active", "deleted", "running", "terminated"):
        with pytest.raises(Rejected):
            reg.update(p1, b, s, 0)
    with pytest.raises(Rejected):
        reg.update(p2, a, "completed", 0)  # a is p1's

    reg.kill(p1, a)  # of an abandoned agent: applied
    assert status(reg, p1, a) == "deleted"
    assert f"{p1}_{a}" not in live_sessions()
    with pytest.raises(Rejected):
        reg.kill(p1, a)  # a deleted agent is unknown
    with pytest.raises(Rejected):
        reg.update(p1, a, "completed", 0)
    reg.kill(p1, b)
    assert status(reg, p1, b) == "deleted"
    assert len(reg.read_task(p1)["agents"]) == 2  # tombstones are kept
    spec = spec_of(reg)
    assert spec.visible(reg.read_task(p1)["agents"]) == []
    for p in (p1, p2):
        no_violations(reg, p)


def test_projects_one_reconcile_reaps_every_project(ws: Path) -> None:
    reg = correct.projects(ws)
    p1, p2 = reg.create_task("p1", **BIG), reg.create_task("p2", **BIG)
    gone1, alive, done = reg.deploy(p1, "a"), reg.deploy(p1, "b"), reg.deploy(p1, "c")
    gone2, quit_ = reg.deploy(p2, "a"), reg.deploy(p2, "b")
    reg.update(p1, done, "completed", 0)
    reg.update(p2, quit_, "abandoned", 0)
    for p, x in ((p1, gone1), (p1, done), (p2, gone2), (p2, quit_)):
        kill_session(agent_of(reg, p, x)["session"])
    reg.reconcile(p1)
    assert [status(reg, p1, x) for x in (gone1, alive, done)] == ["completed", "active", "completed"]
    assert [status(reg, p2, x) for x in (gone2, quit_)] == ["completed", "abandoned"]


# -- the buggy twins: correct in sequence, wrong under the interleaving that exposes each bug -------------------------

def _race_update(reg: Any, path: Path, task: str, mine: str, theirs: str, to: str) -> str:
    """Update *mine* while the test holds the lock and sets *theirs* to *to* meanwhile; *theirs*' status after."""
    with locked(path):
        thread = in_background(lambda: reg.update(task, mine, "completed", 90))
        doc = json.loads(path.read_text())
        next(a for a in doc["agents"] if a["id"] == theirs)["status"] = to
        correct.write_json(path, doc)
    thread.join(10)
    assert not thread.is_alive()
    assert status(reg, task, mine) == "completed"
    return status(reg, task, theirs)


@pytest.mark.parametrize("name", ["idempotent_kill", "reap_running_to_completed", "terminal_not_final"])
def test_lost_write_twins(name: str, ws: Path) -> None:
    good, bad = getattr(correct, name)(ws / "good"), getattr(buggy, f"{name}_lost_write")(ws / "bad")
    for reg, want in ((good, "blocked"), (bad, "running")):
        task = reg.create_task("t", **BIG)
        mine, theirs = reg.deploy(task, "mine"), reg.deploy(task, "theirs")
        path = reg.workspace / task / "AGENT_REGISTRY.json"
        assert _race_update(reg, path, task, mine, theirs, "blocked") == want  # the buggy one wrote back a stale read


def test_projects_lost_write(ws: Path) -> None:
    good, bad = correct.projects(ws / "good"), buggy.projects_lost_write(ws / "bad")
    for reg, want in ((good, "abandoned"), (bad, "active")):
        task = reg.create_task("t", **BIG)
        mine, theirs = reg.deploy(task, "mine"), reg.deploy(task, "theirs")
        assert _race_update(reg, reg.path, task, mine, theirs, "abandoned") == want


def test_projects_flush_after_unlock(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = buggy.projects_flush_after_unlock(ws)
    task = reg.create_task("t", **BIG)
    a = reg.deploy(task, "builder")
    seen: list[str] = []
    real_locked = correct.locked  # what buggy_registries imported

    @contextlib.contextmanager
    def then_read(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[None]:
        with real_locked(path, mode):
            yield
        try:  # a reader that takes the lock just after the writer released it
            seen.append(f"read {len(reg.read_task(task)['agents'])} agents")
        except json.JSONDecodeError as exc:
            seen.append(f"torn: {exc}")

    monkeypatch.setattr(buggy, "locked", then_read)
    reg.update(task, a, "completed", 0)
    assert [s[:5] for s in seen] == ["torn:"], seen
    monkeypatch.undo()
    assert status(reg, task, a) == "completed"  # once closed, the file is whole
    assert list(ws.glob("*.tmp")) == []


def test_reconcile_always_raises(ws: Path) -> None:
    reg = buggy.reconcile_always_raises(ws)
    task = reg.create_task("t", **BIG)
    a = reg.deploy(task, "builder")
    kill_session(f"agent_{a}")
    for _ in range(2):
        with pytest.raises(RuntimeError):
            reg.reconcile(task)
    assert status(reg, task, a) == "running"
    assert rules_of(reg) == Rules()


def test_deploy_crashes_sometimes_only_in_swarm_workers(ws: Path, tmp_path: Path) -> None:
    reg = buggy.deploy_crashes_sometimes(ws)
    task = reg.create_task("t", max_agents=50, max_concurrent=50, max_depth=1)
    for i in range(10):
        reg.deploy(task, f"main{i}")  # never in the test process
    out = tmp_path / "worker.json"

    def worker() -> None:
        mine = buggy.deploy_crashes_sometimes(ws)
        outcomes = []
        for i in range(30):
            try:
                outcomes.append(mine.deploy(task, f"w{i}"))
            except json.JSONDecodeError:
                outcomes.append("crash")
        out.write_text(json.dumps(outcomes))

    process = multiprocess.get_context("fork").Process(target=worker, name="orch-worker-0")
    process.start()
    process.join(30)
    assert process.exitcode == 0
    outcomes = json.loads(out.read_text())
    crashes = outcomes.count("crash")
    assert 1 <= crashes <= 22, outcomes  # about a third of 30 (fails by chance about once in 10**5)
    ids = [x for x in outcomes if x != "crash"]
    doc = reg.read_task(task)
    assert len(doc["agents"]) == 10 + len(ids)  # a crash wrote nothing...
    assert {a["id"] for a in doc["agents"][10:]} == set(ids)
    assert len(live_sessions()) == 10 + len(ids)  # ...and started no session


def test_leaks_session_on_refusal(ws: Path) -> None:
    good, bad = correct.plain(ws / "good"), buggy.leaks_session_on_refusal(ws / "bad")
    for reg, leaked in ((good, 0), (bad, 2)):
        task = reg.create_task("t", max_agents=2, max_concurrent=2, max_depth=1)
        a = reg.deploy(task, "builder")
        before = live_sessions()
        for args in (("builder",), ("tester", a)):  # a duplicate, then too deep
            with pytest.raises(Rejected):
                reg.deploy(task, *args)
        assert len(live_sessions() - before) == leaked
        assert len(reg.read_task(task)["agents"]) == 1
        no_violations(reg, task)


def test_reconcile_lists_before_lock(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = buggy.reconcile_lists_before_lock(ws)
    task = reg.create_task("t", **BIG)
    a = reg.deploy(task, "builder")
    late: list[str] = []

    def listed_then_deployed() -> set[str]:
        live = live_sessions()
        late.append(buggy.reconcile_lists_before_lock(ws).deploy(task, "tester"))  # between the list and the lock
        return live

    monkeypatch.setattr(buggy, "live_sessions", listed_then_deployed)
    reg.reconcile(task)
    assert status(reg, task, a) == "running"
    assert status(reg, task, late[0]) == "terminated"  # reaped, with its session alive
    assert f"agent_{late[0]}" in live_sessions()


def test_global_lock_dropped(ws: Path) -> None:
    good, bad = correct.with_global(ws / "good"), buggy.global_lock_dropped(ws / "bad")
    for reg, waits in ((good, True), (bad, False)):
        task = reg.create_task("t", **BIG)
        a = reg.deploy(task, "builder")
        with locked(reg.workspace / "registry" / "GLOBAL_REGISTRY.json"):
            thread = in_background(functools.partial(reg.update, task, a, "working", 5))
            assert thread.is_alive() == waits  # the buggy one changed the global file under our lock
        thread.join(10)
        glob = reg.read_global()
        assert glob is not None
        assert glob["agents"][a]["status"] == "working"
        assert spec_of(reg).global_violations(glob, {task: reg.read_task(task)}) == []
