"""Health check and repair of a workspace against its live tmux sessions.

:func:`check` only reads.  :func:`repair` backs every file up, then, holding every lock (tasks by sorted id, then
the global registry): reaps zombies, recomputes counters and the hierarchy from the agents lists, rebuilds the global
registry from the task registries, and kills leaked sessions when asked.  A file it cannot parse is left alone unless
told to restore it, and then it says whether it restored the backup or rebuilt the file.

Strays (a symlink or a file of the wrong kind where a registry file, backup, lock, queue or task directory belongs,
a directory with a registry but a name that is no task id) are reported by :func:`check` and skipped by
:func:`repair`, which names each task it could not lock or read instead of stopping: one bad entry never keeps the
rest of the workspace from being checked or repaired.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import archive, model
from .errors import CorruptRegistry, RegistryError, RegistryMissing, SessionError, UnsafePath
from .groupcommit import queue_dir, stale_queue_files
from .model import Violation, is_active
from .ops import Registry, now
from .sessions import TmuxSessions
from .store import JsonFile, backup_path, dumps, make_dirs, parse, read_file, stale_temp_files

#: Finding kinds of a task registry that could not be read: its agents' sessions are neither leaks nor zombies.
UNREADABLE = ("corrupt", "unsafe", "unreadable")

__all__ = ["Finding", "HealthReport", "RepairReport", "check", "repair"]


@dataclass(frozen=True)
class Finding:
    """One problem.  ``kind`` is stable (``zombie``, ``leak``, ``corrupt``, ``count_drift``, ...)."""

    kind: str
    message: str
    task_id: str | None = None
    agent_id: str | None = None
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class HealthReport:
    base: str
    tasks: int
    agents: int
    active: int
    sessions: int | None  # live agent_* sessions, None when tmux could not be asked
    findings: tuple[Finding, ...]

    @property
    def healthy(self) -> bool:
        return not self.findings

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    @property
    def zombies(self) -> list[str]:
        return sorted(f.agent_id for f in self.of_kind("zombie") if f.agent_id)

    @property
    def leaks(self) -> list[str]:
        return sorted(f.path for f in self.of_kind("leak") if f.path)

    def render(self, *, hint: bool = True) -> str:
        """The report as text; *hint*: end with the repair command (not after a repair: see RepairReport.hint)."""
        sessions = "tmux unreachable" if self.sessions is None else f"{self.sessions} agent sessions alive"
        lines = [f"{self.base}: {plural(self.tasks, 'task')}, {plural(self.agents, 'agent')}, {self.active} active,"
                 f" {sessions}"]
        if self.healthy:
            lines.append("healthy: every invariant holds and the registry agrees with tmux")
            return "\n".join(lines)
        kinds: dict[str, list[Finding]] = {}
        for finding in self.findings:
            kinds.setdefault(finding.kind, []).append(finding)
        lines.append(f"{plural(len(self.findings), 'problem')}:")
        for kind, found in kinds.items():
            lines.append(f"  {kind} ({len(found)})")
            lines.extend(f"    - {f.message}" for f in found)
        if hint:
            lines.append(f"fix with: orch-registry repair --base {self.base}  (add --dry-run to see what it would do)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "healthy": self.healthy, "tasks": self.tasks, "agents": self.agents,
                "active": self.active, "sessions": self.sessions, "zombies": self.zombies, "leaks": self.leaks,
                "findings": [f.to_json() for f in self.findings]}


_FLAGS = re.compile(r"--(?:restore|kill-leaks)\b")


def plural(n: int, noun: str) -> str:
    """``1 problem``, ``2 problems``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@dataclass(frozen=True)
class RepairReport:
    base: str
    dry_run: bool
    backup_dir: str | None
    actions: tuple[str, ...]
    refused: tuple[str, ...] = field(default=())

    def render(self) -> str:
        head = "would do" if self.dry_run else "did"
        lines = [f"{self.base}: repair {'(dry run) ' if self.dry_run else ''}"
                 + (f"backed up to {self.backup_dir}" if self.backup_dir
                    else "made no backup" if self.dry_run else "changed no file, so made no backup")]
        lines += [f"  {head}: {a}" for a in self.actions] or ["  nothing to repair"]
        lines += [f"  refused: {r}" for r in self.refused]
        return "\n".join(lines)

    def hint(self) -> str:
        """What would let a repair do what this one refused: the flags it names, or a person's decision."""
        flags = sorted({flag for r in self.refused for flag in _FLAGS.findall(r)})
        if flags:
            return f"to do what was refused: orch-registry repair {' '.join(flags)} --base {self.base}"
        if self.refused:
            return "what was refused is left for a person to decide (no flag of repair changes it)"
        return ""

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "dry_run": self.dry_run, "backup_dir": self.backup_dir,
                "actions": list(self.actions), "refused": list(self.refused)}


