"""``orch-registry status|check|repair``: exit codes, text and JSON, on the real samples and on broken workspaces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLES
from helpers_registry import snapshot, tmux_cli

from registry import Registry, TmuxSessions
from registry.model import GLOBAL_DIR, GLOBAL_FILE, TASK_FILE

ZOMBIE = "jsonl_architecture_planner-215640-c3f469"


def orch_registry(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed console script, in a process of its own."""
    script = Path(sys.executable).with_name("orch-registry")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "registry.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env, check=False,
                          timeout=60)


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


@pytest.fixture
def healthy(reg: Registry) -> Path:
    task_id = reg.create_task("fine")
    reg.deploy(task_id, "worker")
    return reg.base


def test_check_on_the_samples_reports_exactly_the_one_zombie(samples: Path, tmux: TmuxSessions) -> None:
    result = orch_registry("check", "--base", samples)
    assert result.returncode == 1, result.stderr
    assert "1 problem:" in result.stdout
    assert f"agent {ZOMBIE} is working but its session agent_{ZOMBIE} is gone" in result.stdout
    report = as_json(orch_registry("check", "--json", "--base", samples))
    assert [(f["kind"], f["agent_id"]) for f in report["findings"]] == [("zombie", ZOMBIE)]
    assert (report["zombies"], report["leaks"], report["healthy"]) == ([ZOMBIE], [], False)
    assert (report["tasks"], report["agents"], report["active"], report["sessions"]) == (5, 27, 1, 0)


def test_check_reads_the_shared_read_only_samples_in_place(tmux: TmuxSessions) -> None:
    if not SAMPLES.is_dir():
        pytest.skip(f"the sample registries are not at {SAMPLES}: set ORCH_SAMPLES to a workspace of them"
                    " (shared/samples/orchestrator-2025-10/.agent-workspace)")
    before = snapshot(SAMPLES)
    result = orch_registry("check", "--json", "--base", SAMPLES)
    assert result.returncode == 1, result.stderr
    assert as_json(result)["zombies"] == [ZOMBIE]
    assert snapshot(SAMPLES) == before


def test_status_on_the_samples_works_and_never_writes(samples: Path, tmux: TmuxSessions) -> None:
    before = snapshot(samples)
    result = orch_registry("status", "--base", samples)
    assert result.returncode == 0, result.stderr
    assert "5 tasks" in result.stdout
    assert "TASK-20251017-215604-df6a3cbd  INITIALIZED  13 agents, 1 active, 12 completed" in result.stdout
    doc = as_json(orch_registry("status", "--json", "--base", samples))
    assert len(doc["tasks"]) == 5
    assert sum(t["agents"] for t in doc["tasks"]) == 27
    assert all(t["violations"] == [] for t in doc["tasks"])
    assert snapshot(samples) == before


def test_a_healthy_workspace_exits_zero(healthy: Path) -> None:
    for command in ("status", "check"):
        result = orch_registry(command, "--base", healthy)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "healthy" in orch_registry("check", "--base", healthy).stdout


def test_the_workspace_comes_from_orch_workspace_when_there_is_no_base(healthy: Path) -> None:
    import os

    env = {**os.environ, "ORCH_WORKSPACE": str(healthy)}
    result = orch_registry("check", "--json", env=env)
    assert result.returncode == 0
    assert as_json(result)["base"] == str(healthy)


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["check", "--no-such-flag"], ["status", "--dry-run"]],
                         ids=["no command", "unknown command", "unknown flag", "a flag of another command"])
def test_usage_errors_exit_two(args: list[str], tmp_path: Path) -> None:
    result = orch_registry(*args)
    assert result.returncode == 2
    assert "usage: orch-registry" in result.stderr


def test_help_exits_zero_and_names_the_exit_codes() -> None:
    result = orch_registry("--help")
    assert result.returncode == 0
    assert "0 healthy, 1 problems found, 2 usage or I/O error" in result.stdout


