"""Torn and corrupt registry files: truncated JSON, invalid UTF-8, valid JSON of the wrong shape, a zero-byte file,
a missing global registry.

Every operation that needs the bad file fails with a clear error naming it and saying how to recover; nothing
overwrites it (it stays byte-identical); ``orch-registry repair`` (the real console script, in a subprocess) refuses
it without ``--restore``, and with ``--restore`` restores it from its backup or rebuilds it, says which, and leaves a
workspace that ``orch-registry check`` finds healthy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_orch.adapter import ReferenceAdapter
from pytest_orch.chaos import CORRUPTIONS, Chaos
from registry import CorruptRegistry, Registry, RegistryMissing, TmuxSessions

CLI = Path(sys.executable).with_name("orch-registry")
TASK_KINDS = [kind for kind in CORRUPTIONS if kind != "missing"]  # a missing task registry is an unknown task


def orch_registry(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the installed ``orch-registry`` console script."""
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=120, check=False)


def _workspace(chaos: Chaos, base: Path) -> dict[str, Any]:
    """A task with agents alpha (progress 50), beta and gamma, gamma a zombie; every call on the chaos tape."""
    w = chaos.worker(ReferenceAdapter(base))
    task = w.registry.create_task("corrupt files", max_agents=9, max_concurrent=9, max_depth=3)
    assert task is not None
    ctx: dict[str, Any] = {"task": task}
    for name in ("alpha", "beta", "gamma"):
        ctx[name] = w.registry.deploy(task, name)
    assert w.registry.update(task, ctx["alpha"], "running", 50)
    assert w.kill_session(f"agent_{ctx['gamma']}")
    assert None not in ctx.values()
    ctx["task_file"] = base / task / "AGENT_REGISTRY.json"
    ctx["global_file"] = base / "registry" / "GLOBAL_REGISTRY.json"
    return ctx