def _violation(v: Violation) -> Finding:
    return Finding(v.rule, v.message, v.task_id, v.agent_id)


def _load_all(reg: Registry, task_ids: list[str] | None = None
              ) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None, list[Finding]]:
    """Every task document that parses, the global document (or None), and findings for those that do not.

    *task_ids*: the tasks to read (default: every task of the workspace).  Tasks the global registry lists but
    whose registry is gone are reported ``missing``.
    """
    findings: list[Finding] = []
    tasks: dict[str, dict[str, Any]] = {}
    for task_id in reg.task_ids() if task_ids is None else task_ids:
        try:
            tasks[task_id] = reg.task_file(task_id).read()
        except FileNotFoundError:  # removed while we looked
            continue
        except (RegistryError, OSError) as exc:
            findings.append(_unreadable(exc, reg.task_file(task_id).path, task_id))
    glob: dict[str, Any] | None = None
    try:
        glob = reg._read_global(merged=True)
    except RegistryMissing:
        if tasks or findings:
            findings.append(Finding("missing", f"the global registry {reg.global_file.path} is missing",
                                    path=str(reg.global_file.path)))
    except (RegistryError, OSError) as exc:
        findings.append(_unreadable(exc, Path(getattr(exc, "path", "") or reg.global_file.path), None))
    if glob is not None:
        present = set(tasks) | {f.task_id for f in findings if f.task_id}
        for task_id in sorted(set(glob.get("tasks", {})) - present):
            path = reg.base / task_id / model.TASK_FILE
            findings.append(Finding("missing", f"the global registry lists task {task_id} but {path} is missing",
                                    task_id, path=str(path)))
    return tasks, glob, findings


def _unreadable(exc: Exception, path: Path, task_id: str | None) -> Finding:
    kind = "corrupt" if isinstance(exc, CorruptRegistry) else "unsafe" if isinstance(exc, UnsafePath) else "unreadable"
    return Finding(kind, str(exc) if kind != "unreadable" else f"{path} cannot be read: {exc}", task_id,
                   path=str(path))


