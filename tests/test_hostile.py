"""Hostile files and environments (issue 12): every break found by probing, as a test that failed before the fix.

Real files, real processes, real flock and a private tmux server.  Every operation that is refused leaves the
workspace's bytes as they were: :func:`digest` hashes every entry under the workspace (files, directories, links and
their targets) before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers_registry import LockHolder, run_in_child, tmux_cli

import registry.store
from registry import (
    CorruptRegistry,
    InvalidArgument,
    InvalidName,
    InvalidTransition,
    Registry,
    TmuxSessions,
    UnsafePath,
    check,
    repair,
)
from registry.cli import main as cli_main
from registry.groupcommit import queue_dir
from registry.locking import FlockLock, LockBusy
from registry.model import GLOBAL_DIR, GLOBAL_FILE, MAX_NAME, TASK_FILE
from registry.store import backup_path, set_crash_hook


def digest(root: Path) -> str:
    """A hash of everything under *root*: names, kinds, bytes, link targets."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        if path.is_symlink():
            h.update(b"L" + str(path.readlink()).encode())
        elif path.is_dir():
            h.update(b"D")
        elif path.is_file():
            h.update(b"F" + path.read_bytes())
        else:
            h.update(b"?")
    return h.hexdigest()


@pytest.fixture
def task(reg: Registry) -> str:
    return reg.create_task("hostile", max_agents=20, max_concurrent=10, max_depth=3)


@pytest.fixture
def agent(reg: Registry, task: str) -> dict[str, Any]:
    return reg.deploy(task, "target")


def task_path(reg: Registry, task: str) -> Path:
    return reg.base / task / TASK_FILE


def edit(path: Path, change: Any) -> None:
    doc = json.loads(path.read_bytes())
    change(doc)
    path.write_text(json.dumps(doc, indent=2))


def cli(*args: str | Path) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "registry.cli", *map(str, args)], capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    return proc.returncode, proc.stdout, proc.stderr


# --------------------------------------------------------------------------------------------------------------------
# 1. symlinks


