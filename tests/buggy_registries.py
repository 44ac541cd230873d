"""Registries with one known bug each, kept as fixtures: the harness must fail every one of them.

Each factory takes a workspace and returns an adapter, so a test names them as ``--orch-impl=buggy_registries:NAME``.
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import multiprocess  # type: ignore[import-untyped]
from correct_registries import (
    IdempotentKill,
    Plain,
    Projects,
    ReapRunning,
    TaskRegistry,
    TerminalNotFinal,
    WithGlobal,
    live_sessions,
    locked,
    read_json,
    start_session,
)

from pytest_orch import Rules
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
        model.finish_agent(task, agent, status, stamp, reason)
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

    #: It starts no sessions, so reconcile has nothing to reap.
    rules = Rules(reaped=frozenset())

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

        if status not in ACTIVE | TERMINAL:
            raise Rejected(f"{status!r} is not a status")
        with self._file(task_id).transaction() as doc:
            agent = self._agent(doc, agent_id)
            if agent["status"] in TERMINAL:
                raise Rejected(f"{agent_id} is {agent['status']}")
            agent.update(status=status, progress=progress)
            model.recompute_task_counters(doc)

    def kill(self, task_id: str, agent_id: str) -> None:
        from pytest_orch.adapter import Rejected

        with self._file(task_id).transaction() as doc:
            agent = self._agent(doc, agent_id)
            if agent["status"] in TERMINAL:
                raise Rejected(f"{agent_id} is {agent['status']}")
            agent["status"] = "terminated"
            model.recompute_task_counters(doc)

    @staticmethod
    def _agent(doc: dict[str, Any], agent_id: str) -> dict[str, Any]:
        from pytest_orch.adapter import Rejected

        agent: dict[str, Any] | None = next((a for a in doc["agents"] if a["id"] == agent_id), None)
        if agent is None:
            raise Rejected(f"no agent {agent_id}")
        return agent

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


# -- registries written from the contract (tests/correct_registries.py), each with one bug injected ------------------


class _LostWriteUpdate(TaskRegistry):
    def update(self, task_id: str, agent_id: str, status: str, progress: int) -> None:
        path = self._path(task_id)
        doc = read_json(path)  # the bug: the read is taken without the lock...
        agent = self._set_status(doc, agent_id, status, progress)
        with locked(path):
            self._commit(path, doc, [agent])  # ...and written back under it, over whatever happened in between


class _IdempotentKillLostWrite(_LostWriteUpdate, IdempotentKill):
    pass


class _ReapRunningLostWrite(_LostWriteUpdate, ReapRunning):
    pass


class _TerminalNotFinalLostWrite(_LostWriteUpdate, TerminalNotFinal):
    pass


def idempotent_kill_lost_write(workspace: Path) -> _IdempotentKillLostWrite:
    """correct_registries:idempotent_kill (declaring its rules), but update reads outside the lock: lost updates."""
    return _IdempotentKillLostWrite(workspace)


def reap_running_to_completed_lost_write(workspace: Path) -> _ReapRunningLostWrite:
    """correct_registries:reap_running_to_completed, but update reads outside the lock: lost updates."""
    return _ReapRunningLostWrite(workspace)


def terminal_not_final_lost_write(workspace: Path) -> _TerminalNotFinalLostWrite:
    """correct_registries:terminal_not_final, but update reads outside the lock: lost updates."""
    return _TerminalNotFinalLostWrite(workspace)


class _ProjectsFlushAfterUnlock(Projects):
    def __init__(self, workspace: Path) -> None:
        super().__init__(workspace)
        self._unflushed: list[IO[str]] = []

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            with locked(self.path):
                yield
        finally:
            for fh in self._unflushed:
                fh.close()  # the bug: the write reaches the file only now, after the lock is released
            self._unflushed.clear()

    def _save(self, doc: dict[str, Any]) -> None:
        fh = open(self.path, "w")  # noqa: SIM115 - in place: truncated now, filled at close
        json.dump(doc, fh, indent=2)
        self._unflushed.append(fh)


class _ProjectsLostWrite(Projects):
    def update(self, task_id: str, agent_id: str, status: str, progress: int) -> None:
        doc = self._load()  # the bug: the read is taken without the lock...
        self._command(doc, task_id, agent_id, status)
        with self._locked():
            self._save(doc)  # ...and written back under it


def projects_flush_after_unlock(workspace: Path) -> _ProjectsFlushAfterUnlock:
    """correct_registries:projects, but writes in place and flushes after unlocking: readers see torn files."""
    return _ProjectsFlushAfterUnlock(workspace)


def projects_lost_write(workspace: Path) -> _ProjectsLostWrite:
    """correct_registries:projects, but update reads outside the lock: lost updates (and lost inserts)."""
    return _ProjectsLostWrite(workspace)


class _ReconcileAlwaysRaises(Plain):
    def reconcile(self, task_id: str) -> None:
        raise RuntimeError("reconcile is broken")  # the bug


def reconcile_always_raises(workspace: Path) -> _ReconcileAlwaysRaises:
    """correct_registries:plain, but every reconcile raises RuntimeError (issue 18)."""
    return _ReconcileAlwaysRaises(workspace)


def in_swarm_worker() -> bool:
    """Whether this process is a swarm worker: the swarm forks them with ``multiprocess``, named ``orch-worker-N``."""
    return str(multiprocess.current_process().name).startswith("orch-worker-")


class _DeployCrashesSometimes(Plain):
    def __init__(self, workspace: Path) -> None:
        super().__init__(workspace)
        self._rng = random.Random()  # seeded from the OS in each process, so workers do not crash in step

    def deploy(self, task_id: str, agent_type: str, parent: str = "orchestrator") -> str:
        if in_swarm_worker() and self._rng.random() < 1 / 3:  # the bug, before anything is written
            raise json.JSONDecodeError("Expecting value", "", 0)
        return super().deploy(task_id, agent_type, parent)


def deploy_crashes_sometimes(workspace: Path) -> _DeployCrashesSometimes:
    """correct_registries:plain, but a third of deploys in swarm workers raise JSONDecodeError, writing nothing."""
    return _DeployCrashesSometimes(workspace)


class _LeaksSessionOnRefusal(Plain):
    def deploy(self, task_id: str, agent_type: str, parent: str = "orchestrator") -> str:
        path = self._path(task_id)
        agent_id = f"{agent_type}-{secrets.token_hex(3)}"
        start_session(f"agent_{agent_id}")  # the bug: the session starts before the checks, and outlives a refusal
        with locked(path):
            doc = read_json(path)
            depth = self._admit(doc, agent_type, parent)
            agent = self._register(doc, agent_id, agent_type, parent, depth)
            self._commit(path, doc, [agent])
        return agent_id


def leaks_session_on_refusal(workspace: Path) -> _LeaksSessionOnRefusal:
    """correct_registries:plain, but a refused deploy leaves the tmux session it started running."""
    return _LeaksSessionOnRefusal(workspace)


class _AdmitsBeforeLock(Plain):
    def deploy(self, task_id: str, agent_type: str, parent: str = "orchestrator") -> str:
        path = self._path(task_id)
        depth = self._admit(read_json(path), agent_type, parent)  # the bug: admitted on a read taken unlocked
        agent_id = f"{agent_type}-{secrets.token_hex(3)}"
        with locked(path):
            doc = read_json(path)  # a fresh read: nothing is lost, but the limits were judged on a stale one
            start_session(f"agent_{agent_id}")
            agent = self._register(doc, agent_id, agent_type, parent, depth)
            self._commit(path, doc, [agent])
        return agent_id


def admits_before_lock(workspace: Path) -> _AdmitsBeforeLock:
    """correct_registries:plain, but a deploy checks the limits on a read taken before the lock: limits breached,
    nothing lost."""
    return _AdmitsBeforeLock(workspace)


class _ReconcileListsBeforeLock(Plain):
    def reconcile(self, task_id: str) -> None:
        path = self._path(task_id)
        live = live_sessions()  # the bug: listed before the lock; an agent deployed meanwhile is not in it
        with locked(path):
            doc = read_json(path)
            reaped = self._reap(doc, live)
            if reaped:
                self._commit(path, doc, reaped)


def reconcile_lists_before_lock(workspace: Path) -> _ReconcileListsBeforeLock:
    """correct_registries:plain, but reconcile lists sessions before locking: agents deployed meanwhile are reaped."""
    return _ReconcileListsBeforeLock(workspace)


class _GlobalLockDropped(WithGlobal):
    def _global_lock(self, path: Path) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the bug: the global file's read-modify-write runs without its lock


def global_lock_dropped(workspace: Path) -> _GlobalLockDropped:
    """correct_registries:with_global, but the global file is updated without its lock: global entries get lost."""
    return _GlobalLockDropped(workspace)


class _GlobalUnlockedRegistry(Registry):
    """The reference, but the global registry is read, changed and written without its own lock (the task lock is
    still taken): only writers of different tasks race on it."""

    def __init__(self, base: Path) -> None:
        super().__init__(base, heal=False)
        self.global_file = _UnlockedFile(self.global_file.path, validate=model.global_shape_problems)


def reference_global_unlocked(workspace: Path) -> ReferenceAdapter:
    """The reference with the global registry's lock removed: status changes of several tasks at once get lost."""
    return _adapter(_GlobalUnlockedRegistry(workspace))
