"""tmux faults, on a private server: sessions killed behind the registry's back (zombies), ``agent_*`` sessions no
registry knows (leaks), the whole server SIGKILLed, and a tmux that cannot be asked at all.

reconcile and ``check`` must find exactly the zombies and leaks that were made, and when the tmux query itself fails
nothing may be reaped and nothing killed.  Every fault is on the chaos tape, and the harness's checks run on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_orch.adapter import ReferenceAdapter
from pytest_orch.chaos import BROKEN_TMUX, Chaos
from pytest_orch.swarm import Worker
from registry import Registry, SessionError, TmuxSessions, check, repair
from registry.legacy import LegacyRegistry

CLI = Path(sys.executable).with_name("orch-registry")


def _deployed(chaos: Chaos, base: Path, n: int) -> tuple[Worker, Registry, str, dict[str, str]]:
    """A task with *n* agents deployed through a recorded worker; returns agent id -> session."""
    adapter = ReferenceAdapter(base)
    w = chaos.worker(adapter)
    task = w.registry.create_task("tmux chaos", max_agents=20, max_concurrent=20, max_depth=3)
    assert task is not None
    agents = [w.registry.deploy(task, f"t{i}") for i in range(n)]
    assert None not in agents
    reg: Registry = adapter.reg
    return w, reg, task, {a["id"]: a["tmux_session"] for a in reg.read_task(task)["agents"]}


def _reconcile(w: Worker, reg: Registry, task: str) -> list[str] | None:
    """reconcile through the registry itself (it returns what it reaped), recorded as the harness's reconcile."""
    reaped: list[str] | None = w.call("reconcile", lambda: reg.reconcile(task), task_id=task)
    return reaped


def test_sessions_killed_behind_the_registrys_back_are_exactly_the_zombies_check_finds_and_reconcile_reaps(
        orch_workspace: Path, orch_chaos: Chaos) -> None:
    w, reg, task, sessions = _deployed(orch_chaos, orch_workspace, 6)
    killed = orch_chaos.kill_sessions(list(sessions.values()), 3)
    zombies = sorted(a for a, s in sessions.items() if s in killed)

    report = check(orch_workspace)
    assert report.zombies == zombies, report.render()
    assert {f.kind for f in report.findings} == {"zombie"}, report.render()
    assert report.sessions == 3

    assert sorted(_reconcile(w, reg, task) or []) == zombies
    for agent in reg.read_task(task)["agents"]:
        expected = ("terminated", "session_not_found") if agent["id"] in zombies else ("running", None)
        assert (agent["status"], agent.get("termination_reason")) == expected
    assert check(orch_workspace).healthy
    assert _reconcile(w, reg, task) == []
    faults = orch_chaos.check(ReferenceAdapter(orch_workspace)).faults()
    assert [line.split("ms  ", 1)[1] for line in faults] == [f"tmux_kill(session={s}) by harness" for s in killed]


def test_agent_sessions_started_outside_the_registry_are_exactly_the_leaks_check_finds_and_reconcile_leaves_alone(
        orch_workspace: Path, orch_chaos: Chaos) -> None:
    w, reg, task, sessions = _deployed(orch_chaos, orch_workspace, 3)
    leaks = orch_chaos.start_leaks(3)
    task_file = orch_workspace / task / "AGENT_REGISTRY.json"
    before = task_file.read_bytes()

    report = check(orch_workspace)
    assert report.leaks == sorted(leaks), report.render()
    assert {f.kind for f in report.findings} == {"leak"}, report.render()
    assert _reconcile(w, reg, task) == []
    assert task_file.read_bytes() == before

    done = repair(orch_workspace, dry_run=False, kill_leaks=True)
    assert sorted(done.actions) == [f"killed leaked session {s}" for s in sorted(leaks)]
    assert TmuxSessions().alive() == set(sessions.values())
    assert check(orch_workspace).healthy
    orch_chaos.check(ReferenceAdapter(orch_workspace))


def test_a_tmux_server_killed_with_sigkill_leaves_every_active_agent_a_zombie_and_reconcile_reaps_exactly_those(
        orch_workspace: Path, orch_chaos: Chaos) -> None:
    w, reg, task, sessions = _deployed(orch_chaos, orch_workspace, 4)
    finished = next(iter(sessions))
    assert w.registry.update(task, finished, "completed", 100)
    orch_chaos.kill_tmux_server()

    active = sorted(a for a in sessions if a != finished)
    report = check(orch_workspace)
    assert report.zombies == active, report.render()
    assert {f.kind for f in report.findings} == {"zombie"}, report.render()
    assert report.sessions == 0

    assert sorted(_reconcile(w, reg, task) or []) == active
    assert check(orch_workspace).healthy
    # A new server starts with the next deploy; the registry works on as before.
    assert w.registry.deploy(task, "after-the-crash") is not None
    assert check(orch_workspace).healthy
    assert "tmux_server_sigkill(pid=" in "\n".join(orch_chaos.check(ReferenceAdapter(orch_workspace)).faults())


def _zombies_and_a_leak(chaos: Chaos, base: Path) -> tuple[Worker, Registry, str, list[str], list[str]]:
    """Two zombies and a leak that a working tmux would reap and report."""
    w, reg, task, sessions = _deployed(chaos, base, 4)
    killed = chaos.kill_sessions(list(sessions.values()), 2)
    zombies = sorted(a for a, s in sessions.items() if s in killed)
    leaks = chaos.start_leaks(1)
    return w, reg, task, zombies, leaks


