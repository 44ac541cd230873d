"""check() finds every kind of problem; repair() backs up first and mends what it may."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers_registry import fake_tmux, snapshot, tmux_cli

from registry import (
    HealthReport,
    LockTimeout,
    Registry,
    TmuxSessions,
    check,
    global_violations,
    repair,
    task_violations,
)
from registry.model import GLOBAL_DIR, GLOBAL_FILE, TASK_FILE


@pytest.fixture
def workspace(reg: Registry) -> dict[str, Any]:
    """Two tasks: one with a lead and its helper, one finished agent and one running; all healthy."""
    one = reg.create_task("first")
    two = reg.create_task("second")
    lead = reg.deploy(one, "lead")
    helper = reg.deploy(one, "helper", parent=lead["id"])
    done = reg.deploy(two, "done")
    reg.update(two, done["id"], "completed")
    tmux_cli("kill-session", "-t", done["tmux_session"])
    runner = reg.deploy(two, "runner")
    return {"one": one, "two": two, "lead": lead, "helper": helper, "done": done, "runner": runner}


def edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_bytes())
    change(doc)
    path.write_text(json.dumps(doc, indent=2))


def task_path(reg: Registry, task_id: str) -> Path:
    return reg.base / task_id / TASK_FILE


def global_path(reg: Registry) -> Path:
    return reg.base / GLOBAL_DIR / GLOBAL_FILE


def kinds(report: HealthReport) -> list[str]:
    return sorted(f.kind for f in report.findings)


def assert_consistent(base: Path) -> None:
    reg = Registry(base, heal=False)
    tasks = {t: reg.read_task(t) for t in reg.task_ids()}
    assert [str(v) for t in tasks.values() for v in task_violations(t)] == []
    assert [str(v) for v in global_violations(reg.read_global(), tasks)] == []


# --------------------------------------------------------------------------------------------------------------------
# check


def test_a_healthy_workspace_checks_healthy(reg: Registry, workspace: dict[str, Any]) -> None:
    report = check(reg.base)
    assert report.healthy, report.render()
    assert (report.tasks, report.agents, report.active, report.sessions) == (2, 4, 3, 3)
    assert "healthy" in report.render()
    assert report.to_json()["healthy"] is True


def test_check_finds_counter_drift(reg: Registry, workspace: dict[str, Any]) -> None:
    edit(task_path(reg, workspace["one"]), lambda d: d.update(active_count=7))
    report = check(reg.base)
    assert kinds(report) == ["count_drift"]
    assert "active_count is 7" in report.render()


def test_check_finds_duplicate_ids(reg: Registry, workspace: dict[str, Any]) -> None:
    edit(task_path(reg, workspace["two"]), lambda d: d["agents"].append(dict(d["agents"][0])))
    assert "duplicate_id" in kinds(check(reg.base))


def test_check_finds_a_broken_hierarchy_and_a_wrong_depth(reg: Registry, workspace: dict[str, Any]) -> None:
    def break_it(doc: dict[str, Any]) -> None:
        doc["agents"][1]["depth"] = 4
        doc["agent_hierarchy"] = {"orchestrator": [a["id"] for a in doc["agents"]]}

    edit(task_path(reg, workspace["one"]), break_it)
    assert kinds(check(reg.base)) == ["broken_hierarchy", "wrong_depth"]


@pytest.mark.parametrize(("limit", "value", "kind"), [("max_concurrent", 1, "max_concurrent"),
                                                       ("max_agents", 1, "max_agents"),
                                                       ("max_depth", 1, "max_depth")])
def test_check_finds_limit_breaches(reg: Registry, workspace: dict[str, Any], limit: str, value: int,
                                    kind: str) -> None:
    edit(task_path(reg, workspace["one"]), lambda d: d.update({limit: value}))
    assert kinds(check(reg.base)) == [kind]


def test_check_finds_the_global_registry_disagreeing_with_a_task(reg: Registry, workspace: dict[str, Any]) -> None:
    def diverge(doc: dict[str, Any]) -> None:
        doc["agents"][workspace["runner"]["id"]]["status"] = "completed"
        doc["agents"]["ghost-000000-000000"] = {"task_id": workspace["two"], "type": "ghost", "status": "running"}

    edit(global_path(reg), diverge)
    report = check(reg.base)
    assert kinds(report) == ["global_divergence", "global_divergence"]
    assert "ghost-000000-000000" in report.render()


def test_check_finds_zombies(reg: Registry, workspace: dict[str, Any]) -> None:
    tmux_cli("kill-session", "-t", workspace["helper"]["tmux_session"])
    report = check(reg.base)
    assert kinds(report) == ["zombie"]
    assert report.zombies == [workspace["helper"]["id"]]


def test_check_finds_leaked_sessions_but_not_other_sessions(reg: Registry, workspace: dict[str, Any],
                                                           tmux: TmuxSessions) -> None:
    tmux.start("agent_started-outside-000000", "sleep 60")
    tmux.start("editor", "sleep 60")
    reg.update(workspace["one"], workspace["helper"]["id"], "failed")  # its session lives on: a leak too
    report = check(reg.base)
    assert kinds(report) == ["leak", "leak"]
    assert report.leaks == sorted(["agent_started-outside-000000", workspace["helper"]["tmux_session"]])


@pytest.mark.parametrize("which", ["task", "global"])
def test_check_finds_corrupt_files_and_says_how_to_restore(reg: Registry, workspace: dict[str, Any],
                                                           which: str) -> None:
    path = task_path(reg, workspace["one"]) if which == "task" else global_path(reg)
    path.write_bytes(path.read_bytes()[:100])
    report = check(reg.base)
    corrupt = report.of_kind("corrupt")
    assert len(corrupt) == 1
    assert corrupt[0].path == str(path)
    assert "line" in corrupt[0].message
    assert "repair --restore" in corrupt[0].message


def test_check_finds_a_missing_global_registry(reg: Registry, workspace: dict[str, Any]) -> None:
    global_path(reg).unlink()
    assert kinds(check(reg.base)) == ["missing"]


def test_check_finds_a_task_registry_that_the_global_registry_lists_but_is_gone(
        reg: Registry, workspace: dict[str, Any]) -> None:
    for agent in reg.read_task(workspace["one"])["agents"]:
        tmux_cli("kill-session", "-t", agent["tmux_session"])
    task_path(reg, workspace["one"]).unlink()
    report = check(reg.base)
    assert "missing" in kinds(report)
    assert any(f.task_id == workspace["one"] for f in report.of_kind("missing"))


def test_check_says_when_tmux_cannot_be_asked(reg: Registry, workspace: dict[str, Any], tmp_path: Path) -> None:
    blind = TmuxSessions(tmux_bin=fake_tmux(tmp_path, stderr="lost", code=1))
    report = check(reg.base, sessions=blind)
    assert kinds(report) == ["tmux_unreachable"]
    assert report.sessions is None
    assert "tmux unreachable" in report.render()


def test_check_never_writes(reg: Registry, workspace: dict[str, Any]) -> None:
    tmux_cli("kill-session", "-t", workspace["lead"]["tmux_session"])
    edit(task_path(reg, workspace["two"]), lambda d: d.update(total_spawned=0))
    before = snapshot(reg.base)
    assert not check(reg.base).healthy
    assert snapshot(reg.base) == before


# --------------------------------------------------------------------------------------------------------------------
# repair


def break_everything(reg: Registry, workspace: dict[str, Any], tmux: TmuxSessions) -> None:
    tmux_cli("kill-session", "-t", workspace["helper"]["tmux_session"])  # a zombie
    edit(task_path(reg, workspace["two"]), lambda d: d.update(active_count=5, completed_count=0))  # drift
    edit(global_path(reg), lambda d: d["agents"].pop(workspace["runner"]["id"]))  # divergence
    tmux.start("agent_leaked-000000-000000", "sleep 60")  # a leak


def test_a_dry_run_repair_says_what_it_would_do_and_writes_nothing(reg: Registry, workspace: dict[str, Any],
                                                                  tmux: TmuxSessions) -> None:
    break_everything(reg, workspace, tmux)
    before = snapshot(reg.base)
    report = repair(reg.base, dry_run=True, kill_leaks=True)
    assert snapshot(reg.base) == before
    assert report.dry_run
    assert report.backup_dir is None
    text = report.render()
    assert f"would do: {workspace['one']}: marked zombie {workspace['helper']['id']}" in text
    assert "active_count 5 -> 1" in text
    assert "killed leaked session agent_leaked-000000-000000" in text
    assert "agent_leaked-000000-000000" in tmux.alive()


def test_a_dry_run_repair_creates_nothing_not_even_a_lock_file_so_it_works_read_only(
        samples: Path, tmux: TmuxSessions) -> None:
    before = snapshot(samples)
    for path in samples.rglob("*"):
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        report = repair(samples, dry_run=True)
    finally:
        for path in samples.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert any("jsonl_architecture_planner-215640-c3f469" in a for a in report.actions)
    assert snapshot(samples) == before


def test_repair_backs_up_every_file_first_then_mends_everything(reg: Registry, workspace: dict[str, Any],
                                                                tmux: TmuxSessions) -> None:
    break_everything(reg, workspace, tmux)
    files = {p: p.read_bytes() for p in reg.base.rglob("*.json")}
    report = repair(reg.base, dry_run=False, kill_leaks=True)
    assert report.backup_dir is not None
    backup = Path(report.backup_dir)
    assert {backup / p.relative_to(reg.base): data for p, data in files.items()} == {
        p: p.read_bytes() for p in backup.rglob("*.json")}
    assert report.refused == ()
    helper = next(a for a in reg.read_task(workspace["one"])["agents"] if a["id"] == workspace["helper"]["id"])
    assert (helper["status"], helper["termination_reason"]) == ("terminated", "session_not_found")
    two = reg.read_task(workspace["two"])
    assert (two["active_count"], two["completed_count"]) == (1, 1)
    assert reg.read_global()["agents"][workspace["runner"]["id"]]["status"] == "running"
    assert "agent_leaked-000000-000000" not in tmux.alive()
    assert workspace["runner"]["tmux_session"] in tmux.alive()
    after = check(reg.base)
    assert after.healthy, after.render()


def test_repair_leaves_leaked_sessions_running_unless_asked(reg: Registry, workspace: dict[str, Any],
                                                           tmux: TmuxSessions) -> None:
    tmux.start("agent_leaked-000000-000000", "sleep 60")
    report = repair(reg.base, dry_run=False)
    assert "agent_leaked-000000-000000" in tmux.alive()
    assert any("--kill-leaks" in r for r in report.refused)
    assert check(reg.base).leaks == ["agent_leaked-000000-000000"]


def test_repair_rebuilds_a_missing_global_registry_from_the_tasks(reg: Registry, workspace: dict[str, Any]) -> None:
    global_path(reg).unlink()
    report = repair(reg.base, dry_run=False)
    assert any("rebuilt" in a for a in report.actions)
    assert_consistent(reg.base)
    assert check(reg.base).healthy


def test_repair_drops_global_entries_of_tasks_that_no_longer_exist(reg: Registry, workspace: dict[str, Any]) -> None:
    for agent in reg.read_task(workspace["one"])["agents"]:
        tmux_cli("kill-session", "-t", agent["tmux_session"])
    shutil.rmtree(reg.base / workspace["one"])
    repair(reg.base, dry_run=False)
    glob = reg.read_global()
    assert workspace["one"] not in glob["tasks"]
    assert workspace["lead"]["id"] not in glob["agents"]
    assert check(reg.base).healthy


def test_repair_refuses_a_corrupt_task_registry_unless_told_to_restore(reg: Registry,
                                                                       workspace: dict[str, Any]) -> None:
    path = task_path(reg, workspace["two"])
    bad = path.read_bytes()[:-30]
    path.write_bytes(bad)
    report = repair(reg.base, dry_run=False)
    assert any(str(path) in r and "--restore" in r for r in report.refused)
    assert path.read_bytes() == bad


def test_repair_with_restore_restores_a_corrupt_task_registry_from_its_backup(reg: Registry,
                                                                              workspace: dict[str, Any]) -> None:
    path = task_path(reg, workspace["two"])
    reg.update(workspace["two"], workspace["runner"]["id"], progress=10)  # the last committed change
    path.write_bytes(b"\0" * 100)
    report = repair(reg.base, dry_run=False, restore=True)
    assert any(a.startswith(f"restored {path} from its backup") for a in report.actions)
    assert reg.read_task(workspace["two"])["agents"][1]["progress"] == 10
    health = check(reg.base)
    assert health.healthy, health.render()


def test_repair_with_restore_rebuilds_a_task_registry_without_a_usable_backup(reg: Registry,
                                                                              workspace: dict[str, Any]) -> None:
    path = task_path(reg, workspace["one"])
    (path.parent / (path.name + ".bak")).unlink(missing_ok=True)
    path.write_bytes(b"{")
    report = repair(reg.base, dry_run=False, restore=True)
    assert any(a.startswith(f"rebuilt {path} from the global registry") for a in report.actions)
    doc = reg.read_task(workspace["one"])
    assert sorted(a["id"] for a in doc["agents"]) == sorted([workspace["lead"]["id"], workspace["helper"]["id"]])
    assert next(a for a in doc["agents"] if a["id"] == workspace["helper"]["id"])["depth"] == 2
    assert check(reg.base).healthy


def test_repair_with_restore_rebuilds_a_corrupt_global_registry(reg: Registry, workspace: dict[str, Any]) -> None:
    global_path(reg).write_bytes(b"[1, 2")
    refused = repair(reg.base, dry_run=False)
    assert any("--restore" in r for r in refused.refused)
    assert global_path(reg).read_bytes() == b"[1, 2"
    report = repair(reg.base, dry_run=False, restore=True)
    assert any(a.startswith("rebuilt") for a in report.actions)
    assert check(reg.base).healthy


def test_repair_times_out_rather_than_repair_under_a_held_lock(reg: Registry, workspace: dict[str, Any],
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers_registry import LockHolder

    import registry.store

    monkeypatch.setattr(registry.store, "DEFAULT_LOCK_TIMEOUT", 0.1)
    edit(task_path(reg, workspace["one"]), lambda d: d.update(active_count=9))
    before = snapshot(reg.base)
    with LockHolder(task_path(reg, workspace["one"]).with_name(TASK_FILE + ".lock"), tmp_path / "released"), \
            pytest.raises(LockTimeout):
        repair(reg.base, dry_run=False)
    assert snapshot(reg.base) == before


def test_repair_on_the_samples_reaps_the_one_zombie_and_keeps_every_other_key(samples: Path,
                                                                              tmux: TmuxSessions) -> None:
    before = {p: json.loads(p.read_bytes()) for p in samples.rglob("*.json")}
    report = repair(samples, dry_run=False)
    assert report.refused == ()
    assert [a for a in report.actions if "zombie" in a] == [
        "TASK-20251017-215604-df6a3cbd: marked zombie jsonl_architecture_planner-215640-c3f469 terminated"
        " (session_not_found)"]
    assert check(samples).healthy
    for path, doc in before.items():
        after = json.loads(path.read_bytes())
        assert set(after) == set(doc)
        if path.name == TASK_FILE:
            assert after["orchestration_guidance"] == doc["orchestration_guidance"]
            assert after["workspace"] == doc["workspace"]
