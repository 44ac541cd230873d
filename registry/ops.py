"""The registry's operations, each one atomic step over the task registry and the global registry.

Locks are always taken in one order: the task registry, then the global registry (several tasks: by sorted id).
An operation that changes what the global registry records holds both locks from its read to its last write, so
no other writer sees the two disagree.

A crash (or a failed write) between the task write and the global write is the one way they can still disagree.
The task registries are the source of truth and the global registry is their projection
(:func:`registry.model.project_task`), so the design is *rebuild the global view from the tasks*: every operation
that writes the global registry re-syncs the whole projection of its task, and :meth:`Registry.heal`, run when a
:class:`Registry` is opened, re-syncs any task whose projection the global registry does not match.  No write-ahead
log, and no extra fsync on the hot path.  For the same reason the global registry is created (empty) before the
first task registry is written: a crash after that first task write must leave something to heal.

The global registry does not grow with history: past :data:`registry.archive.ARCHIVE_AFTER` terminal agents, a
write of it first appends them to its archive and then leaves them out (:mod:`registry.archive` says why this, and
how a crash at any step is safe); :meth:`Registry.read_global` folds the two together.

A progress report that does not change an agent's status writes the task registry only: the global registry does
not record progress, and its ``last_update`` is refreshed whenever its entry is rewritten.

Updates (progress reports and status changes, the bulk of all writes) are group-committed
(:mod:`registry.groupcommit`): a process that finds the task's lock taken queues its update, and the holder of the
lock applies every queued update with its own, in the same critical section and one durable write.  Each caller
still gets its own record back, or its own error, exactly as if it had written alone.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from . import archive, groupcommit, model
from .errors import (
    DuplicateAgent,
    InvalidArgument,
    InvalidTransition,
    LimitExceeded,
    RegistryError,
    RegistryMissing,
    SessionError,
    UnknownAgent,
    UnknownTask,
    WriteFailed,
)
from .model import ACTIVE, ORCHESTRATOR, STATUSES, TERMINAL, is_active, validate_name
from .sessions import TmuxSessions, agent_command
from .store import JsonFile, check_lock_timeout, crash_point, dumps, make_dirs

__all__ = ["Registry", "default_base"]


def default_base() -> Path:
    """``ORCH_WORKSPACE`` if set, else ``./.agent-workspace``."""
    return Path(os.environ.get("ORCH_WORKSPACE") or ".agent-workspace")


def now() -> str:
    return datetime.now().isoformat()


def _limit(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"{name} must be a whole number of at least 1, not {value!r}", name=name, value=value)
    return value


def _text(name: str, value: object, *, optional: bool = False) -> None:
    if not (isinstance(value, str) or (optional and value is None)):
        raise InvalidArgument(f"{name} must be a string{' or None' if optional else ''}, not {value!r}", name=name,
                              value=value)


def _check_update(status: object, message: object, progress: object) -> None:
    if status is not None and (not isinstance(status, str) or status not in STATUSES):
        raise InvalidTransition(f"unknown status {status!r}; a status is one of {', '.join(sorted(STATUSES))}",
                                status=status)
    if message is not None and not isinstance(message, str):
        raise InvalidArgument(f"message must be a string, not {message!r}", value=message)
    if progress is not None and (not isinstance(progress, int) or isinstance(progress, bool)
                                 or not 0 <= progress <= 100):
        raise InvalidArgument(f"progress must be a whole number from 0 to 100, not {progress!r}", progress=progress)


class Registry:
    """The agent registry of one workspace.

    >>> reg = Registry(tmp_path)                                  # doctest: +SKIP
    >>> task = reg.create_task("fix the flaky test")              # doctest: +SKIP
    >>> agent = reg.deploy(task, "investigator", "look at it")    # doctest: +SKIP
    >>> reg.update(task, agent["id"], "completed", progress=100)  # doctest: +SKIP

    *sessions* is the tmux seam (default: :class:`TmuxSessions` on the default server); *agent_command* is the
    template a new session runs (see :func:`registry.sessions.agent_command`).  With *heal* (the default), opening
    re-syncs the global registry with the task registries if a crash left them apart.
    """

    def __init__(self, base: str | Path | None = None, *, sessions: TmuxSessions | None = None,
                 agent_command: str | None = None, lock_timeout: float | None = None, heal: bool = True) -> None:
        self.base = Path(base if base is not None else default_base()).absolute()
        self.sessions = sessions if sessions is not None else TmuxSessions()
        _text("agent_command", agent_command, optional=True)
        self.agent_command = agent_command
        self.lock_timeout = check_lock_timeout(lock_timeout)
        self._files: dict[str, JsonFile] = {}
        keep = archive.archive_after_from_env()
        if keep != archive.UNSET:
            self.archive_after = keep
        self.global_file: JsonFile = archive.GlobalFile(self.base / model.GLOBAL_DIR / model.GLOBAL_FILE,
                                              validate=model.global_shape_problems, lock_timeout=lock_timeout)
        if heal:
            self.heal()

    #: Terminal agents the global registry keeps before moving them to its archive (None: never; see
    #: :mod:`registry.archive`).
    archive_after: int | None = archive.ARCHIVE_AFTER

    def __repr__(self) -> str:
        return f"Registry({str(self.base)!r})"

    # -- files ----------------------------------------------------------------------------------------------------

    def task_file(self, task_id: str) -> JsonFile:
        file = self._files.get(task_id)
        if file is None:
            validate_name("task id", task_id)
            file = JsonFile(self.base / task_id / model.TASK_FILE,
                            validate=functools.partial(model.task_shape_problems, task_id=task_id),
                            lock_timeout=self.lock_timeout)
            self._files[task_id] = file
        return file

    def task_ids(self) -> list[str]:
        """Ids of every task registry in the workspace, sorted.

        Only real directories with a valid name count: a symlink, or a directory whose name is not a task id, is a
        stray that every operation skips and ``orch-registry check`` reports (see :meth:`strays`).
        """
        return sorted(name for name, path in self._task_like() if model.is_valid_name(name) and not path.is_symlink())

    def strays(self) -> list[Path]:
        """Entries of the workspace that look like task registries but are not: a symlink, or a bad name."""
        return sorted(path for name, path in self._task_like() if not model.is_valid_name(name) or path.is_symlink())

    def _task_like(self) -> list[tuple[str, Path]]:
        try:
            entries = list(os.scandir(self.base))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [(e.name, Path(e.path)) for e in entries if os.path.lexists(Path(e.path) / model.TASK_FILE)]

    def _read_task(self, task_id: str) -> dict[str, Any]:
        file = self.task_file(task_id)
        try:
            doc: dict[str, Any] = file.read()
        except FileNotFoundError:
            raise UnknownTask(f"no task {task_id} in {self.base} (there is no {file.path})", task_id=task_id) from None
        return doc

    def _read_global(self, merged: bool = False) -> dict[str, Any]:
        """The global document as written (to change it), or *merged* with its archive (to read every agent)."""
        try:
            doc: dict[str, Any] = JsonFile.read(self.global_file)  # the file itself, whatever class reads it
            if merged:
                doc = archive.merge(doc, archive.read_entries(self.global_file.path))
        except FileNotFoundError:
            raise RegistryMissing(
                f"the global registry {self.global_file.path} is missing although task registries exist. Rebuild"
                f" it from them with `orch-registry repair --base {self.base}`.", path=str(self.global_file.path)
            ) from None
        return doc

    def _existing_task_file(self, task_id: str) -> JsonFile:
        """The task's file, or UnknownTask before anything is locked: a lock would create its file and directory."""
        file = self.task_file(task_id)
        if not file.path.is_file():
            raise UnknownTask(f"no task {task_id} in {self.base} (there is no {file.path})", task_id=task_id)
        return file

    @contextlib.contextmanager
    def _global_locked(self) -> Iterator[None]:
        if not self.global_file.path.is_file():
            self._read_global()  # raises RegistryMissing without creating the global registry's lock
        with self.global_file.locked():
            yield

    @contextlib.contextmanager
    def _both_locked(self, task_id: str) -> Iterator[JsonFile]:
        task = self._existing_task_file(task_id)
        with task.locked(), self._global_locked():
            yield task

    def _commit(self, task_file: JsonFile, task: dict[str, Any], glob: dict[str, Any],
                data: bytes | None = None) -> None:
        """Write the task registry (*data*, if its bytes are at hand), then its projection into the global registry.

        Both locks are held.  Once the task registry is written the change is made (it is the source of truth), so
        a failure of the global write is reported as WriteFailed with ``applied`` None, never False.
        """
        task_file.write_bytes(dumps(task) if data is None else data)
        crash_point("between_task_and_global", task_file.path)
        model.sync_global(glob, task, now(), self._archived_ids)
        try:
            self._compact(glob)
            self.global_file.write(glob)
        except WriteFailed as exc:
            raise WriteFailed(
                f"{task_file.path} was written but {self.global_file.path} was not ({exc}). The task registry holds"
                " the change; the global registry is re-synced from it by the next status change in the task, or"
                " when a Registry is opened.", path=str(self.global_file.path), errno=getattr(exc, "errno", None),
                applied=None) from exc

    def _compact(self, glob: dict[str, Any]) -> None:
        """Move the global registry's terminal agents to its archive if it holds too many (the lock is held).

        An archive that cannot be written (a stray where it belongs, a corrupt tail, a full disk) leaves *glob* as
        it is: the global registry is only bigger until ``orch-registry repair``, never wrong.
        """
        with contextlib.suppress(RegistryError, OSError):
            archive.compact(glob, self.global_file.path, self.archive_after)

    # -- operations -----------------------------------------------------------------------------------------------

    def create_task(self, description: str, priority: str = "P1", max_agents: int = model.DEFAULT_MAX_AGENTS,
                    max_depth: int = model.DEFAULT_MAX_DEPTH, max_concurrent: int = model.DEFAULT_MAX_CONCURRENT, *,
                    task_id: str | None = None, client_cwd: str | None = None) -> str:
        """Create a task registry and register it in the global registry; return its id."""
        limits = {"max_agents": _limit("max_agents", max_agents), "max_depth": _limit("max_depth", max_depth),
                  "max_concurrent": _limit("max_concurrent", max_concurrent)}
        _text("description", description)
        _text("priority", priority)
        _text("client_cwd", client_cwd, optional=True)
        stamp = now()
        if task_id is None:
            task_id = f"TASK-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"
        file = self.task_file(task_id)
        if file.path.exists():
            raise InvalidArgument(f"task {task_id} already exists in {self.base}", task_id=task_id)
        if not self.global_file.path.exists():
            if self.task_ids():
                self._read_global()  # raises RegistryMissing: never start a new global over existing tasks
            # The global registry exists before the first task does, so a crash between the task write and the
            # global write leaves a global registry that heal() can bring up to date.
            make_dirs(self.global_file.path.parent)
            with self.global_file.transaction(default=lambda: model.new_global_document(stamp)):
                pass
        make_dirs(file.path.parent)
        with file.locked(), self.global_file.locked():
            if file.path.exists():
                raise InvalidArgument(f"task {task_id} already exists in {self.base}", task_id=task_id)
            glob = self._read_global()
            task = model.new_task_document(
                task_id, description, priority=priority, workspace=str(file.path.parent),
                workspace_base=str(self.base), client_cwd=client_cwd, now=stamp, **limits)
            self._commit(file, task, glob)
        return task_id

    def deploy(self, task_id: str, agent_type: str, prompt: str = "", parent: str = ORCHESTRATOR) -> dict[str, Any]:
        """Register a new ``running`` agent and start its tmux session; return the agent's record.

        Reads the task registry once and the global registry once, and checks deduplication and every limit in the
        same critical section as the insert.  The new record is built (and serialized) before the session starts, so
        a failure up to then leaves no session; if the session cannot start, nothing is registered; if anything fails
        after it started and the agent is not on disk, the session is killed.  Raises DuplicateAgent, LimitExceeded,
        UnknownAgent (a parent that is not an agent of the task), UnknownTask, SessionError, LockTimeout,
        CorruptRegistry, UnsafePath, WriteFailed.
        """
        validate_name("agent type", agent_type)
        if parent != ORCHESTRATOR:
            validate_name("parent", parent)
        _text("prompt", prompt)
        with self._both_locked(task_id) as file:
            task = self._read_task(task_id)
            glob = self._read_global()
            depth = self._deploy_depth(task, agent_type, parent)
            taken = {a["id"] for a in task["agents"]} | set(glob["agents"])
            agent_id = self._new_agent_id(agent_type, taken, self._archived_ids_blob())
            session = model.session_name(agent_id)
            stamp = now()
            agent = {"id": agent_id, "type": agent_type, "tmux_session": session, "parent": parent, "depth": depth,
                     "status": "running", "started_at": stamp, "progress": 0, "last_update": stamp, "prompt": prompt}
            self._register(task, agent)
            data = dumps(task)  # everything that can fail before the session starts has failed by now
            command = agent_command(self.agent_command, base=self.base, task_id=task_id, agent_id=agent_id)
            self.sessions.start(session, command, {"ORCH_WORKSPACE": str(self.base)})
            try:
                self._commit(file, task, glob, data)
            except BaseException:
                if not self._on_disk(file, agent_id):  # not registered: the session must not outlive the failure
                    with contextlib.suppress(SessionError):
                        self.sessions.kill(session)
                raise
            return dict(agent)

    @staticmethod
    def _deploy_depth(task: dict[str, Any], agent_type: str, parent: str) -> int:
        """The depth of a new *agent_type* agent under *parent*; raise if deduplication or a limit refuses it."""
        task_id, agents = task["task_id"], task["agents"]
        active = [a for a in agents if is_active(a)]
        for other in active:
            if other.get("type") == agent_type:
                raise DuplicateAgent(
                    f"task {task_id} already has an active {agent_type} agent, {other['id']} ({other['status']});"
                    " finish or kill it before deploying another", task_id=task_id, existing=other["id"])
        max_agents = task.get("max_agents", model.DEFAULT_MAX_AGENTS)
        if len(agents) >= max_agents:
            raise LimitExceeded(f"task {task_id} has spawned {len(agents)} agents, its max_agents is {max_agents}",
                                task_id=task_id, limit="max_agents")
        max_concurrent = task.get("max_concurrent", model.DEFAULT_MAX_CONCURRENT)
        if len(active) >= max_concurrent:
            raise LimitExceeded(f"task {task_id} has {len(active)} active agents, its max_concurrent is"
                                f" {max_concurrent}", task_id=task_id, limit="max_concurrent")
        depth = 1
        if parent != ORCHESTRATOR:
            parent_agent = next((a for a in agents if a["id"] == parent), None)
            if parent_agent is None:
                raise UnknownAgent(f"parent {parent} is not an agent of task {task_id}", task_id=task_id,
                                   agent_id=parent)
            depth = parent_agent.get("depth", 1) + 1
        max_depth = task.get("max_depth", model.DEFAULT_MAX_DEPTH)
        if depth > max_depth:
            raise LimitExceeded(f"a child of {parent} would be at depth {depth}; task {task_id} has max_depth"
                                f" {max_depth}", task_id=task_id, limit="max_depth")
        return depth

    def _archived_ids(self) -> set[str]:
        return set(archive.read_entries(self.global_file.path))

    def _archived_ids_blob(self) -> bytes:
        """The global registry's archived ids as :func:`registry.archive.read_ids` gives them (b"\n" if none)."""
        try:
            return archive.read_ids(self.global_file.path)
        except (OSError, RegistryError):  # a stray there: check reports it; the ids in the global registry remain
            return b"\n"

    @staticmethod
    def _new_agent_id(agent_type: str, taken: set[str], archived: bytes = b"\n") -> str:
        """``<type>-<HHMMSS>-<6 hex>``, not in *taken* nor among the *archived* ids (``\n``-separated, with a
        leading ``\n``); a long type is cut so that the id is a valid name."""
        prefix = model.agent_id_prefix(agent_type)
        agent_id = f"{prefix}-{datetime.now():%H%M%S}-{secrets.token_hex(3)}"
        while agent_id in taken or b"\n" + agent_id.encode() + b"\n" in archived:
            agent_id = f"{prefix}-{datetime.now():%H%M%S}-{secrets.token_hex(3)}"
        return agent_id

    @staticmethod
    def _register(task: dict[str, Any], agent: dict[str, Any]) -> None:
        task["agents"].append(agent)
        task.setdefault("agent_hierarchy", {}).setdefault(agent["parent"], []).append(agent["id"])
        task["total_spawned"] = task.get("total_spawned", 0) + 1
        task["active_count"] = task.get("active_count", 0) + 1

    def update(self, task_id: str, agent_id: str, status: str | None = None, message: str | None = None,
               progress: int | None = None) -> dict[str, Any]:
        """Record an agent's status, message and progress; return its record.

        A terminal status decrements active_count exactly once; ``completed`` increments completed_count.  Raises
        InvalidTransition for an unknown status or an agent already terminal, UnknownAgent, UnknownTask.
        """
        _check_update(status, message, progress)
        file = self._existing_task_file(task_id)
        request = {"agent_id": agent_id, "status": status, "message": message, "progress": progress}
        record: dict[str, Any] = groupcommit.submit(
            file, request, lambda batch, promise: self._update_batch(task_id, file, batch, promise))
        return record

    def _update_batch(self, task_id: str, file: JsonFile, batch: groupcommit.Batch,
                      promise: Callable[[bytes], None]) -> None:
        """Apply the updates of *batch* (see :mod:`registry.groupcommit`) with the task lock held.

        One task write for all of them; the global registry is locked only if one asks for a status, and written
        only if one changes a status.  Should the global registry be unusable (corrupt, missing, locked too long),
        the status changes fail with its error and the progress reports go through, as they would one by one.
        """
        try:
            task = file.read()
        except FileNotFoundError:
            raise UnknownTask(f"no task {task_id} in {self.base} (there is no {file.path})", task_id=task_id) from None
        with contextlib.ExitStack() as stack:
            glob: dict[str, Any] | None = None
            unusable: RegistryError | None = None
            if any(r.payload.get("status") is not None for r in batch.requests):
                try:
                    stack.enter_context(self._global_locked())
                    glob = self._read_global()
                except RegistryError as exc:
                    unusable = exc
            changed, applied = [], 0
            for request in batch.requests:
                try:
                    agent, status_changed = self._apply_update(task, unusable, request.payload)
                except RegistryError as exc:
                    batch.fail(request, exc)
                    continue
                batch.succeed(request, dict(agent))
                applied += 1
                if status_changed:
                    changed.append(request)
            if not applied:  # every request failed: write nothing, whatever form the file's bytes are in
                return
            data = dumps(task)
            promise(data)
            if not changed:
                file.write_bytes(data)
                return
            assert glob is not None
            try:
                self._commit(file, task, glob, data)
            except WriteFailed as exc:
                if exc.applied is not None:  # the task write failed: nothing was written
                    raise
                for request in changed:  # the task registry holds them; the global registry is healed later
                    batch.fail(request, exc)

    def _apply_update(self, task: dict[str, Any], unusable: RegistryError | None,
                      request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Apply one update request to *task* in memory; raise before changing anything if it cannot be applied.

        The request may come from another process's queue file, so it is checked again here.
        """
        agent_id, status, message, progress = (request.get(k) for k in ("agent_id", "status", "message", "progress"))
        if not isinstance(agent_id, str):
            raise InvalidArgument(f"a queued update names no agent: {request!r}", request=request)
        _check_update(status, message, progress)
        agent = self._agent(task, agent_id)
        old = agent.get("status")
        if old in TERMINAL:
            raise InvalidTransition(f"agent {agent_id} is {old}; a terminal agent takes no more updates",
                                    task_id=task["task_id"], agent_id=agent_id, status=status)
        new = status or old
        if new != old and unusable is not None:
            raise unusable
        stamp = now()
        agent["last_update"] = stamp
        if progress is not None:
            agent["progress"] = progress
        if message is not None:
            agent["last_message"] = message
        if new in TERMINAL:
            self._finish(task, agent, new, stamp, reason=message)
        else:
            if old not in ACTIVE and new in ACTIVE:  # from a status the registry does not know (hand-edited)
                task["active_count"] = task.get("active_count", 0) + 1
            agent["status"] = new
        return agent, new != old

    def kill(self, task_id: str, agent_id: str, reason: str = "killed") -> dict[str, Any]:
        """Kill the agent's session and mark it ``terminated`` with *reason*; return its record.

        The session is killed first: should the write then fail (or the process die), the agent is a zombie that
        ``reconcile`` marks terminated, never a registered-as-terminated agent that runs on.  Such a failure is a
        WriteFailed with ``applied`` None: the session is gone although the registry still says active.

        Only the session ``agent_<id>`` is killed, whatever the file records as the agent's ``tmux_session``: a
        hand-edited or hostile file must not make the registry kill someone else's session.

        Raises InvalidTransition if the agent is already terminal, UnknownAgent, UnknownTask, SessionError.
        """
        _text("reason", reason)
        with self._both_locked(task_id) as file:
            task = self._read_task(task_id)
            agent = self._agent(task, agent_id)
            if agent.get("status") in TERMINAL:
                raise InvalidTransition(f"agent {agent_id} is already {agent['status']}", task_id=task_id,
                                        agent_id=agent_id)
            glob = self._read_global()
            session = model.session_name(agent_id)  # never a name from the file: it may be anyone's session
            killed = self.sessions.kill(session)
            self._finish(task, agent, "terminated", now(), reason=reason)
            try:
                self._commit(file, task, glob)
            except WriteFailed as exc:
                if not killed or exc.applied is not False:
                    raise
                raise WriteFailed(
                    f"session {session} was killed but {exc} The agent is a zombie now: the next reconcile marks it"
                    " terminated (session_not_found).", path=exc.details.get("path"), errno=exc.details.get("errno"),
                    applied=None) from exc
            return dict(agent)

    def reconcile(self, task_id: str) -> list[str]:
        """Mark every active agent whose tmux session is gone ``terminated`` (``session_not_found``).

        Returns the ids it reaped.  If tmux cannot be queried, raises SessionError and reaps nothing.
        """
        file = self._existing_task_file(task_id)
        with file.locked():
            task = self._read_task(task_id)
            active = [a for a in task["agents"] if is_active(a)]
            if not active:
                return []
            alive = self.sessions.alive()
            zombies = [a for a in active if model.session_name(a["id"]) not in alive]
            if not zombies:
                return []
            with self._global_locked():
                glob = self._read_global()
                stamp = now()
                for agent in zombies:
                    self._finish(task, agent, "terminated", stamp, reason="session_not_found")
                self._commit(file, task, glob)
            return [a["id"] for a in zombies]

    # -- reading --------------------------------------------------------------------------------------------------

    def read_task(self, task_id: str) -> dict[str, Any]:
        """The task registry document, read without locking (never torn).  UnknownTask if there is none."""
        return self._read_task(task_id)

    def read_global(self) -> dict[str, Any]:
        """The global registry document with its archive folded in: every task and every agent the workspace ran,
        as ``GLOBAL_REGISTRY.json`` held them before it had an archive.  RegistryMissing if it is gone; an empty
        view for an empty workspace."""
        if not self.global_file.path.exists() and not self.task_ids():
            return model.new_global_document(now())
        return self._read_global(merged=True)

    def heal(self) -> list[str]:
        """Re-sync the global registry with every task registry it disagrees with; return those task ids.

        Corrupt or missing files are left alone (``orch-registry check`` reports them, ``repair`` fixes them).
        """
        from .errors import RegistryError

        try:
            glob = self._read_global(merged=True)  # with the archive: every agent the tasks hold is compared
            tasks = {t: self.task_file(t).read() for t in self.task_ids()}
        except (OSError, RegistryError):
            return []
        stale = sorted({v.task_id for v in model.global_violations(glob, tasks, complete=False)
                        if v.task_id is not None})
        if not stale:
            return []
        with contextlib.ExitStack() as stack:
            for task_id in stale:
                stack.enter_context(self.task_file(task_id).locked())
            stack.enter_context(self.global_file.locked())
            glob = JsonFile.read(self.global_file)
            stamp = now()
            for task_id in stale:
                model.sync_global(glob, self.task_file(task_id).read(), stamp, self._archived_ids)
            self._compact(glob)
            self.global_file.write(glob)
        return stale

    # -- helpers --------------------------------------------------------------------------------------------------

    @staticmethod
    def _on_disk(file: JsonFile, agent_id: str) -> bool:
        """Whether the task registry on disk holds *agent_id* (after a failed write: was it registered?)."""
        try:
            return any(a.get("id") == agent_id for a in file.read()["agents"])
        except Exception:
            return False

    @staticmethod
    def _agent(task: dict[str, Any], agent_id: str) -> dict[str, Any]:
        for agent in task["agents"]:
            if agent.get("id") == agent_id:
                found: dict[str, Any] = agent
                return found
        raise UnknownAgent(f"no agent {agent_id} in task {task['task_id']}", task_id=task["task_id"],
                           agent_id=agent_id)

    @staticmethod
    def _finish(task: dict[str, Any], agent: dict[str, Any], status: str, stamp: str, reason: str | None) -> None:
        """:func:`model.finish_agent`; a method so that a variant (the tests' buggy registries) can change it."""
        model.finish_agent(task, agent, status, stamp, reason)