def _wrong_kind(path: Path, directory: bool) -> str | None:
    """What is wrong with *path* (a symlink, the wrong kind of file), or None if it is right or missing."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return "a symlink"
    if directory and not stat.S_ISDIR(mode):
        return "not a directory"
    if not directory and not stat.S_ISREG(mode):
        return "not a regular file"
    return None


def _stray_findings(reg: Registry) -> list[Finding]:
    """Every stray of the workspace (see the module docstring); the registry files themselves are read elsewhere."""
    found = [Finding("stray", f"{path} holds a {model.TASK_FILE} but "
                     + ("is a symlink" if path.is_symlink() else "its name is not a valid task id")
                     + "; every command skips it. Move it out of the workspace.", path=str(path))
             for path in reg.strays()]
    global_dir = reg.global_file.path.parent
    places = [(global_dir, True, "the global registry"),
              (archive.archive_path(reg.global_file.path), False, "the global registry's archive"),
              (archive.ids_path(reg.global_file.path), False, "the global registry's archived ids")]
    for file in [reg.task_file(t) for t in reg.task_ids()] + [reg.global_file]:
        places += [(file.lock_path, False, "a lock file"), (backup_path(file.path), False, "a backup"),
                   (queue_dir(file.path), True, "the group-commit queue")]
    for path, directory, role in places:
        problem = _wrong_kind(path, directory)
        if problem is not None:
            found.append(Finding("stray", f"{path} is {problem}, where the registry keeps {role}; it is never"
                                          " followed nor written. Move it out of the way.", path=str(path)))
    return found


def _unreadable_sessions(glob: dict[str, Any] | None, problems: list[Finding]) -> set[str]:
    """Sessions of agents of tasks whose registry cannot be read: whether they leak nobody can tell, so they are
    never reported as leaks nor killed as such."""
    unreadable = {p.task_id for p in problems if p.kind in UNREADABLE and p.task_id}
    if glob is None or not unreadable:
        return set()
    return {model.session_name(agent_id)
            for agent_id, view in glob.get("agents", {}).items() if view.get("task_id") in unreadable}


def _session_findings(tasks: dict[str, dict[str, Any]], alive: set[str], unknown: set[str]) -> list[Finding]:
    findings = []
    owned = set(unknown)
    for task_id, task in tasks.items():
        for agent in task["agents"]:
            session = model.session_name(agent["id"])
            if is_active(agent):
                owned.add(session)
                if session not in alive:
                    findings.append(Finding("zombie", f"{task_id}: agent {agent['id']} is {agent['status']} but its"
                                                      f" session {session} is gone", task_id, agent["id"]))
    for session in sorted(alive - owned):
        if session.startswith("agent_"):
            findings.append(Finding("leak", f"session {session} runs with no active agent in any registry",
                                    path=session))
    return findings


def check(base: str | Path, *, sessions: TmuxSessions | None = None) -> HealthReport:
    """Read the workspace at *base* and report every problem, without changing anything."""
    reg = Registry(base, sessions=sessions, heal=False)
    tasks, glob, findings = _load_all(reg)
    for task in tasks.values():
        findings += [_violation(v) for v in model.task_violations(task)]
    if glob is not None:
        complete = not any(f.kind in UNREADABLE and f.task_id for f in findings)
        findings += [_violation(v) for v in model.global_violations(glob, tasks, complete=complete)]
        findings += [Finding("archive_drift", f"{problem}; repair writes the global registry whole and removes the"
                                              " archive", path=str(archive.archive_path(reg.global_file.path)))
                     for problem in _archive_problems(reg)]
    alive: set[str] | None
    try:
        alive = reg.sessions.alive()
    except SessionError as exc:
        alive = None
        findings.append(Finding("tmux_unreachable", f"{exc}; zombies and leaks were not checked"))
    if alive is not None:
        findings += _session_findings(tasks, alive, _unreadable_sessions(glob, findings))
    findings += _stray_findings(reg)
    findings += [Finding("stale_temp", f"{path} was left by a process that died part way through a write; the"
                                       " registry is whole, the file is litter", path=str(path))
                 for path in _stale_temps(reg)]
    agents = [a for t in tasks.values() for a in t["agents"]]
    return HealthReport(str(reg.base), len(tasks), len(agents), sum(1 for a in agents if is_active(a)),
                        None if alive is None else sum(1 for s in alive if s.startswith("agent_")),
                        tuple(findings))


def _archive_problems(reg: Registry) -> list[str]:
    """Where the global registry's bookkeeping of its archive disagrees with the archive (nothing if unreadable)."""
    try:
        hot = JsonFile.read(reg.global_file)
        entries = archive.read_entries(reg.global_file.path)
        ids = archive.read_ids(reg.global_file.path)
    except (RegistryError, OSError):
        return []  # reported as unreadable already
    return archive.bookkeeping_problems(hot, entries, ids)


def _stale_temps(reg: Registry) -> list[Path]:
    """Temp files of writers that died before their rename, and group-commit queue files of dead processes."""
    files = [reg.task_file(t) for t in reg.task_ids()] + [reg.global_file]
    directories = {f.path.parent for f in files}
    return sorted([path for d in directories if d.is_dir() and not d.is_symlink() for path in stale_temp_files(d)]
                  + [path for f in files for path in stale_queue_files(f.path)])


def _backup(reg: Registry, files: list[JsonFile]) -> Path:
    """Copy every file of *files* that can be read (never through a symlink) under ``.backups/<now>/``."""
    target = reg.base / ".backups" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    for file in files:
        try:
            data = read_file(file.path)
        except (OSError, RegistryError):
            continue
        dest = target / file.path.relative_to(reg.base)
        make_dirs(dest.parent)
        dest.write_bytes(data)
    for path in (archive.archive_path(reg.global_file.path), archive.ids_path(reg.global_file.path)):
        with contextlib.suppress(OSError, RegistryError):
            data = read_file(path)
            dest = target / path.relative_to(reg.base)
            make_dirs(dest.parent)
            dest.write_bytes(data)
    return target