def test_1_a_backup_that_is_a_symlink_never_gets_its_target_overwritten(reg: Registry, task: str,
                                                                        agent: dict[str, Any], tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    bak = backup_path(task_path(reg, task))
    bak.unlink()
    bak.symlink_to(victim)
    reg.update(task, agent["id"], progress=10)  # the registry itself is written; the backup is skipped
    assert victim.read_text() == "the user's file"
    assert bak.is_symlink()
    assert any(f.kind == "stray" and f.path == str(bak) for f in check(reg.base).findings)


@pytest.mark.parametrize("which", ["bak", "lock"])
def test_1_dangling_backup_and_lock_links_never_create_their_targets(reg: Registry, task: str, agent: dict[str, Any],
                                                                    tmp_path: Path, which: str) -> None:
    target = tmp_path / f"created-{which}"
    path = task_path(reg, task)
    link = backup_path(path) if which == "bak" else path.with_name(path.name + ".lock")
    link.unlink()
    link.symlink_to(target)
    before = digest(reg.base)
    if which == "lock":
        with pytest.raises(UnsafePath, match="symlink"):
            reg.update(task, agent["id"], progress=10)
        assert digest(reg.base) == before
    else:
        reg.update(task, agent["id"], progress=10)
    assert not target.exists()


def test_1_a_task_directory_that_is_a_symlink_is_refused_and_skipped(reg: Registry, task: str, agent: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    (reg.base / task).rename(elsewhere)
    (reg.base / task).symlink_to(elsewhere)
    before, outside = digest(reg.base), digest(elsewhere)
    for call in (lambda: reg.update(task, agent["id"], progress=10), lambda: reg.deploy(task, "other"),
                 lambda: reg.kill(task, agent["id"]), lambda: reg.reconcile(task), lambda: reg.read_task(task)):
        with pytest.raises(UnsafePath, match="symlink"):
            call()
    assert (digest(reg.base), digest(elsewhere)) == (before, outside)
    assert task not in reg.task_ids()
    assert any(f.kind == "stray" and f.path == str(reg.base / task) for f in check(reg.base).findings)


# --------------------------------------------------------------------------------------------------------------------
# 2. deep nesting


def _deep(path: Path, depth: int = 100_000) -> None:
    doc = json.loads(path.read_bytes())
    text = json.dumps(doc)
    path.write_text(text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}")


@pytest.mark.parametrize("which", ["task", "global"])
def test_2_a_file_nested_100000_deep_is_corrupt_everywhere_and_restored_from_its_backup(
        reg: Registry, task: str, agent: dict[str, Any], which: str) -> None:
    path = task_path(reg, task) if which == "task" else reg.base / GLOBAL_DIR / GLOBAL_FILE
    _deep(path)
    before = digest(reg.base)
    again = Registry(reg.base)  # opening heals what it can and never dies
    with pytest.raises(CorruptRegistry, match="nested"):
        again.update(task, agent["id"], "working", progress=10)
    assert digest(reg.base) == before
    for command in ("status", "check"):
        code, _out, err = cli(command, "--base", reg.base)
        assert "Traceback" not in err, err
        assert code == (1 if which == "task" or command == "check" else 0), err
    code, out, err = cli("repair", "--restore", "--base", reg.base)
    assert "Traceback" not in err, err
    assert json.loads(path.read_bytes()).get("deep") is None, out
    assert check(reg.base).healthy


# --------------------------------------------------------------------------------------------------------------------
# 3. wrong types


WRONG = {
    "status is a list": lambda doc: doc["agents"][0].update(status=["running"]),
    "counter is a string": lambda doc: doc.update(total_spawned="0"),
    "depth is a string": lambda doc: doc["agents"][0].update(depth="1"),
    "hierarchy holds an object": lambda doc: doc["agent_hierarchy"].update(orchestrator=[{}]),
    "parent is a list": lambda doc: doc["agents"][0].update(parent=[]),
}


@pytest.mark.parametrize("wrong", list(WRONG))
def test_3_a_wrong_typed_field_is_corrupt_in_every_tool_and_nothing_is_written(
        reg: Registry, task: str, agent: dict[str, Any], tmux: TmuxSessions, wrong: str) -> None:
    edit(task_path(reg, task), WRONG[wrong])
    before, sessions = digest(reg.base), tmux.alive()
    for call in (lambda: reg.update(task, agent["id"], progress=10), lambda: reg.deploy(task, "another"),
                 lambda: reg.kill(task, agent["id"]), lambda: reg.reconcile(task)):
        with pytest.raises(CorruptRegistry, match=str(task_path(reg, task))):
            call()
    assert digest(reg.base) == before
    assert tmux.alive() == sessions  # the refused deploy left no session behind
    report = check(reg.base)
    assert [f.kind for f in report.findings] == ["corrupt"]
    assert "refused" in json.dumps(repair(reg.base, dry_run=False).to_json())
    assert digest(reg.base) == before  # a repair that refuses and changes nothing writes nothing, not even a backup
    done = repair(reg.base, dry_run=False, restore=True)
    assert any("restored" in a for a in done.actions), done.render()
    assert check(reg.base).healthy


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_3_nan_and_infinity_are_refused_never_rewritten_as_null(reg: Registry, task: str, agent: dict[str, Any],
                                                                constant: str) -> None:
    path = task_path(reg, task)
    path.write_text(path.read_text().replace('"total_spawned": 1', f'"total_spawned": {constant}'))
    before = digest(reg.base)
    with pytest.raises(CorruptRegistry, match=constant.lstrip("-")):
        reg.update(task, agent["id"], progress=10)
    assert digest(reg.base) == before


def test_3_a_deploy_that_fails_after_starting_its_session_leaves_no_session(reg: Registry, task: str,
                                                                            tmux: TmuxSessions) -> None:
    def fail(point: str, path: Path) -> None:
        if point == "before_temp_write":
            raise RuntimeError("anything at all")

    before = tmux.alive()
    old = set_crash_hook(fail)
    try:
        with pytest.raises(RuntimeError):
            reg.deploy(task, "doomed")
    finally:
        set_crash_hook(old)
    assert tmux.alive() == before


# --------------------------------------------------------------------------------------------------------------------
# 4. duplicate keys


def test_4_a_rejected_update_of_a_file_with_duplicate_keys_rewrites_nothing(reg: Registry, task: str,
                                                                            agent: dict[str, Any]) -> None:
    path = task_path(reg, task)
    text = path.read_text()
    path.write_text(text[:-2] + ',\n  "agents": []\n}')  # a second "agents": a reader keeps only one
    before = digest(reg.base)
    with pytest.raises(CorruptRegistry, match="'agents' appears twice"):
        reg.update(task, agent["id"], progress=10)
    with pytest.raises(CorruptRegistry):
        reg.update(task, "no-such-agent", progress=10)
    assert digest(reg.base) == before
    assert check(reg.base).of_kind("corrupt")


def test_4_a_rejected_update_of_a_file_in_another_form_rewrites_nothing(reg: Registry, task: str,
                                                                       agent: dict[str, Any]) -> None:
    reg.update(task, agent["id"], "completed")
    path = task_path(reg, task)
    path.write_text(json.dumps(json.loads(path.read_bytes())))  # valid, but not the store's indented form
    before = digest(reg.base)
    with pytest.raises(InvalidTransition):
        reg.update(task, agent["id"], "working")  # refused in the batch: the agent is terminal
    assert digest(reg.base) == before


# --------------------------------------------------------------------------------------------------------------------
# 5. strays


def test_5_a_stray_file_where_the_queue_goes_blocks_no_write(reg: Registry, task: str, agent: dict[str, Any]) -> None:
    path = task_path(reg, task)
    queue_dir(path).write_text("stray")
    reg.update(task, agent["id"], progress=10)  # uncontended
    with LockHolder(path.with_name(path.name + ".lock"), reg.base / "released") as holder:
        holder.release_later(0.3)
        record = Registry(reg.base, lock_timeout=10).update(task, agent["id"], progress=20)  # contended: waits
    assert record["progress"] == 20
    assert queue_dir(path).read_text() == "stray"
    assert any(f.kind == "stray" and f.path == str(queue_dir(path)) for f in check(reg.base).findings)


def test_5_a_stray_directory_with_a_bad_name_stops_no_command(reg: Registry, task: str, agent: dict[str, Any],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    stray = reg.base / "bad name"
    stray.mkdir()
    (stray / TASK_FILE).write_text("{}")
    assert task in reg.task_ids()
    assert "bad name" not in reg.task_ids()
    assert cli_main(["status", "--base", str(reg.base)]) == 0
    assert cli_main(["check", "--base", str(reg.base)]) == 1
    assert "bad name" in capsys.readouterr().out
    assert cli_main(["repair", "--base", str(reg.base)]) == 1  # it cannot fix the stray, and says so
    assert (stray / TASK_FILE).read_text() == "{}"
    assert Registry(reg.base).update(task, agent["id"], progress=5)["progress"] == 5


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_5_a_lock_that_is_not_a_regular_file_is_a_clear_error_and_a_finding(reg: Registry, task: str,
                                                                            agent: dict[str, Any], kind: str) -> None:
    path = task_path(reg, task)
    lock = path.with_name(path.name + ".lock")
    lock.unlink()
    lock.mkdir() if kind == "directory" else os.mkfifo(lock)
    before = digest(reg.base)
    with pytest.raises(UnsafePath, match=f"{lock} is not a regular file"):
        reg.update(task, agent["id"], progress=10)
    assert digest(reg.base) == before
    report = check(reg.base)
    assert not report.healthy
    assert any(f.path == str(lock) for f in report.of_kind("stray"))
    done = repair(reg.base, dry_run=False)  # skips the task it cannot lock, names it, and goes on
    assert any(task in r for r in done.refused), done.render()


# --------------------------------------------------------------------------------------------------------------------
# 6. kill kills agent_<id> only


def test_6_kill_never_kills_a_session_named_by_the_file(reg: Registry, task: str, agent: dict[str, Any],
                                                        tmux: TmuxSessions) -> None:
    assert tmux_cli("new-session", "-d", "-s", "victim", "sleep 600").returncode == 0
    edit(task_path(reg, task), lambda doc: doc["agents"][0].update(tmux_session="victim"))
    reg.kill(task, agent["id"])
    assert "victim" in tmux.alive()
    assert agent["tmux_session"] not in tmux.alive()
    repair(reg.base, dry_run=False, kill_leaks=True)
    assert "victim" in tmux.alive()


# --------------------------------------------------------------------------------------------------------------------
# 7. a workspace path ending in ';'


def test_7_a_workspace_path_ending_in_a_semicolon_deploys(tmp_path: Path, tmux: TmuxSessions) -> None:
    base = tmp_path / "ws;"
    reg = Registry(base)
    task = reg.create_task("semicolon")
    agent = reg.deploy(task, "semi")
    assert agent["tmux_session"] in tmux.alive()
    shown = tmux_cli("show-environment", "-t", agent["tmux_session"], "ORCH_WORKSPACE").stdout.strip()
    assert shown == f"ORCH_WORKSPACE={base}"


# --------------------------------------------------------------------------------------------------------------------
# 8. ORCH_LOCK_TIMEOUT


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-1", "-inf"])
def test_8_a_bad_orch_lock_timeout_is_a_clear_error_at_use_not_at_import(reg: Registry, task: str,
                                                                         agent: dict[str, Any], value: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    code = subprocess.run([sys.executable, "-c", "import registry"], env={**os.environ, "ORCH_LOCK_TIMEOUT": value},
                          capture_output=True, text=True, check=False)
    assert code.returncode == 0, code.stderr
    monkeypatch.setenv("ORCH_LOCK_TIMEOUT", value)
    before = digest(reg.base)
    with pytest.raises(InvalidArgument, match=r"ORCH_LOCK_TIMEOUT .* finite number"):
        reg.update(task, agent["id"], progress=10)
    assert digest(reg.base) == before
    monkeypatch.setenv("ORCH_LOCK_TIMEOUT", "2.5")
    assert registry.store.default_lock_timeout() == 2.5


@pytest.mark.parametrize("value", ["soon", float("nan"), float("inf"), True])
def test_8_a_bad_lock_timeout_argument_is_invalid(base: Path, tmux: TmuxSessions, value: object) -> None:
    with pytest.raises(InvalidArgument, match="lock_timeout"):
        Registry(base, lock_timeout=value)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------------
# 9. ids fit the name rules


@pytest.mark.parametrize("length", [50, 51, MAX_NAME])
def test_9_an_agent_of_a_long_type_gets_an_id_that_can_be_a_parent(reg: Registry, task: str, length: int) -> None:
    agent_type = "t" * length
    parent = reg.deploy(task, agent_type)
    assert len(parent["id"]) <= MAX_NAME
    child = reg.deploy(task, "child", parent=parent["id"])
    assert child["depth"] == 2


# --------------------------------------------------------------------------------------------------------------------
# 10. timed-out lock waits outside the main thread leave nothing behind


def _fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


def test_10_timed_out_waits_in_a_thread_leave_no_thread_and_no_descriptor(tmp_path: Path) -> None:
    lock_path = tmp_path / "doc.json.lock"
    with LockHolder(lock_path, tmp_path / "released"):
        lock = FlockLock(lock_path)
        threads, fds = threading.active_count(), _fds()
        errors: list[BaseException] = []

        def waits() -> None:
            for _ in range(50):
                try:
                    lock.acquire(timeout=0.01)
                except LockBusy as exc:
                    errors.append(exc)

        worker = threading.Thread(target=waits)
        worker.start()
        worker.join(30)
        assert len(errors) == 50
        assert (threading.active_count(), _fds()) == (threads, fds)


# --------------------------------------------------------------------------------------------------------------------
# 11. new directories are durable before the operation is acknowledged


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths this process fsyncs (the real fsync still runs)."""
    seen: list[str] = []
    real = os.fsync

    def fsync(fd: Any) -> None:
        seen.append(str(Path(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}").readlink()))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_11_creating_the_first_task_fsyncs_the_parent_of_every_new_directory(tmp_path: Path, tmux: TmuxSessions,
                                                                              fsynced: list[str]) -> None:
    base = tmp_path / "new" / "ws"
    task = Registry(base).create_task("durable")
    for directory in (base / GLOBAL_DIR, base / task, base, base.parent):
        assert str(directory.parent) in fsynced, (directory, fsynced)
    assert fsynced.index(str(base)) < fsynced.index(str(base / task))  # the task dir's entry, before its file's


def _create_and_crash_after_mkdir(base: str) -> None:
    def die(point: str, path: Path) -> None:
        if point == "after_mkdir" and path.name != GLOBAL_DIR:
            os._exit(17)

    set_crash_hook(die)
    Registry(base).create_task("crashes")


def test_11_a_crash_between_mkdir_and_fsync_leaves_a_workspace_that_opens_whole(reg: Registry, task: str) -> None:
    code, outcome = run_in_child(_create_and_crash_after_mkdir, str(reg.base))
    assert (code, outcome) == (17, None)
    assert Registry(reg.base).task_ids() == [task]
    assert check(reg.base).healthy


# --------------------------------------------------------------------------------------------------------------------
# The smaller ones


def test_update_with_a_status_of_the_wrong_type_is_an_invalid_transition(reg: Registry, task: str,
                                                                         agent: dict[str, Any]) -> None:
    before = digest(reg.base)
    for status in (["running"], {"a": 1}, 3):
        with pytest.raises(InvalidTransition):
            reg.update(task, agent["id"], status)  # type: ignore[arg-type]
    assert digest(reg.base) == before


@pytest.mark.parametrize("kwargs", [{"description": object()}, {"description": "x", "priority": 1},
                                    {"description": "x", "client_cwd": 5}, {"description": "x", "task_id": 7}])
def test_create_task_with_an_argument_of_the_wrong_type_creates_nothing(reg: Registry, task: str,
                                                                        kwargs: dict[str, Any]) -> None:
    before = digest(reg.base)
    with pytest.raises(InvalidArgument):
        reg.create_task(**kwargs)
    assert digest(reg.base) == before


def test_other_arguments_of_the_wrong_type_are_refused_with_the_registrys_error(reg: Registry, task: str,
                                                                                agent: dict[str, Any]) -> None:
    before = digest(reg.base)
    with pytest.raises(InvalidArgument):
        reg.deploy(task, "prompted", prompt=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidName):
        reg.deploy(task, 3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        reg.kill(task, agent["id"], reason=["x"])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        reg.update(task, agent["id"], progress=float("nan"))  # type: ignore[arg-type]
    assert digest(reg.base) == before


def test_repair_of_an_empty_base_or_a_plain_directory_creates_nothing(tmp_path: Path, tmux: TmuxSessions,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    before = digest(plain)
    repair(plain, dry_run=False, restore=True, kill_leaks=True)
    assert digest(plain) == before
    monkeypatch.chdir(plain)
    code, _out, err = cli("repair", "--base", "")
    assert code == 2
    assert "--base is empty" in err
    assert digest(plain) == before


def test_a_base_of_10_kb_is_a_usage_error_not_a_traceback() -> None:
    code, _out, err = cli("check", "--base", "/tmp/" + "x" * 10_000)
    assert code == 2
    assert "Traceback" not in err
    assert "no workspace" in err


def test_a_task_whose_id_differs_from_its_directory_is_restored_and_repair_converges(
        reg: Registry, task: str, agent: dict[str, Any]) -> None:
    edit(task_path(reg, task), lambda doc: doc.update(task_id="TASK-something-else"))
    assert [f.kind for f in check(reg.base).findings] == ["corrupt"]
    repair(reg.base, dry_run=False, restore=True)
    assert check(reg.base).healthy
    again = repair(reg.base, dry_run=False)
    assert not again.actions, again.render()
    assert not again.refused, again.render()