def _task_operations(reg: Registry, c: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    task = c["task"]
    return {
        "deploy": lambda: reg.deploy(task, "delta"),
        "update with a status change": lambda: reg.update(task, c["alpha"], "blocked", progress=60),
        "update of progress only": lambda: reg.update(task, c["alpha"], progress=70),
        "kill": lambda: reg.kill(task, c["beta"]),
        "reconcile": lambda: reg.reconcile(task),
        "read_task": lambda: reg.read_task(task),
    }


def _global_operations(reg: Registry, c: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    task = c["task"]
    return {
        "create_task": lambda: reg.create_task("another"),
        "deploy": lambda: reg.deploy(task, "delta"),
        "update with a status change": lambda: reg.update(task, c["alpha"], "blocked", progress=60),
        "kill": lambda: reg.kill(task, c["beta"]),
        "reconcile (with a zombie to reap)": lambda: reg.reconcile(task),
        "read_global": lambda: reg.read_global(),
    }


def _bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def _assert_healthy(base: Path) -> dict[str, Any]:
    result = orch_registry("check", "--json", "--base", base)
    report: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["healthy"], report
    return report


def _assert_kept_in_backups(base: Path, name: str, data: bytes) -> None:
    """repair backs every file up before it changes anything: the bad bytes are kept for a person to look at."""
    kept = [p for p in (base / ".backups").rglob(name) if p.read_bytes() == data]
    assert kept, f"the bad {name} is not in {base / '.backups'}"


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_every_operation_on_a_corrupt_task_registry_fails_naming_it_and_repair_restores_it_from_its_backup(
        orch_workspace: Path, orch_chaos: Chaos, kind: str) -> None:
    c = _workspace(orch_chaos, orch_workspace)
    path = c["task_file"]
    bad = orch_chaos.corrupt(path, kind)
    assert bad is not None
    sessions = TmuxSessions().alive()
    reg = Registry(orch_workspace)  # opening a workspace with a corrupt file neither fails nor writes

    for name, attempt in _task_operations(reg, c).items():
        with pytest.raises(CorruptRegistry) as info:
            attempt()
        message = str(info.value)
        assert info.value.path == str(path), name
        assert message.startswith(f"{path} is corrupt: "), (name, message)
        assert "The file was left untouched" in message
        assert f"orch-registry repair --restore --base {orch_workspace}" in message, (name, message)
        assert info.value.backup == f"{path}.bak", (name, info.value.backup)
    assert _bytes(path) == bad, "the corrupt file was overwritten"
    assert TmuxSessions().alive() == sessions, "an operation on a corrupt registry started or killed a session"

    refused = orch_registry("repair", "--base", orch_workspace)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"refused: {path} is corrupt; rerun with --restore to restore or rebuild it" in refused.stdout
    assert _bytes(path) == bad

    restored = orch_registry("repair", "--restore", "--base", orch_workspace)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert f"did: restored {path} from its backup {path}.bak" in restored.stdout
    _assert_kept_in_backups(orch_workspace, path.name, bad)
    _assert_healthy(orch_workspace)
    # The backup is the last committed content: even alpha's progress report, the file's last write, is back.
    agents = {a["id"]: a for a in Registry(orch_workspace).read_task(c["task"])["agents"]}
    assert set(agents) == {c["alpha"], c["beta"], c["gamma"]}
    assert agents[c["alpha"]]["progress"] == 50
    assert agents[c["gamma"]]["termination_reason"] == "session_not_found"


def test_a_corrupt_task_registry_with_no_backup_is_rebuilt_from_the_global_registry_and_repair_says_so(
        orch_workspace: Path, orch_chaos: Chaos) -> None:
    c = _workspace(orch_chaos, orch_workspace)
    path = c["task_file"]
    kind = orch_chaos.rng.choice(TASK_KINDS)
    orch_chaos.corrupt(path, kind)
    Path(f"{path}.bak").unlink()
    with pytest.raises(CorruptRegistry, match="no backup exists") as info:
        Registry(orch_workspace).deploy(c["task"], "delta")
    assert info.value.backup is None

    restored = orch_registry("repair", "--restore", "--base", orch_workspace)
    assert restored.returncode == 0, f"{kind}:\n{restored.stdout}{restored.stderr}"
    assert f"did: rebuilt {path} from the global registry (no usable backup)" in restored.stdout, restored.stdout
    _assert_healthy(orch_workspace)
    agents = {a["id"]: a["status"] for a in Registry(orch_workspace).read_task(c["task"])["agents"]}
    assert agents == {c["alpha"]: "running", c["beta"]: "running", c["gamma"]: "terminated"}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_every_operation_that_needs_a_corrupt_or_missing_global_registry_fails_naming_it_and_repair_rebuilds_it(
        orch_workspace: Path, orch_chaos: Chaos, kind: str) -> None:
    c = _workspace(orch_chaos, orch_workspace)
    path = c["global_file"]
    bad = orch_chaos.corrupt(path, kind)
    sessions = TmuxSessions().alive()
    reg = Registry(orch_workspace)
    error = RegistryMissing if kind == "missing" else CorruptRegistry

    for name, attempt in _global_operations(reg, c).items():
        with pytest.raises(error) as info:
            attempt()
        assert str(path) in str(info.value), (name, str(info.value))
        assert "orch-registry repair" in str(info.value), (name, str(info.value))
    # The global registry records no progress: a progress report needs only the task registry, and goes through.
    reg.update(c["task"], c["alpha"], progress=70)
    assert _bytes(path) == bad, "the bad global registry was overwritten"
    assert TmuxSessions().alive() == sessions, "an operation on a corrupt registry started or killed a session"

    if kind != "missing":
        refused = orch_registry("repair", "--base", orch_workspace)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"refused: {path} is corrupt; rerun with --restore to rebuild it from the tasks" in refused.stdout
        assert _bytes(path) == bad
    restored = orch_registry("repair", "--restore", "--base", orch_workspace)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert f"did: rebuilt {path} from 1 task registries" in restored.stdout, restored.stdout
    if bad is not None:
        _assert_kept_in_backups(orch_workspace, path.name, bad)
    report = _assert_healthy(orch_workspace)
    assert report["agents"] == 3
    glob = Registry(orch_workspace).read_global()
    assert {a: v["status"] for a, v in glob["agents"].items()} == {
        c["alpha"]: "running", c["beta"]: "running", c["gamma"]: "terminated"}


def test_repair_restore_of_a_corrupt_task_registry_keeps_the_agent_its_last_write_deployed(orch_workspace: Path,
                                                                                            orch_chaos: Chaos) -> None:
    c = _workspace(orch_chaos, orch_workspace)
    w = orch_chaos.worker(ReferenceAdapter(orch_workspace))
    assert w.registry.reconcile(c["task"])  # gamma reaped, on the record
    delta = w.registry.deploy(c["task"], "delta")  # the task registry's last write before it is corrupted
    assert delta is not None
    orch_chaos.corrupt(c["task_file"], "truncated")
    restored = orch_registry("repair", "--restore", "--base", orch_workspace)
    assert "restored" in restored.stdout, restored.stdout
    orch_chaos.check(ReferenceAdapter(orch_workspace))  # every ok deploy present, delta's included
    _assert_healthy(orch_workspace)  # and so delta's live session is no leak
