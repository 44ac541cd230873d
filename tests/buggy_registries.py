"""Registries with one known bug each, kept as fixtures: the harness must fail every one of them.

Each factory takes a workspace and returns an adapter, so a test names them as ``--orch-impl=buggy_registries:NAME``.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pytest_orch.adapter import ReferenceAdapter
from registry import model
from registry.errors import DuplicateAgent, LimitExceeded
from registry.model import ACTIVE, TERMINAL
from registry.ops import Registry, now
from registry.store import JsonFile


class _UnlockedFile(JsonFile):
    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        yield  # the bug: every read-modify-write runs without the lock


class _UnlockedRegistry(Registry):
    def __init__(self, base: Path) -> None:
        super().__init__(base, heal=False)
        self.global_file = _UnlockedFile(self.global_file.path, validate=model.global_shape_problems)

    def task_file(self, task_id: str) -> JsonFile:
        if task_id not in self._files:
            model.validate_name("task id", task_id)
            self._files[task_id] = _UnlockedFile(self.base / task_id / model.TASK_FILE,
                                                 validate=model.task_shape_problems)
        return self._files[task_id]


class _DoubleCountingRegistry(Registry):
    @staticmethod
    def _finish(task: dict[str, Any], agent: dict[str, Any], status: str, stamp: str, reason: str | None) -> None:
        was_active = agent.get("status") in ACTIVE
        Registry._finish(task, agent, status, stamp, reason)
        if was_active and status != "completed":
            task["active_count"] -= 1  # the bug: a termination is counted twice


class _ForgetfulRegistry(Registry):
    def _commit(self, task_file: JsonFile, task: dict[str, Any], glob: dict[str, Any],
                data: bytes | None = None) -> None:
        known = sum(1 for view in glob["agents"].values() if view.get("task_id") == task["task_id"])
        if task["task_id"] in glob["tasks"] and known == len(task["agents"]):
            task_file.write(task)  # the bug: a change of status never reaches the global registry
            return
        super()._commit(task_file, task, glob, data)


class _CheckThenActRegistry:
    """A small registry that checks deduplication and limits on a read taken before it locks, then inserts."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def _file(self, task_id: str) -> JsonFile:
        return JsonFile(self.base / task_id / model.TASK_FILE, validate=model.task_shape_problems)

    def create_task(self, description: str, *, max_agents: int, max_concurrent: int, max_depth: int) -> str:
        task_id = f"TASK-{secrets.token_hex(4)}"
        file = self._file(task_id)
        file.path.parent.mkdir(parents=True)
        with file.transaction(default=lambda: model.new_task_document(
                task_id, description, priority="P1", max_agents=max_agents, max_depth=max_depth,
                max_concurrent=max_concurrent, workspace="", workspace_base=str(self.base), client_cwd=None,
                now=now())):
            pass
        return task_id

    def deploy(self, task_id: str, agent_type: str, parent: str = "orchestrator") -> str:
        from pytest_orch.adapter import Rejected

        seen = self._file(task_id).read()  # the bug: the checks below trust this unlocked, soon stale read
        active = [a for a in seen["agents"] if a["status"] in ACTIVE]
        if any(a["type"] == agent_type for a in active):
            raise Rejected(str(DuplicateAgent(f"a {agent_type} agent is active")))
        if len(active) >= seen["max_concurrent"] or len(seen["agents"]) >= seen["max_agents"]:
            raise Rejected(str(LimitExceeded("limit")))
        depth = 1 if parent == "orchestrator" else next(a["depth"] for a in seen["agents"] if a["id"] == parent) + 1
        if depth > seen["max_depth"]:
            raise Rejected(str(LimitExceeded("too deep")))
        agent_id = f"{agent_type}-{secrets.token_hex(3)}"
        with self._file(task_id).transaction() as doc:
            doc["agents"].append({"id": agent_id, "type": agent_type, "tmux_session": f"agent_{agent_id}",
                                  "parent": parent, "depth": depth, "status": "running", "progress": 0})
            doc["agent_hierarchy"].setdefault(parent, []).append(agent_id)
            model.recompute_task_counters(doc)
        return agent_id

    def update(self, task_id: str, agent_id: str, status: str, progress: int) -> None:
        from pytest_orch.adapter import Rejected

        with self._file(task_id).transaction() as doc:
            agent = next(a for a in doc["agents"] if a["id"] == agent_id)
            if agent["status"] in TERMINAL:
                raise Rejected(f"{agent_id} is {agent['status']}")
            agent.update(status=status, progress=progress)
            model.recompute_task_counters(doc)

    def kill(self, task_id: str, agent_id: str) -> None:
        from pytest_orch.adapter import Rejected

        with self._file(task_id).transaction() as doc:
            agent = next(a for a in doc["agents"] if a["id"] == agent_id)
            if agent["status"] in TERMINAL:
                raise Rejected(f"{agent_id} is {agent['status']}")
            agent["status"] = "terminated"
            model.recompute_task_counters(doc)

    def reconcile(self, task_id: str) -> None:
        pass  # it starts no sessions, so none can vanish

    def read_task(self, task_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._file(task_id).read()
        return doc

    def read_global(self) -> None:
        return None


def _adapter(registry: Any) -> ReferenceAdapter:
    adapter = ReferenceAdapter.__new__(ReferenceAdapter)
    adapter.reg = registry
    return adapter


def unlocked(workspace: Path) -> ReferenceAdapter:
    """The reference with its locks taken out: updates and inserts get lost."""
    return _adapter(_UnlockedRegistry(workspace))


def double_counting(workspace: Path) -> ReferenceAdapter:
    """The reference, but a kill or failure decrements active_count twice: the counters drift."""
    return _adapter(_DoubleCountingRegistry(workspace))


def forgetful(workspace: Path) -> ReferenceAdapter:
    """The reference, but status changes never reach the global registry: task and global disagree."""
    return _adapter(_ForgetfulRegistry(workspace))


def check_then_act(workspace: Path) -> _CheckThenActRegistry:
    """Checks deduplication and limits outside the lock: duplicates and broken limits under concurrency."""
    return _CheckThenActRegistry(workspace)
