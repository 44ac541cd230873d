"""The old, unlocked registry, kept as a baseline for the harness and the benchmarks.  Never use it.

It reproduces what the orchestrator did before the fix: no locking at all; ``deploy`` reads the task registry four
times and the global registry once, checks its limits on the first (by then stale) read, and inserts into the third;
files are written in place with ``open(path, "w")`` and ``json.dump``; the task and global registries are written
separately; ids are ``<type>-<HHMMSS>-<6 hex>`` with no uniqueness check; and ``reconcile`` takes any failure to find
a session as proof that it is gone.  Run serially it behaves like the reference (without deduplication, which the old
code did not have); run concurrently it loses updates.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

from . import model
from .errors import InvalidTransition, LimitExceeded, UnknownAgent, UnknownTask
from .model import ACTIVE, ORCHESTRATOR, STATUSES, TERMINAL
from .sessions import TmuxSessions, agent_command


def _load(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def _save(path: Path, doc: Any) -> None:
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=2)


def _now() -> str:
    return datetime.now().isoformat()


class LegacyRegistry:
    """The old behaviour, with the reference's method names so the two can be swapped in tests and benchmarks."""

    def __init__(self, base: str | Path, *, sessions: TmuxSessions | None = None,
                 agent_command: str | None = None) -> None:
        self.base = Path(base).absolute()
        self.sessions = sessions if sessions is not None else TmuxSessions()
        self.agent_command = agent_command
        self.global_path = self.base / model.GLOBAL_DIR / model.GLOBAL_FILE

    def task_path(self, task_id: str) -> Path:
        return self.base / task_id / model.TASK_FILE

    def _load_task(self, task_id: str) -> dict[str, Any]:
        path = self.task_path(task_id)
        if not path.exists():
            raise UnknownTask(f"no task {task_id}", task_id=task_id)
        doc: dict[str, Any] = _load(path)
        return doc

    def _load_global(self) -> dict[str, Any]:
        if not self.global_path.exists():
            self.global_path.parent.mkdir(parents=True, exist_ok=True)
            return model.new_global_document(_now())
        doc: dict[str, Any] = _load(self.global_path)
        return doc

    def create_task(self, description: str, priority: str = "P1", max_agents: int = model.DEFAULT_MAX_AGENTS,
                    max_depth: int = model.DEFAULT_MAX_DEPTH,
                    max_concurrent: int = model.DEFAULT_MAX_CONCURRENT) -> str:
        task_id = f"TASK-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"
        path = self.task_path(task_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        stamp = _now()
        _save(path, model.new_task_document(
            task_id, description, priority=priority, max_agents=max_agents, max_depth=max_depth,
            max_concurrent=max_concurrent, workspace=str(path.parent), workspace_base=str(self.base),
            client_cwd=None, now=stamp))
        glob = self._load_global()
        glob["tasks"][task_id] = {"description": description, "created_at": stamp, "status": "INITIALIZED"}
        glob["total_tasks"] = glob.get("total_tasks", 0) + 1
        glob["active_tasks"] = glob.get("active_tasks", 0) + 1
        _save(self.global_path, glob)
        return task_id

    def deploy(self, task_id: str, agent_type: str, prompt: str = "", parent: str = ORCHESTRATOR) -> dict[str, Any]:
        # Load 1: does the task exist, and are we within the limits?  (Checked here, used much later.)
        task = self._load_task(task_id)
        if task["active_count"] >= task.get("max_concurrent", model.DEFAULT_MAX_CONCURRENT):
            raise LimitExceeded(f"too many active agents in {task_id}", task_id=task_id, limit="max_concurrent")
        if task["total_spawned"] >= task.get("max_agents", model.DEFAULT_MAX_AGENTS):
            raise LimitExceeded(f"too many agents in {task_id}", task_id=task_id, limit="max_agents")
        # Load 2: the parent's depth (read even for the orchestrator, as the old code did).
        depth = 1
        siblings = self._load_task(task_id)["agents"]
        if parent != ORCHESTRATOR:
            parents = [a for a in siblings if a["id"] == parent]
            if not parents:
                raise UnknownAgent(f"no parent {parent} in {task_id}", task_id=task_id, agent_id=parent)
            depth = parents[0]["depth"] + 1
            if depth > task.get("max_depth", model.DEFAULT_MAX_DEPTH):
                raise LimitExceeded(f"depth {depth} too deep in {task_id}", task_id=task_id, limit="max_depth")
        agent_id = f"{agent_type}-{datetime.now():%H%M%S}-{secrets.token_hex(3)}"
        session = model.session_name(agent_id)
        self.sessions.start(session, agent_command(self.agent_command, base=self.base, task_id=task_id,
                                                   agent_id=agent_id))
        stamp = _now()
        agent = {"id": agent_id, "type": agent_type, "tmux_session": session, "parent": parent, "depth": depth,
                 "status": "running", "started_at": stamp, "progress": 0, "last_update": stamp, "prompt": prompt}
        # Load 3: the registry the agent is inserted into.
        registry = self._load_task(task_id)
        registry["agents"].append(agent)
        registry.setdefault("agent_hierarchy", {}).setdefault(parent, []).append(agent_id)
        registry["total_spawned"] += 1
        registry["active_count"] += 1
        _save(self.task_path(task_id), registry)
        # Load 4: re-read to mirror the task into the global registry.
        self._load_task(task_id)
        glob = self._load_global()
        glob["agents"][agent_id] = {"task_id": task_id, "type": agent_type, "parent": parent, "started_at": stamp,
                                    "tmux_session": session, "status": "running", "last_update": stamp}
        glob["total_agents_spawned"] = glob.get("total_agents_spawned", 0) + 1
        glob["active_agents"] = glob.get("active_agents", 0) + 1
        _save(self.global_path, glob)
        return agent

    def update(self, task_id: str, agent_id: str, status: str | None = None, message: str | None = None,
               progress: int | None = None) -> dict[str, Any]:
        if status is not None and status not in STATUSES:
            raise InvalidTransition(f"unknown status {status!r}", status=status)
        registry = self._load_task(task_id)
        agent = self._agent(registry, agent_id)
        old = agent["status"]
        if old in TERMINAL:
            raise InvalidTransition(f"agent {agent_id} is {old}", task_id=task_id, agent_id=agent_id)
        new = status or old
        stamp = _now()
        agent.update(status=new, last_update=stamp)
        if progress is not None:
            agent["progress"] = progress
        if message is not None:
            agent["last_message"] = message
        if new in TERMINAL:
            registry["active_count"] -= 1
            if new == "completed":
                registry["completed_count"] += 1
                agent["completed_at"] = stamp
            else:
                agent["terminated_at"] = stamp
        _save(self.task_path(task_id), registry)
        self._mirror(agent_id, old, new, stamp)
        return agent

    def kill(self, task_id: str, agent_id: str, reason: str = "killed") -> dict[str, Any]:
        registry = self._load_task(task_id)
        agent = self._agent(registry, agent_id)
        if agent["status"] in TERMINAL:
            raise InvalidTransition(f"agent {agent_id} is already {agent['status']}", task_id=task_id,
                                    agent_id=agent_id)
        self.sessions.kill(agent["tmux_session"])
        old, stamp = agent["status"], _now()
        agent.update(status="terminated", terminated_at=stamp, termination_reason=reason, last_update=stamp)
        registry["active_count"] -= 1
        _save(self.task_path(task_id), registry)
        self._mirror(agent_id, old, "terminated", stamp)
        return agent

    def reconcile(self, task_id: str) -> list[str]:
        registry = self._load_task(task_id)
        reaped = []
        for agent in registry["agents"]:
            if agent["status"] in ACTIVE and not self._has_session(agent["tmux_session"]):
                stamp = _now()
                agent.update(status="terminated", terminated_at=stamp, termination_reason="session_not_found",
                             last_update=stamp)
                registry["active_count"] -= 1
                reaped.append(agent["id"])
        if reaped:
            _save(self.task_path(task_id), registry)
            for agent_id in reaped:
                self._mirror(agent_id, "running", "terminated", _now())
        return reaped

    def read_task(self, task_id: str) -> dict[str, Any]:
        return self._load_task(task_id)

    def read_global(self) -> dict[str, Any]:
        return self._load_global()

    # The old helpers -------------------------------------------------------------------------------------------

    def _has_session(self, name: str) -> bool:
        try:
            return self.sessions.server.has_session(name)
        except Exception:  # the old bug: any failure to ask tmux counts as "the session is gone"
            return False

    def _mirror(self, agent_id: str, old: str, new: str, stamp: str) -> None:
        glob = self._load_global()
        entry = glob["agents"].get(agent_id)
        if entry is not None:
            entry.update(status=new, last_update=stamp)
            if old in ACTIVE and new in TERMINAL:
                glob["active_agents"] = glob.get("active_agents", 0) - 1
            _save(self.global_path, glob)

    @staticmethod
    def _agent(registry: dict[str, Any], agent_id: str) -> dict[str, Any]:
        for agent in registry["agents"]:
            if agent["id"] == agent_id:
                found: dict[str, Any] = agent
                return found
        raise UnknownAgent(f"no agent {agent_id}", agent_id=agent_id)
