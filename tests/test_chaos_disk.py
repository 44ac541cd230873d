"""A full disk at the temp write: injected as OSError(ENOSPC) through the crash hook, no real disk is filled.

When the first file an operation writes cannot be written, the registry on disk must stay byte-identical, the
operation must fail cleanly (WriteFailed, applied False: the harness records ``fail``), no temp file may be left, and
no tmux session may change.  When the task registry was written and only the global registry runs out of space, the
operation is made (the task registry is the source of truth): it must say "unknown" (``info``), and a registry opened
afterwards must agree with itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_orch.adapter import ReferenceAdapter
from pytest_orch.chaos import Chaos
from pytest_orch.swarm import Worker
from registry import TmuxSessions, check

OPERATIONS: dict[str, Callable[[Worker, dict[str, Any]], Any]] = {
    "create_task": lambda w, c: w.registry.create_task("another", max_agents=9, max_concurrent=9, max_depth=3),
    "deploy": lambda w, c: w.registry.deploy(c["task"], "gamma"),
    "update with a status change": lambda w, c: w.registry.update(c["task"], c["alpha"], "blocked", 60),
    "update of progress only": lambda w, c: w.registry.update(c["task"], c["alpha"], "running", 40),
    "kill": lambda w, c: w.registry.kill(c["task"], c["alpha"]),
    "reconcile": lambda w, c: w.registry.reconcile(c["task"]),
}

def _workspace(chaos: Chaos, base: Path) -> tuple[Worker, dict[str, Any]]:
    """A task with agents alpha and beta, beta a zombie (its session killed), every call on the chaos tape."""
    w = chaos.worker(ReferenceAdapter(base))
    task = w.registry.create_task("full disk", max_agents=9, max_concurrent=9, max_depth=3)
    assert task is not None
    context = {"task": task, "alpha": w.registry.deploy(task, "alpha"), "beta": w.registry.deploy(task, "beta")}
    assert None not in context.values()
    assert w.kill_session(f"agent_{context['beta']}")
    return w, context


def _files(base: Path) -> dict[str, bytes]:
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*.json"))}


@pytest.mark.parametrize("at", ["before_temp_write", "after_temp_write"])
@pytest.mark.parametrize("operation", [name for name in OPERATIONS if name != "kill"])
def test_a_full_disk_at_the_first_temp_write_fails_the_operation_cleanly_and_changes_nothing(
        orch_workspace: Path, orch_chaos: Chaos, operation: str, at: str) -> None:
    w, context = _workspace(orch_chaos, orch_workspace)
    before = _files(orch_workspace)
    sessions = TmuxSessions().alive()
    with orch_chaos.disk_full(at=at, file="task registry"):  # every operation writes its task registry first
        OPERATIONS[operation](w, context)
    (op,) = [op for op in orch_chaos.history().calls if op.process == w.process][-1:]
    assert op.outcome == "fail", op
    assert (op.error or "").startswith("WriteFailed: writing "), op.error
    assert "No space left on device. The registry is unchanged." in (op.error or "")
    assert _files(orch_workspace) == before, "a registry file changed although its write failed"
    assert not list(orch_workspace.rglob("*.tmp")), "a temp file was left behind"
    assert TmuxSessions().alive() == sessions, "a tmux session was started or killed by an operation that failed"
    # A status call afterwards, then every check of the harness on what was recorded, through a fresh open.
    w.registry.reconcile(context["task"])
    report = orch_chaos.check(ReferenceAdapter(orch_workspace))
    assert "enospc(point=" in "\n".join(report.faults())
    assert check(orch_workspace).healthy, check(orch_workspace).render()


@pytest.mark.parametrize("at", ["before_temp_write", "after_temp_write"])
def test_a_full_disk_when_kill_writes_leaves_the_registry_unchanged_but_says_unknown_since_the_session_is_gone(
        orch_workspace: Path, orch_chaos: Chaos, at: str) -> None:
    """kill ends the session first (so a failure leaves a zombie, never a 'terminated' agent that runs on)."""
    w, context = _workspace(orch_chaos, orch_workspace)
    before = _files(orch_workspace)
    with orch_chaos.disk_full(at=at, file="task registry"):
        OPERATIONS["kill"](w, context)
    (op,) = [op for op in orch_chaos.history().calls if op.process == w.process][-1:]
    assert op.outcome == "info", op  # not "certainly not applied": the session was killed
    assert "No space left on device" in (op.error or "")
    assert _files(orch_workspace) == before
    assert not list(orch_workspace.rglob("*.tmp")), "a temp file was left behind"
    assert check(orch_workspace).zombies == sorted([context["alpha"], context["beta"]])
    w.registry.reconcile(context["task"])
    orch_chaos.check(ReferenceAdapter(orch_workspace))
    assert check(orch_workspace).healthy, check(orch_workspace).render()


@pytest.mark.parametrize("at", ["before_temp_write", "after_temp_write"])
@pytest.mark.parametrize("operation", ["deploy", "update with a status change"])
def test_a_full_disk_at_the_global_write_after_the_task_write_reports_the_operation_unknown_and_heals_on_open(
        orch_workspace: Path, orch_chaos: Chaos, operation: str, at: str) -> None:
    w, context = _workspace(orch_chaos, orch_workspace)
    global_file = orch_workspace / "registry" / "GLOBAL_REGISTRY.json"
    before = global_file.read_bytes()
    with orch_chaos.disk_full(at=at, file="global registry"):
        OPERATIONS[operation](w, context)
    (op,) = [op for op in orch_chaos.history().calls if op.process == w.process][-1:]
    assert op.outcome == "info", op
    assert "was written but" in (op.error or ""), op.error
    assert global_file.read_bytes() == before
    assert not list(orch_workspace.rglob("*.tmp")), "a temp file was left behind"
    reopened = ReferenceAdapter(orch_workspace)  # heals: the global registry catches up with the task
    orch_chaos.check(reopened)
    w.registry.reconcile(context["task"])
    assert check(orch_workspace).healthy, check(orch_workspace).render()