@pytest.mark.parametrize("command", ["status", "check", "repair"])
def test_a_workspace_that_is_not_there_exits_two(command: str, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    for base in (tmp_path / "nowhere", tmp_path / "a-file"):
        result = orch_registry(command, "--base", base)
        assert result.returncode == 2
        assert "no workspace at" in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_a_directory_where_the_global_registry_belongs_is_reported_and_left_alone(healthy: Path) -> None:
    # Before issue 12 this was an I/O error, exit 2, for the whole workspace; a stray is a finding now.
    path = healthy / GLOBAL_DIR / GLOBAL_FILE
    path.unlink()
    path.mkdir()
    for command in ("check", "repair"):
        result = orch_registry(command, "--base", healthy)
        assert result.returncode == 1, result.stderr
        assert f"{path} is a directory, where the registry keeps a registry file" in result.stdout
    assert path.is_dir()
    assert not any(path.iterdir())


def test_check_and_status_report_a_corrupt_task_registry(healthy: Path) -> None:
    (task_file,) = healthy.glob(f"*/{TASK_FILE}")
    task_file.write_bytes(b'{"task_id": ')
    check = orch_registry("check", "--json", "--base", healthy)
    assert check.returncode == 1
    (finding,) = as_json(check)["findings"]
    assert finding["kind"] == "corrupt"
    assert "line 1 column 13" in finding["message"]
    status = orch_registry("status", "--base", healthy)
    assert status.returncode == 1
    assert "CORRUPT" in status.stdout


def test_repair_dry_run_exits_one_and_writes_nothing_then_repair_exits_zero(healthy: Path) -> None:
    (task_file,) = healthy.glob(f"*/{TASK_FILE}")
    (agent,) = json.loads(task_file.read_bytes())["agents"]
    assert tmux_cli("kill-session", "-t", agent["tmux_session"]).returncode == 0
    before = snapshot(healthy)
    dry = orch_registry("repair", "--dry-run", "--json", "--base", healthy)
    assert dry.returncode == 1
    assert any(agent["id"] in a for a in as_json(dry)["repair"]["actions"])
    assert snapshot(healthy) == before
    fixed = orch_registry("repair", "--json", "--base", healthy)
    assert fixed.returncode == 0, fixed.stdout
    doc = as_json(fixed)
    assert doc["after"]["healthy"] is True
    assert Path(doc["repair"]["backup_dir"]).is_dir()
    assert orch_registry("check", "--base", healthy).returncode == 0


def test_repair_refuses_a_corrupt_file_without_restore_and_mends_it_with_restore(healthy: Path) -> None:
    (task_file,) = healthy.glob(f"*/{TASK_FILE}")
    task_file.write_bytes(b"\xff\xfe")
    refused = orch_registry("repair", "--base", healthy)
    assert refused.returncode == 1
    assert "refused" in refused.stdout
    assert task_file.read_bytes() == b"\xff\xfe"
    # The hint names the flag that would do what was refused, not the command just run.
    assert f"to do what was refused: orch-registry repair --restore --base {healthy}" in refused.stdout
    assert "fix with: orch-registry repair --base" not in refused.stdout
    restored = orch_registry("repair", "--restore", "--base", healthy)
    assert restored.returncode == 0, restored.stdout
    assert "rebuilt" in restored.stdout or "restored" in restored.stdout


def test_a_repair_that_changes_nothing_makes_no_backup_and_counts_say_one_in_the_singular(healthy: Path) -> None:
    before = snapshot(healthy)
    result = orch_registry("repair", "--base", healthy)
    assert result.returncode == 0, result.stdout
    assert "changed no file, so made no backup" in result.stdout
    assert "nothing to repair" in result.stdout
    assert not (healthy / ".backups").exists()
    assert snapshot(healthy) == before
    assert f"{healthy}: 1 task, 1 agent, 1 active" in result.stdout
    assert orch_registry("status", "--base", healthy).stdout.startswith(f"{healthy}: 1 task\n")
