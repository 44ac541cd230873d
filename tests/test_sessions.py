"""The tmux seam on a private real server, and the stub agent running in a real session."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_registry import fake_tmux, tmux_cli

from registry import Registry, SessionError, TmuxSessions, check
from registry.sessions import DEFAULT_AGENT_COMMAND, agent_command


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"gave up after {timeout} s waiting for {what}")


def test_sessions_live_on_the_private_server_under_tmux_tmpdir(tmux: TmuxSessions, tmp_path: Path) -> None:
    tmux.start("agent_private", "sleep 60")
    socket = tmux_cli("display-message", "-p", "-t", "agent_private", "#{socket_path}").stdout.strip()
    assert socket.startswith(str(tmp_path / "tmux")), socket
    assert tmux.alive() == {"agent_private"}


def test_start_kill_and_alive_round_trip(tmux: TmuxSessions) -> None:
    tmux.start("agent_one", "sleep 60", {"ORCH_WORKSPACE": "/somewhere"})
    tmux.start("agent_two", "sleep 60")
    assert tmux.alive() == {"agent_one", "agent_two"}
    env = tmux_cli("show-environment", "-t", "agent_one", "ORCH_WORKSPACE").stdout.strip()
    assert env == "ORCH_WORKSPACE=/somewhere"
    assert tmux.kill("agent_one") is True
    assert tmux.alive() == {"agent_two"}
    assert tmux.kill("agent_one") is False


def test_kill_matches_the_session_name_exactly_not_a_prefix(tmux: TmuxSessions) -> None:
    tmux.start("agent_ab", "sleep 60")
    assert tmux.kill("agent_a") is False
    assert tmux.alive() == {"agent_ab"}


def test_a_session_name_that_exists_cannot_be_started_twice(tmux: TmuxSessions) -> None:
    tmux.start("agent_same", "sleep 60")
    with pytest.raises(SessionError, match="agent_same"):
        tmux.start("agent_same", "sleep 60")


def test_no_server_running_means_no_sessions(tmux: TmuxSessions) -> None:
    assert tmux.alive() == set()
    assert tmux.kill("agent_none") is False


@pytest.fixture
def named_server() -> Iterator[TmuxSessions]:
    sessions = TmuxSessions(socket_name="orch-named")
    yield sessions
    sessions.kill_server()


def test_a_socket_name_selects_another_server(tmux: TmuxSessions, named_server: TmuxSessions,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    named_server.start("agent_named", "sleep 60")
    assert tmux.alive() == set()
    monkeypatch.setenv("ORCH_TMUX_SOCKET", "orch-named")
    assert TmuxSessions().alive() == {"agent_named"}


@pytest.mark.parametrize("failure", ["missing binary", "failing binary"])
def test_a_failing_tmux_raises_session_error_for_every_call(tmp_path: Path, tmux: TmuxSessions,
                                                            failure: str) -> None:
    binary = tmp_path / "absent" if failure == "missing binary" else fake_tmux(
        tmp_path, stderr="protocol version mismatch", code=1)
    broken = TmuxSessions(tmux_bin=binary)
    for call in (broken.alive, lambda: broken.kill("agent_x"), lambda: broken.start("agent_x", "sleep 1")):
        with pytest.raises(SessionError) as raised:
            call()
        assert isinstance(raised.value, OSError)
    assert tmux.alive() == set()


def test_the_agent_command_quotes_every_value(tmp_path: Path) -> None:
    command = agent_command("{python} run {base} {task_id} {agent_id}", base=tmp_path / "it's here",
                            task_id="T-1", agent_id="a-1")
    assert command.endswith(f"run '{tmp_path}/it'\"'\"'s here' T-1 a-1")


def test_the_agent_command_is_the_template_else_the_environment_else_the_stub_agent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCH_AGENT_COMMAND", raising=False)
    assert " -m registry.stub_agent --base " in agent_command(None, base=tmp_path, task_id="T", agent_id="a")
    monkeypatch.setenv("ORCH_AGENT_COMMAND", "my-agent {agent_id}")
    assert agent_command(None, base=tmp_path, task_id="T", agent_id="a") == "my-agent a"
    assert agent_command("other {task_id}", base=tmp_path, task_id="T", agent_id="a") == "other T"


# --------------------------------------------------------------------------------------------------------------------
# The stub agent, for real


@pytest.fixture
def stub_base(tmp_path: Path) -> Path:
    base = tmp_path / "work space"  # a path that needs quoting on its way through the shell
    base.mkdir()
    return base


def stub(base: Path, then: str) -> Registry:
    return Registry(base, agent_command=DEFAULT_AGENT_COMMAND + f" --report 25,50,75 --interval 0.05 --then {then}")


def test_the_stub_agent_reports_progress_through_update_and_completes(stub_base: Path, tmux: TmuxSessions) -> None:
    reg = stub(stub_base, "complete")
    task_id = reg.create_task("stub work")
    agent = reg.deploy(task_id, "stub")

    def finished() -> dict[str, Any] | None:
        record = next(a for a in reg.read_task(task_id)["agents"] if a["id"] == agent["id"])
        return record if record["status"] == "completed" else None

    record = wait_for(finished, "the stub agent to complete")
    assert (record["progress"], record["last_message"]) == (100, "done")
    assert "completed_at" in record
    task = reg.read_task(task_id)
    assert (task["active_count"], task["completed_count"]) == (0, 1)
    wait_for(lambda: agent["tmux_session"] not in tmux.alive(), "the finished agent's session to end")
    report = check(stub_base)
    assert report.healthy, report.render()


def test_the_stub_agent_reports_each_progress_value_then_sleeps_until_killed(stub_base: Path,
                                                                            tmux: TmuxSessions) -> None:
    reg = stub(stub_base, "sleep")
    task_id = reg.create_task("stub work")
    agent = reg.deploy(task_id, "stub")
    seen: list[int] = []

    def reported_75() -> bool:
        record = next(a for a in reg.read_task(task_id)["agents"] if a["id"] == agent["id"])
        if not seen or seen[-1] != record["progress"]:
            seen.append(record["progress"])
        return bool(record["progress"] == 75 and record["status"] == "working")

    wait_for(reported_75, "the stub agent to report 75%")
    assert seen == sorted(seen)
    assert seen[0] in (0, 25)
    assert seen[-1] == 75
    assert agent["tmux_session"] in tmux.alive()
    assert reg.kill(task_id, agent["id"])["status"] == "terminated"
    assert agent["tmux_session"] not in tmux.alive()


def test_a_stub_agent_that_exits_without_a_word_becomes_a_zombie_that_reconcile_reaps(
        stub_base: Path, tmux: TmuxSessions) -> None:
    reg = Registry(stub_base, agent_command=DEFAULT_AGENT_COMMAND + " --then exit")
    task_id = reg.create_task("stub work")
    agent = reg.deploy(task_id, "stub")
    wait_for(lambda: agent["tmux_session"] not in tmux.alive(), "the stub agent's session to end")
    assert check(stub_base).zombies == [agent["id"]]
    assert reg.reconcile(task_id) == [agent["id"]]
    assert check(stub_base).healthy


def test_a_socket_path_that_is_not_a_socket_is_a_failed_query_not_an_empty_server(tmux: TmuxSessions,
                                                                                   tmp_path: Path) -> None:
    regular = tmp_path / "not-a-socket"
    regular.write_text("")
    with pytest.raises(SessionError, match="is not a socket"):
        TmuxSessions(socket_path=regular).alive()
    assert TmuxSessions(socket_path=tmp_path / "absent").alive() == set()


def test_the_socket_is_resolved_as_tmux_resolves_it(tmux: TmuxSessions, tmp_path: Path) -> None:
    tmux.start("agent_where", "sleep 60")
    socket = tmux_cli("display-message", "-p", "-t", "agent_where", "#{socket_path}").stdout.strip()
    assert str(tmux.socket()) == socket
    assert TmuxSessions(socket_name="other").socket().name == "other"


def test_the_harness_kill_treats_a_session_or_server_already_gone_as_gone(tmux: TmuxSessions) -> None:
    """tmux answers "can't find session", "no server running" or "no current session" for what is already gone."""
    import subprocess

    from pytest_orch.tmux import kill_session

    assert kill_session("nobody-here") is False  # no server at all
    subprocess.run(["tmux", "new-session", "-d", "-s", "victim", "sleep 60"], check=True)
    assert kill_session("victim") is True
    assert kill_session("victim") is False  # the server exited with its last session, or the session is gone
    subprocess.run(["tmux", "new-session", "-d", "-s", "other", "sleep 60"], check=True)
    assert kill_session("victim") is False  # a live server that lacks it