def _restore_task(reg: Registry, task_id: str, glob: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str]:
    """A replacement for a corrupt task registry: its backup if that parses, else a rebuild from the global view."""
    file = reg.task_file(task_id)
    bak = backup_path(file.path)
    with contextlib.suppress(OSError, RegistryError):
        doc = parse(read_file(bak), bak)
        if not model.task_shape_problems(doc, task_id):
            return doc, f"restored {file.path} from its backup {bak}"
    if glob is not None and task_id in glob.get("tasks", {}):
        entry = glob["tasks"][task_id]
        doc = model.new_task_document(
            task_id, entry.get("description", ""), priority="P1", max_agents=model.DEFAULT_MAX_AGENTS,
            max_depth=model.DEFAULT_MAX_DEPTH, max_concurrent=model.DEFAULT_MAX_CONCURRENT,
            workspace=str(file.path.parent), workspace_base=str(reg.base), client_cwd=None,
            now=entry.get("created_at") or now())
        doc["status"] = entry.get("status", "INITIALIZED")
        views = [(a, v) for a, v in glob["agents"].items() if v.get("task_id") == task_id]
        depth: dict[str, int] = {}
        for agent_id, view in views:
            agent = {"id": agent_id, **{k: v for k, v in view.items() if k != "task_id"}}
            agent.setdefault("progress", 0)
            agent.setdefault("prompt", "")
            doc["agents"].append(agent)
        by_id = {a["id"]: a for a in doc["agents"]}
        for agent in doc["agents"]:  # depth from the parent chain; the global registry does not record it
            chain, node = 0, agent
            while node is not None and chain <= len(by_id):
                chain += 1
                node = by_id.get(node.get("parent", model.ORCHESTRATOR))
            depth[agent["id"]] = chain
            agent["depth"] = chain
        doc["max_depth"] = max([model.DEFAULT_MAX_DEPTH, *depth.values()])
        return doc, (f"rebuilt {file.path} from the global registry (no usable backup): prompts, progress and"
                     " limits were not recorded there and are defaults now")
    return None, f"{file.path} is corrupt and has neither a usable backup nor an entry in the global registry"


def _lock_tasks(stack: contextlib.ExitStack, reg: Registry, task_ids: list[str]) -> tuple[list[str], list[Finding]]:
    """Lock every task registry that can be locked.  Returns the ids locked, and a finding for each of the others
    (its sessions are then neither zombies nor leaks, and the global registry keeps its entries)."""
    locked, skipped = [], []
    for task_id in task_ids:
        try:
            stack.enter_context(reg.task_file(task_id).locked())
        except (UnsafePath, FileNotFoundError) as exc:
            skipped.append(Finding("unsafe", f"task {task_id} was skipped: {exc}", task_id, path=str(exc.filename
                                   if isinstance(exc, FileNotFoundError) else exc.path)))
            continue
        locked.append(task_id)
    return locked, skipped


def _lock_global(stack: contextlib.ExitStack, reg: Registry, task_ids: list[str], refused: list[str]) -> bool:
    """Lock the global registry, creating its directory only in a workspace that has one or has tasks."""
    if not task_ids and not os.path.lexists(reg.global_file.path.parent):
        return False  # not a workspace, or an empty one: nothing to create
    try:
        make_dirs(reg.global_file.path.parent)
        stack.enter_context(reg.global_file.locked())
    except UnsafePath as exc:
        refused.append(f"the global registry was left alone: {exc}")
        return False
    return True


