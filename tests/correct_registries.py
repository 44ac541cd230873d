"""Correct registries that differ from the reference where legitimate designs differ, kept as fixtures.

Written from the adapter contract alone (not from :mod:`registry`): JSON files, ``fcntl.flock`` held across every
read-modify-write, writes via a temp file, fsync and ``os.replace``, one tmux session per agent.  Each factory takes a
workspace and returns an adapter declaring its ``rules``; the harness must pass every one of them.  The ``_undeclared``
factories are the same registries declaring nothing, which the harness should fail (they break the reference's rules).
Tests name them ``--orch-impl=correct_registries:NAME`` with tests/ on PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import subprocess
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pytest_orch import Rules
from pytest_orch.adapter import Rejected

ACTIVE = frozenset({"running", "working", "blocked"})
TERMINAL = frozenset({"completed", "terminated", "error", "failed"})
ORCHESTRATOR = "orchestrator"
TASK_FILE = "AGENT_REGISTRY.json"
GLOBAL_FILE = Path("registry") / "GLOBAL_REGISTRY.json"
#: tmux's answers that mean "there is no such session" (for kill) or "there are no sessions" (for list).
GONE = ("can't find session", "no server running", "no current session", "error connecting to",
        "server exited unexpectedly", "no current target")


# -- files ------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def locked(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[None]:
    """Hold a flock on ``<path>.lock`` (a separate file: the data file is replaced on every write)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_json(path: Path, default: dict[str, Any] | None = None) -> dict[str, Any]:
    """The document at *path*; *default* when there is no file (a missing file is an error without one)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if default is None:
            raise
        return default
    doc: dict[str, Any] = json.loads(text)
    return doc


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write *doc* atomically: a temp file in the same directory, flushed and fsynced, then renamed over *path*."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(2)}.tmp")
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


# -- tmux -------------------------------------------------------------------------------------------------------------

def tmux(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30, check=False)


def start_session(name: str) -> None:
    command = os.environ.get("ORCH_AGENT_COMMAND", "sleep 86400")
    done = tmux("new-session", "-d", "-s", name, command)
    if done.returncode:
        raise RuntimeError(f"tmux new-session -s {name} failed: {done.stderr.strip()}")


def kill_session(name: str) -> None:
    """Kill session *name*; one that is already gone is fine."""
    done = tmux("kill-session", "-t", f"={name}")
    if done.returncode and not any(s in done.stderr for s in GONE):
        raise RuntimeError(f"tmux kill-session -t {name} failed: {done.stderr.strip()}")


def live_sessions() -> set[str]:
    """The names of the sessions tmux runs (no server: none)."""
    done = tmux("list-sessions", "-F", "#{session_name}")
    if done.returncode:
        if any(s in done.stderr for s in GONE):
            return set()
        raise RuntimeError(f"tmux list-sessions failed: {done.stderr.strip()}")
    return set(done.stdout.split())


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


# -- one file per task ------------------------------------------------------------------------------------------------

class TaskRegistry:
    """A task per directory, ``<workspace>/<task>/AGENT_REGISTRY.json``, under its own flock.

    What it does where designs differ is set by the class attributes below (the reference's rules by default); the
    adapters declaring ``rules`` are the subclasses further down.
    """

    kill_of_terminal = "refused"  # "refused" (Rejected) or "ignored" (ok, nothing changes)
    reaped: frozenset[str] = ACTIVE  # the statuses reconcile reaps when the session is gone...
    reaped_to = "terminated"  # ...and what it sets
    terminal_is_final = True  # False: an update moves a terminal agent to any status
    enforce_max_depth = True
    global_registry = False  # keep <workspace>/registry/GLOBAL_REGISTRY.json

    def __init__(self, workspace: Path) -> None:
        self.workspace = Path(workspace)
        self.workspace.mkdir(parents=True, exist_ok=True)
        if self.global_registry:
            (self.workspace / GLOBAL_FILE).parent.mkdir(exist_ok=True)

    def _path(self, task_id: str) -> Path:
        if not task_id or not all(c.isalnum() or c in "-_" for c in task_id):
            raise Rejected(f"{task_id!r} is not a task id")
        path = self.workspace / task_id / TASK_FILE
        if not path.exists():
            raise Rejected(f"no task {task_id}")
        return path

    # -- the contract ---------------------------------------------------------------------------------------------

    def create_task(self, description: str, *, max_agents: int, max_concurrent: int, max_depth: int) -> str:
        task_id = new_id("task")
        path = self.workspace / task_id / TASK_FILE
        path.parent.mkdir()
        doc = {"task_id": task_id, "description": description, "agents": [], "agent_hierarchy": {},
               "max_agents": max_agents, "max_concurrent": max_concurrent, "max_depth": max_depth,
               "total_spawned": 0, "active_count": 0, "completed_count": 0}
        with locked(path):
            write_json(path, doc)
            self._publish(task_id, [])
        return task_id

    def deploy(self, task_id: str, agent_type: str, parent: str = ORCHESTRATOR) -> str:
        path = self._path(task_id)
        agent_id = new_id(agent_type)
        with locked(path):
            doc = read_json(path)
            depth = self._admit(doc, agent_type, parent)
            start_session(f"agent_{agent_id}")
            try:
                agent = self._register(doc, agent_id, agent_type, parent, depth)
                self._commit(path, doc, [agent])
            except BaseException:
                kill_session(f"agent_{agent_id}")
                raise
        return agent_id

    def update(self, task_id: str, agent_id: str, status: str, progress: int) -> None:
        path = self._path(task_id)
        with locked(path):
            doc = read_json(path)
            agent = self._set_status(doc, agent_id, status, progress)
            self._commit(path, doc, [agent])

    def kill(self, task_id: str, agent_id: str) -> None:
        path = self._path(task_id)
        with locked(path):
            doc = read_json(path)
            agent = self._agent(doc, agent_id)
            if agent["status"] not in ACTIVE:
                if self.kill_of_terminal == "ignored":
                    return
                raise Rejected(f"{agent_id} is already {agent['status']}")
            agent["status"] = "terminated"
            self._commit(path, doc, [agent])
            kill_session(agent["tmux_session"])

    def reconcile(self, task_id: str) -> None:
        path = self._path(task_id)
        with locked(path):
            doc = read_json(path)
            reaped = self._reap(doc, live_sessions())
            if reaped:
                self._commit(path, doc, reaped)

    def read_task(self, task_id: str) -> dict[str, Any]:
        return read_json(self._path(task_id))

    def read_global(self) -> dict[str, Any] | None:
        if not self.global_registry:
            return None
        return read_json(self.workspace / GLOBAL_FILE, self._empty_global())

    # -- the steps ------------------------------------------------------------------------------------------------

    @staticmethod
    def _agent(doc: dict[str, Any], agent_id: str) -> dict[str, Any]:
        for agent in doc["agents"]:
            if agent["id"] == agent_id:
                return agent  # type: ignore[no-any-return]
        raise Rejected(f"{agent_id} is not an agent of {doc['task_id']}")

    def _admit(self, doc: dict[str, Any], agent_type: str, parent: str) -> int:
        """The new agent's depth, or Rejected when the task refuses it."""
        depth = 1 if parent == ORCHESTRATOR else self._agent(doc, parent)["depth"] + 1
        active = [a for a in doc["agents"] if a["status"] in ACTIVE]
        if any(a["type"] == agent_type for a in active):
            raise Rejected(f"a {agent_type} agent is already active")
        if len(doc["agents"]) >= doc["max_agents"]:
            raise Rejected(f"max_agents {doc['max_agents']} reached")
        if len(active) >= doc["max_concurrent"]:
            raise Rejected(f"max_concurrent {doc['max_concurrent']} reached")
        if self.enforce_max_depth and depth > doc["max_depth"]:
            raise Rejected(f"depth {depth} is over max_depth {doc['max_depth']}")
        return int(depth)

    @staticmethod
    def _register(doc: dict[str, Any], agent_id: str, agent_type: str, parent: str, depth: int) -> dict[str, Any]:
        agent = {"id": agent_id, "type": agent_type, "parent": parent, "depth": depth, "status": "running",
                 "progress": 0, "tmux_session": f"agent_{agent_id}"}
        doc["agents"].append(agent)
        doc["agent_hierarchy"].setdefault(parent, []).append(agent_id)
        return agent

    def _set_status(self, doc: dict[str, Any], agent_id: str, status: str, progress: int) -> dict[str, Any]:
        agent = self._agent(doc, agent_id)
        if status not in ACTIVE | TERMINAL:
            raise Rejected(f"{status!r} is not a status")
        if agent["status"] not in ACTIVE:
            if self.terminal_is_final:
                raise Rejected(f"{agent_id} is already {agent['status']}")
            if status in ACTIVE:  # active again: admitted as a deploy is, under the same limits
                others = [a for a in doc["agents"] if a["status"] in ACTIVE]
                if any(a["type"] == agent["type"] for a in others):
                    raise Rejected(f"a {agent['type']} agent is already active")
                if len(others) >= doc["max_concurrent"]:
                    raise Rejected(f"max_concurrent {doc['max_concurrent']} reached")
        agent.update(status=status, progress=progress)
        return agent

    def _reap(self, doc: dict[str, Any], live: set[str]) -> list[dict[str, Any]]:
        """Reap the agents whose session is not in *live*; return them."""
        reaped = [a for a in doc["agents"] if a["status"] in self.reaped and a["tmux_session"] not in live]
        for agent in reaped:
            agent["status"] = self.reaped_to
        return reaped

    def _commit(self, path: Path, doc: dict[str, Any], changed: Iterable[dict[str, Any]]) -> None:
        """Recount, write the task (its lock held), then publish *changed* to the global registry."""
        agents = doc["agents"]
        doc["total_spawned"] = len(agents)
        doc["active_count"] = sum(1 for a in agents if a["status"] in ACTIVE)
        doc["completed_count"] = sum(1 for a in agents if a["status"] == "completed")
        write_json(path, doc)
        self._publish(doc["task_id"], changed)

    # -- the global registry --------------------------------------------------------------------------------------

    @staticmethod
    def _empty_global() -> dict[str, Any]:
        return {"tasks": {}, "agents": {}, "total_tasks": 0, "total_agents_spawned": 0, "active_agents": 0}

    def _global_lock(self, path: Path) -> contextlib.AbstractContextManager[None]:
        return locked(path)

    def _publish(self, task_id: str, changed: Iterable[dict[str, Any]]) -> None:
        """Copy task *task_id* and its *changed* agents into the global registry (called under the task's lock)."""
        if not self.global_registry:
            return
        path = self.workspace / GLOBAL_FILE
        with self._global_lock(path):
            glob = read_json(path, self._empty_global())
            glob["tasks"].setdefault(task_id, {"status": "active"})
            for a in changed:
                glob["agents"][a["id"]] = {"task_id": task_id, "type": a["type"], "parent": a["parent"],
                                           "status": a["status"]}
            glob["total_tasks"] = len(glob["tasks"])
            glob["total_agents_spawned"] = len(glob["agents"])
            glob["active_agents"] = sum(1 for a in glob["agents"].values() if a["status"] in ACTIVE)
            write_json(path, glob)


# -- the task registries' variants: factories, each with an adapter declaring its rules -------------------------------

class Plain(TaskRegistry):
    """The reference's rules, written independently."""

    rules = Rules()


class IdempotentKillRegistry(TaskRegistry):
    """A kill of a terminal agent returns ok and changes nothing (declares no rules)."""

    kill_of_terminal = "ignored"


class IdempotentKill(IdempotentKillRegistry):
    rules = Rules(kill_of_terminal="ignored")


class ReapRunningRegistry(TaskRegistry):
    """Reconcile reaps only ``running`` agents whose session is gone, to ``completed`` (declares no rules)."""

    reaped = frozenset({"running"})
    reaped_to = "completed"


class ReapRunning(ReapRunningRegistry):
    rules = Rules(reaped=frozenset({"running"}), reaped_to="completed")


class TerminalNotFinalRegistry(TaskRegistry):
    """An update of a terminal agent to any status is applied (declares no rules)."""

    terminal_is_final = False


class TerminalNotFinal(TerminalNotFinalRegistry):
    rules = Rules(terminal_is_final=False)


class NoMaxDepth(TaskRegistry):
    """Neither enforces nor promises max_depth."""

    enforce_max_depth = False
    promises = frozenset({"unique_type", "max_agents", "max_concurrent"})
    rules = Rules()


class WithGlobal(TaskRegistry):
    """The reference's rules, with a global registry updated under its own lock, inside the task's lock."""

    global_registry = True
    rules = Rules()


def plain(workspace: Path) -> Plain:
    """The reference's rules, written independently."""
    return Plain(workspace)


def idempotent_kill(workspace: Path) -> IdempotentKill:
    """A kill of a terminal agent returns ok and changes nothing; declared."""
    return IdempotentKill(workspace)


def idempotent_kill_undeclared(workspace: Path) -> IdempotentKillRegistry:
    """idempotent_kill declaring no rules: it breaks the reference's (a kill of a terminal agent is refused)."""
    return IdempotentKillRegistry(workspace)


def reap_running_to_completed(workspace: Path) -> ReapRunning:
    """Reconcile reaps only running agents, to completed; declared."""
    return ReapRunning(workspace)


def reap_running_to_completed_undeclared(workspace: Path) -> ReapRunningRegistry:
    """reap_running_to_completed declaring no rules."""
    return ReapRunningRegistry(workspace)


def terminal_not_final(workspace: Path) -> TerminalNotFinal:
    """An update of a terminal agent is applied; declared."""
    return TerminalNotFinal(workspace)


def terminal_not_final_undeclared(workspace: Path) -> TerminalNotFinalRegistry:
    """terminal_not_final declaring no rules."""
    return TerminalNotFinalRegistry(workspace)


def no_max_depth(workspace: Path) -> NoMaxDepth:
    """Neither enforces nor promises max_depth."""
    return NoMaxDepth(workspace)


def with_global(workspace: Path) -> WithGlobal:
    """Keeps a global registry, its read-modify-write under the global file's own lock."""
    return WithGlobal(workspace)


# -- one file for every project (issue 17) ----------------------------------------------------------------------------

PROJECT_ACTIVE = "active"
PROJECT_COMMANDS = {"completed": "complete", "abandoned": "abandon"}  # the statuses an update sets, by command
SESSION_FIELD = "session"


class Projects:
    """Issue 17's shape: every project's agents in one ``<workspace>/agents.json``; no limits, no hierarchy.

    ``complete``/``abandon`` apply in any status but ``deleted`` (a tombstone, set only by kill); one status call
    reaps every project's ``active`` agents whose session is gone, to ``completed``.
    """

    promises: frozenset[str] = frozenset()
    rules = Rules(active=frozenset({PROJECT_ACTIVE}), terminal=frozenset({"completed", "abandoned"}),
                  hidden=frozenset({"deleted"}), settable=frozenset(PROJECT_COMMANDS),
                  unsettable=frozenset({PROJECT_ACTIVE, "deleted"}), terminal_is_final=False,
                  kill_of_terminal="applied", killed_to="deleted", reaped=frozenset({PROJECT_ACTIVE}),
                  reaped_to="completed", deployed_as=PROJECT_ACTIVE, progress=False, counters=False, hierarchy=False,
                  completed_count=None, reconcile_scope="registry", session_field=SESSION_FIELD)

    def __init__(self, workspace: Path) -> None:
        self.workspace = Path(workspace)
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.path = self.workspace / "agents.json"

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """The exclusive lock every read-modify-write of the file holds."""
        return locked(self.path)

    def _load(self) -> dict[str, Any]:
        return read_json(self.path, {"agents": []})

    def _save(self, doc: dict[str, Any]) -> None:
        write_json(self.path, doc)

    @staticmethod
    def _agent(doc: dict[str, Any], project: str, agent_id: str) -> dict[str, Any]:
        for agent in doc["agents"]:
            if agent["id"] == agent_id and agent["project"] == project and agent["status"] != "deleted":
                return agent  # type: ignore[no-any-return]
        raise Rejected(f"{project} has no agent {agent_id}")

    def create_task(self, description: str, *, max_agents: int, max_concurrent: int, max_depth: int) -> str:
        return new_id("proj")  # a project is only a name its agents carry

    def deploy(self, task_id: str, agent_type: str, parent: str = ORCHESTRATOR) -> str:
        if parent != ORCHESTRATOR:
            raise Rejected("projects have no sub-agents")
        agent_id = new_id(agent_type)
        session = f"{task_id}_{agent_id}"  # not agent_<id>: only SESSION_FIELD names it
        with self._locked():
            doc = self._load()
            start_session(session)
            try:
                doc["agents"].append({"id": agent_id, "project": task_id, "type": agent_type,
                                      "status": PROJECT_ACTIVE, SESSION_FIELD: session,
                                      "created_at": datetime.now(UTC).isoformat()})
                self._save(doc)
            except BaseException:
                kill_session(session)
                raise
        return agent_id

    def _command(self, doc: dict[str, Any], task_id: str, agent_id: str, status: str) -> None:
        agent = self._agent(doc, task_id, agent_id)
        if status not in PROJECT_COMMANDS:
            raise Rejected(f"no command sets {status!r}")
        agent["status"] = status

    def update(self, task_id: str, agent_id: str, status: str, progress: int) -> None:
        with self._locked():
            doc = self._load()
            self._command(doc, task_id, agent_id, status)
            self._save(doc)

    def kill(self, task_id: str, agent_id: str) -> None:
        with self._locked():
            doc = self._load()
            agent = self._agent(doc, task_id, agent_id)
            agent["status"] = "deleted"
            self._save(doc)
            kill_session(agent[SESSION_FIELD])

    def reconcile(self, task_id: str) -> None:
        with self._locked():
            doc = self._load()
            live = live_sessions()
            gone = [a for a in doc["agents"] if a["status"] == PROJECT_ACTIVE and a[SESSION_FIELD] not in live]
            for agent in gone:
                agent["status"] = "completed"
            if gone:
                self._save(doc)

    def read_task(self, task_id: str) -> dict[str, Any]:
        with locked(self.path, fcntl.LOCK_SH):
            doc = self._load()
        return {"agents": [a for a in doc["agents"] if a["project"] == task_id]}

    def read_global(self) -> dict[str, Any] | None:
        return None


def projects(workspace: Path) -> Projects:
    """Issue 17's registry: one file for every project, complete/abandon in any status, delete as a tombstone."""
    return Projects(workspace)