def _workspace_bytes(base: Path) -> dict[str, bytes]:
    """Every registry file (repair's own backups aside)."""
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*.json"))
            if ".backups" not in p.parts}


@pytest.mark.parametrize("kind", sorted(BROKEN_TMUX))
def test_when_the_tmux_binary_fails_nothing_is_reaped_or_killed_and_check_says_tmux_is_unreachable(
        orch_workspace: Path, orch_chaos: Chaos, kind: str) -> None:
    w, reg, task, zombies, leaks = _zombies_and_a_leak(orch_chaos, orch_workspace)
    before = _workspace_bytes(orch_workspace)
    with orch_chaos.broken_tmux(kind):
        with pytest.raises(SessionError, match="could not list tmux sessions"):
            reg.reconcile(task)
        assert not w.registry.reconcile(task)  # recorded: fail (SessionError: certainly not applied)

        report = check(orch_workspace)
        assert [f.kind for f in report.findings] == ["tmux_unreachable"], report.render()
        assert report.sessions is None

        cli = subprocess.run([str(CLI), "check", "--json", "--base", str(orch_workspace)], capture_output=True,
                             text=True, timeout=120, check=False)
        assert cli.returncode == 1, cli.stdout + cli.stderr
        doc = json.loads(cli.stdout)
        assert (doc["zombies"], doc["leaks"], [f["kind"] for f in doc["findings"]]) == ([], [], ["tmux_unreachable"])

        cli = subprocess.run([str(CLI), "repair", "--kill-leaks", "--base", str(orch_workspace)], capture_output=True,
                             text=True, timeout=120, check=False)
        assert cli.returncode == 1, cli.stdout + cli.stderr
        assert "refused: reaping zombies and leaks: could not list tmux sessions" in cli.stdout, cli.stdout
        assert "marked zombie" not in cli.stdout
        assert "killed leaked session" not in cli.stdout
    assert _workspace_bytes(orch_workspace) == before, "a registry file changed although tmux could not be asked"
    after = check(orch_workspace)  # tmux works again: everything is still there to be found
    assert (after.zombies, after.leaks) == (zombies, leaks), after.render()
    orch_chaos.check(ReferenceAdapter(orch_workspace))


def test_when_the_tmux_socket_path_is_broken_nothing_is_reaped_or_killed(orch_workspace: Path, orch_chaos: Chaos,
                                                                         tmp_path: Path) -> None:
    _w, _reg, task, zombies, leaks = _zombies_and_a_leak(orch_chaos, orch_workspace)
    before = _workspace_bytes(orch_workspace)
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    broken = TmuxSessions(socket_path=not_a_directory / "socket")
    orch_chaos.tape.fault("broken_tmux_socket", path=str(not_a_directory / "socket"))

    with pytest.raises(SessionError, match="Not a directory"):
        Registry(orch_workspace, sessions=broken).reconcile(task)
    report = check(orch_workspace, sessions=broken)
    assert [f.kind for f in report.findings] == ["tmux_unreachable"], report.render()
    done = repair(orch_workspace, dry_run=False, kill_leaks=True, sessions=broken)
    assert not [a for a in done.actions if "zombie" in a or "killed" in a], done.render()
    assert _workspace_bytes(orch_workspace) == before
    after = check(orch_workspace)
    assert (after.zombies, after.leaks) == (zombies, leaks), after.render()


def test_when_the_tmux_socket_path_is_a_regular_file_nothing_is_reaped(orch_workspace: Path, orch_chaos: Chaos,
                                                                       tmp_path: Path) -> None:
    """tmux itself says "no server running" there; but a path that is no socket never was a server: no answer."""
    _w, _reg, task, zombies, leaks = _zombies_and_a_leak(orch_chaos, orch_workspace)
    before = _workspace_bytes(orch_workspace)
    regular_file = tmp_path / "not-a-socket"
    regular_file.write_text("")
    broken = TmuxSessions(socket_path=regular_file)
    orch_chaos.tape.fault("broken_tmux_socket", path=str(regular_file))
    with pytest.raises(SessionError):
        Registry(orch_workspace, sessions=broken).reconcile(task)
    report = check(orch_workspace, sessions=broken)
    assert [f.kind for f in report.findings] == ["tmux_unreachable"], report.render()
    assert _workspace_bytes(orch_workspace) == before
    after = check(orch_workspace)
    assert (after.zombies, after.leaks) == (zombies, leaks), after.render()


def test_legacy_reaps_every_agent_when_the_tmux_query_fails(orch_workspace: Path, orch_chaos: Chaos) -> None:
    """The old behaviour the rule above exists for: any failure to ask tmux counted as "the session is gone"."""
    legacy = LegacyRegistry(orch_workspace)
    task = legacy.create_task("legacy and a broken tmux", max_agents=9, max_concurrent=9, max_depth=3)
    agents = [legacy.deploy(task, f"t{i}")["id"] for i in range(3)]
    with orch_chaos.broken_tmux():
        reaped = legacy.reconcile(task)
    assert sorted(reaped) == sorted(agents)
    alive = TmuxSessions().alive()
    assert {f"agent_{a}" for a in agents} <= alive, "the sessions were alive all along"