def repair(base: str | Path, *, dry_run: bool = True, restore: bool = False, kill_leaks: bool = False,
           sessions: TmuxSessions | None = None) -> RepairReport:
    """Repair the workspace at *base*; with *dry_run* (the default) only say what would be done.

    Raises LockTimeout if a lock cannot be had.  Corrupt files are refused unless *restore*.
    """
    reg = Registry(base, sessions=sessions, heal=False)
    actions: list[str] = []
    refused: list[str] = []
    task_ids = reg.task_ids()
    files = [reg.task_file(t) for t in task_ids]
    skipped: list[Finding] = []
    global_locked = False
    with contextlib.ExitStack() as stack:
        if not dry_run:  # a dry run only reads, and reads are atomic: it creates nothing, not even a lock file
            task_ids, skipped = _lock_tasks(stack, reg, task_ids)
            files = [reg.task_file(t) for t in task_ids]
            global_locked = _lock_global(stack, reg, task_ids, refused)
        tasks, glob, problems = _load_all(reg, task_ids)  # only the tasks whose locks are held
        problems += skipped
        changed: set[str] = set()

        for problem in problems:
            if problem.kind in ("unsafe", "unreadable"):
                refused.append(f"{problem.message} (left as it is)")
                continue
            if problem.kind == "corrupt" and problem.task_id:
                if not restore:
                    refused.append(f"{problem.path} is corrupt; rerun with --restore to restore or rebuild it")
                    continue
                doc, what = _restore_task(reg, problem.task_id, glob)
                (actions if doc is not None else refused).append(what)
                if doc is not None:
                    tasks[problem.task_id] = doc
                    changed.add(problem.task_id)
        global_corrupt = any(p.kind == "corrupt" and not p.task_id for p in problems)
        if global_corrupt and not restore:
            refused.append(f"{reg.global_file.path} is corrupt; rerun with --restore to rebuild it from the tasks")

        try:
            alive: set[str] | None = reg.sessions.alive()
        except SessionError as exc:
            alive = None
            refused.append(f"reaping zombies and leaks: {exc}")
        stamp = now()
        for task_id, task in tasks.items():
            if alive is not None:
                for agent in task["agents"]:
                    session = model.session_name(agent["id"])
                    if is_active(agent) and session not in alive:
                        model.finish_agent(task, agent, "terminated", stamp, reason="session_not_found")
                        actions.append(f"{task_id}: marked zombie {agent['id']} terminated (session_not_found)")
                        changed.add(task_id)
            for key, (old, new) in model.recompute_task_counters(task).items():
                actions.append(f"{task_id}: {key} {old!r} -> {new}")
                changed.add(task_id)
            if any(v.rule == "broken_hierarchy" and v.agent_id is None for v in model.task_violations(task)):
                task["agent_hierarchy"] = model.hierarchy_from_parents(task["agents"])
                actions.append(f"{task_id}: rebuilt agent_hierarchy from the agents' parents")
                changed.add(task_id)
            for v in model.task_violations(task):
                if v.rule in ("duplicate_id", "wrong_depth", "max_depth", "max_agents", "max_concurrent",
                              "unknown_status", "broken_hierarchy"):
                    refused.append(f"{v.message} (left for a person to decide)")

        original_global = None if glob is None else dumps(glob)
        if (glob is None and not global_corrupt) or (global_corrupt and restore):
            new_glob = model.new_global_document(stamp)
            if glob is not None:
                new_glob["created_at"] = glob.get("created_at", stamp)
            for task in tasks.values():
                model.sync_global(new_glob, task, stamp)
            actions.append(f"rebuilt {reg.global_file.path} from {len(tasks)} task registries")
            glob = new_glob
        elif glob is not None:
            disagreements = model.global_violations(glob, tasks, complete=False)
            for task in tasks.values():
                model.sync_global(glob, task, stamp)
            kept = set(tasks) | {p.task_id for p in problems if p.kind in UNREADABLE and p.task_id}
            for agent_id in [a for a, v in glob["agents"].items() if v.get("task_id") not in kept]:
                del glob["agents"][agent_id]
                actions.append(f"removed agent {agent_id}, whose task no longer exists, from the global registry")
            for task_id in [t for t in glob["tasks"] if t not in kept]:
                del glob["tasks"][task_id]
                actions.append(f"removed task {task_id}, which no longer exists, from the global registry")
            model.recompute_global_totals(glob)
            if disagreements:
                actions.append(f"re-synced the global registry with the tasks ({len(disagreements)} disagreements)")
        global_unusable = any(p.kind in ("unsafe", "unreadable") and not p.task_id for p in problems)
        drift = [] if glob is None or global_corrupt else _archive_problems(reg)
        if drift:
            actions.append("wrote the global registry whole and removed its archive, whose bookkeeping disagreed ("
                           + "; ".join(drift) + ")")
        write_global = (glob is not None and (dumps(glob) != original_global or bool(drift))
                        and (dry_run or global_locked) and not global_unusable)

        if alive is not None:
            owned = {model.session_name(a["id"])
                     for t in tasks.values() for a in t["agents"] if is_active(a)}
            owned |= _unreadable_sessions(glob, [p for p in problems if p.task_id not in tasks])
            for session in sorted(s for s in alive - owned if s.startswith("agent_")):
                if kill_leaks:
                    if not dry_run:
                        reg.sessions.kill(session)
                    actions.append(f"killed leaked session {session}")
                else:
                    refused.append(f"leaked session {session} left running (pass --kill-leaks to kill it)")

        litter = _stale_temps(reg)  # read under the locks: no live writer of ours is between temp and rename
        if litter:
            actions.append(f"removed {len(litter)} temp files left by writers that died mid-write")
        backup_dir = None
        if not dry_run and (litter or changed or write_global):  # a repair that changes no file backs up nothing
            backup_dir = _backup(reg, [*files, reg.global_file])
        if not dry_run:
            for path in litter:
                path.unlink(missing_ok=True)
            for task_id in sorted(changed):
                reg.task_file(task_id).write(tasks[task_id])
            if write_global:
                # The whole global registry, archived agents included (glob was read with the archive folded
                # in), then no archive: the next status change or deploy archives the terminal agents again.
                reg.global_file.write(glob)
                archive.remove(reg.global_file.path)
    return RepairReport(str(reg.base), dry_run, None if backup_dir is None else str(backup_dir), tuple(actions),
                        tuple(refused))

